#!/bin/bash
# extraction throughput: in-process vs dask LocalCluster with 1 and 2 workers (48 CamVid views, 352x480 crops)
cd /work/main
rm -rf /tmp/dk; mkdir -p /tmp/dk
for round in 1 2; do
for name in inprocess w1 w2; do
  case $name in inprocess) flags="";; w1) flags="--dask-workers 1";; w2) flags="--dask-workers 2";; esac
  start=$(date +%s.%N)
  out=$(.venv/bin/fusion-seg extract --dataset camvid --root ../shared/data/camvid --split train --dataset-opt limit=48 \
      --views 1 --crop 352x480 --encoder resnet50 --random-init --out /tmp/dk/$name-$round.zarr $flags 2>/dev/null | tail -1)
  end=$(date +%s.%N)
  echo "$name round $round: $out; wall $(python3 -c "print(round($end-$start,1))") s; load $(cut -d' ' -f1 /proc/loadavg)"
done
done
