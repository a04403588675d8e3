from fusion_seg.cli import main

main(prog_name="fusion-seg")
