import pytest
import torch
import timm

from fusion_seg.encoder.build import build_encoder, rebuild_encoder

from fusion_seg.encoder.identity import EncoderIdentity, state_dict_sha256
from fusion_seg.errors import CheckpointError, UserError


def test_random_init_is_seeded_frozen_and_recorded():
    a = build_encoder("resnet18", random_init=True, seed=3)
    b = build_encoder("resnet18", random_init=True, seed=3)
    c = build_encoder("resnet18", random_init=True, seed=4)
    assert a.identity == b.identity
    assert a.identity.weights_sha256 != c.identity.weights_sha256
    assert a.identity.weights == "random-init:3"
    assert a.identity.init == {"random_init": True, "seed": 3, "zero_init_last": False}
    # zero_init_last=False: the last BN of each residual block is not zeroed.
    assert a.model.layer1[0].bn2.weight.abs().sum() > 0
    assert all(not p.requires_grad for p in a.parameters())
    a.train()
    assert not a.model.training
    assert [f["stride"] for f in a.identity.features] == [2, 4, 8, 16, 32]
    assert {k: (v.channels, v.stride) for k, v in a.output_shape().items()}["s32"] == (512, 32)
    feats = a(torch.zeros(1, 3, 100, 140))
    assert feats["s16"].shape[-2:] == (7, 9) and feats["s2"].shape[-2:] == (50, 70)


def test_strides_subset():
    enc = build_encoder("resnet18", random_init=True, strides=(8, 32))
    assert list(enc.output_shape()) == ["s8", "s32"]
    with pytest.raises(UserError, match="stride"):
        build_encoder("resnet18", random_init=True, strides=(64,))


@pytest.mark.parametrize("layout", ["timm", "torchvision"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_weights_file_round_trip(tmp_path, layout, fmt):
    torch.manual_seed(7)
    if layout == "timm":
        full = timm.create_model("resnet18", pretrained=False).state_dict()
    else:
        import torchvision

        full = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save(full, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full.items()}, str(path))
    enc = build_encoder("resnet18", weights_file=path)
    expected = {k: v for k, v in full.items() if not k.startswith("fc.")}
    assert enc.identity.weights_sha256 == state_dict_sha256(expected)
    assert torch.equal(enc.model.conv1.weight, full["conv1.weight"])
    # Rebuilding from the identity with the same file succeeds; with another file it is refused.
    assert rebuild_encoder(enc.identity, weights_file=path).identity.weights_sha256 == enc.identity.weights_sha256
    other = {k: v + 1 if v.is_floating_point() else v for k, v in full.items()}
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="weights_sha256"):
        rebuild_encoder(enc.identity, weights_file=tmp_path / "other.pth")


def test_weights_file_errors(tmp_path):
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="missing keys") as err:
        build_encoder("resnet34", weights_file=tmp_path / "r18.pth")
    assert "r18.pth" in str(err.value)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        build_encoder("resnet18", weights_file=tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not found"):
        build_encoder("resnet18", weights_file=tmp_path / "missing.pth")
    with pytest.raises(UserError, match="mutually exclusive"):
        build_encoder("resnet18", weights_file=tmp_path / "r18.pth", random_init=True)


def test_pretrained_tag_offline_gives_clear_error(monkeypatch):
    """The pretrained download fails (no network): a one-line UserError naming the offline ways out."""
    from fusion_seg.encoder import build

    calls = []

    def offline(tag, out_indices):
        calls.append((tag, out_indices))
        raise OSError("no network")

    monkeypatch.setattr(build, "_create_pretrained", offline)  # the project's own injection point
    monkeypatch.setattr(build, "hub_unreachable", lambda: None)  # the hub answers; the download fails
    with pytest.raises(UserError, match="--weights FILE") as err:
        build_encoder("resnet18.a1_in1k", strides=(8, 32))
    assert calls == [("resnet18.a1_in1k", (2, 4))]  # the tag as given, the features_only indices of s8 and s32
    message = str(err.value)
    assert "OSError: no network" in message and "--random-init" in message and "\n" not in message


def test_an_unreachable_hub_fails_at_once_from_the_cache_alone(monkeypatch, tmp_path):
    """Issue 20: offline, the default encoder failed only after ~50 s of hub retries, with a many-line message.
    Now an unreachable hub (one short TCP probe) puts huggingface_hub in offline mode for the load: the local
    cache only, no request; without cached weights the error is one line naming the offline ways out."""
    from huggingface_hub import constants

    from fusion_seg.encoder import build

    monkeypatch.setattr(build, "hub_unreachable", lambda: "huggingface.co cannot be reached (test)")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # nothing cached
    offline_during_load = []
    real = build._create_pretrained

    def recording(tag, out_indices):
        offline_during_load.append(constants.is_offline_mode())
        return real(tag, out_indices)

    monkeypatch.setattr(build, "_create_pretrained", recording)
    with pytest.raises(UserError) as err:
        build_encoder("resnet18.a1_in1k", strides=(8, 32))
    message = str(err.value)
    assert offline_during_load == [True] and not constants.is_offline_mode()  # only for the load
    assert "hub is offline" in message and "--weights FILE" in message and "--random-init" in message
    assert "\n" not in message and "Retry" not in message


def test_identity_round_trip_and_differences():
    ident = build_encoder("resnet18", random_init=True).identity
    again = EncoderIdentity.from_dict(ident.to_dict())
    assert again == ident and again.differences(ident) == []
    changed = EncoderIdentity.from_dict({**ident.to_dict(), "mean": [0.5, 0.5, 0.5]})
    assert any(d.startswith("mean") for d in ident.differences(changed))
