"""compare's checks before any training; the comparison itself (a training process per decoder):
tests/system/test_compare_decoders.py."""
from pipeline_helpers import extract_synthetic


def test_compare_checks_the_whole_decoder_list_before_training(tmp_path, monkeypatch):
    """An unknown name in the middle, a duplicate, and a decoder the store cannot feed: all reported at once,
    before the first decoder trains; no run folder is made."""
    import pytest

    from fusion_seg.reports import compare as cmp
    from fusion_seg.errors import UserError
    from fusion_seg.shapes import ShapeSpec
    from pipeline_helpers import tiny_config

    extract_synthetic(tmp_path / "t.zarr", views=1, crop=(64, 64), num_images=2)
    trained = []
    monkeypatch.setattr(cmp, "_train_in_own_process", lambda *a: trained.append(a) or 1 / 0)
    with pytest.raises(UserError) as err:
        cmp.compare(str(tmp_path / "t.zarr"), tmp_path / "cmp", tiny_config(epochs=1),
                    decoders=("linear", "fake-decoder", "linear", "fpn", "hrnet"), progress=False)
    lines = str(err.value).splitlines()
    assert lines[0] == "compare --decoders has 3 problems (nothing was trained):"
    assert lines[1].startswith("compare --decoders: unknown decoder 'fake-decoder'; known decoders: ")
    assert lines[2] == "compare --decoders: 'linear' is listed twice; list each decoder once."
    assert lines[3].startswith(f"compare --decoders: 'hrnet' cannot be trained from {tmp_path / 't.zarr'}: "
                               "the hrnet baseline trains end to end from images")
    assert trained == [] and not (tmp_path / "cmp").exists()
    with pytest.raises(UserError, match=r"^compare --decoders: unknown decoder 'nope'.*Nothing was trained\.$"):
        cmp.compare(str(tmp_path / "t.zarr"), tmp_path / "cmp", tiny_config(epochs=1), decoders=("nope",))
    assert not (tmp_path / "cmp").exists()
    # Built from the store's feature shapes, as training builds them: a store without stride 4 feeds none of these.
    no_s4 = {f"s{s}": ShapeSpec(64 * s, s) for s in (8, 16, 32)}
    with pytest.raises(UserError) as err:
        cmp.check_decoders(("reverse-hrnet", "fpn"), no_s4, 4, cache="c.zarr")
    assert [line.split(": ", 2)[1] for line in str(err.value).splitlines()[1:]] == [
        "'reverse-hrnet' cannot be trained from c.zarr", "'fpn' cannot be trained from c.zarr"]
    assert "needs the stride-4 map" in str(err.value)
