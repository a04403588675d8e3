"""The paper's baseline: HRNetV2 trained end to end from images (Wang et al. 2019).

Unlike every other decoder here, this one has no frozen encoder: it consumes the
normalised image itself (the ``image`` map at stride 1 that the identity encoder
provides) and trains its own stem and four-branch body, as the original HRNet
segmentation code does. It is therefore trained with ``train-decoder --online``
(there is nothing to cache) and used through the same evaluate and predict commands.

- Body: timm's HRNet (``hrnet_w18_small_v2`` by default, ``hrnet_w48`` for the
  paper's table) with ``features_only=True`` and the raw branch outputs
  (``feature_location=""``: 18/36/72/144 channels for W18).
- Head: HRNet's segmentation head: all four streams upsampled to stride 4 and
  concatenated, a 1x1 conv + BN + ReLU, then the 1x1 classifier.
- timm's HRNet fuses by fixed-factor upsampling, which breaks when the input is not
  a multiple of 32: the image is padded (bottom/right, zeros = the mean after
  normalisation) to a multiple of 32 and the logits are cropped back.
- ``pretrained=True`` loads timm's ImageNet weights (needs the internet); the
  default is a random initialisation, which is all that works offline.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from fusion_seg.decoders.base import Decoder, FeatureTaps, register_decoder, resize_to
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec

VARIANTS = ("hrnet_w18_small", "hrnet_w18_small_v2", "hrnet_w18", "hrnet_w32", "hrnet_w48")


@register_decoder("hrnet")  # end to end from images (train-decoder --online), the paper's baseline
class HRNetBaseline(Decoder):
    """End-to-end HRNetV2 for segmentation: image in, logits at stride 4 out."""

    end_to_end = True  # trained from images with its own stem; there is no frozen encoder

    def __init__(self, input_shapes: dict[str, ShapeSpec], num_classes: int, *,
                 variant: str = "hrnet_w18_small_v2", pretrained: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise UserError(f"unknown HRNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        image = [name for name, s in input_shapes.items() if s.stride == 1 and s.channels == 3]
        if not image:
            raise UserError("the hrnet baseline trains end to end from images, not from cached features: "
                            "use `train-decoder --online --decoder hrnet --dataset ...`.")
        # The image is picked by stride and channels, not by Decoder.select_inputs (stride only).
        self.in_features = image
        self.required_strides = (1,)
        self.output_stride = 4
        self._config = {"variant": variant, "pretrained": bool(pretrained)}
        try:
            self.body = timm.create_model(variant, features_only=True, feature_location="", out_indices=(1, 2, 3, 4),
                                          pretrained=pretrained)
        except Exception as exc:
            if not pretrained:
                raise
            raise UserError(f"could not load ImageNet weights for {variant} ({exc}); "
                            "offline, use --decoder-opt pretrained=false.") from exc
        channels = sum(self.body.feature_info.channels())
        self.head = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.init_weights(scope=self.head)  # the body keeps timm's (or ImageNet) weights

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = features[self.in_features[0]]
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 32, 0, -h % 32))
        streams = self.body(x)
        size = streams[0].shape[-2:]
        fused = torch.cat([streams[0]] + [resize_to(s, size) for s in streams[1:]], dim=1)
        logits = self.classifier(self.head(fused))
        return logits[..., : -(-h // 4), : -(-w // 4)]

    def checkpoint_units(self) -> list[nn.Module]:
        """The HRNet modules of its body (timm's ``HighResolutionModule``: each stage's fusing blocks) and its
        head (``--checkpoint-activations``); timm's own ``set_grad_checkpointing`` does not support HRNet."""
        from timm.models.hrnet import HighResolutionModule

        return [m for m in self.body.modules() if isinstance(m, HighResolutionModule)] + [self.head]

    def feature_taps(self) -> FeatureTaps:
        """The four streams its body returns: the outputs of HRNet's last stage, which has just fused
        all resolutions (the counterpart of the reverse HRNet's first stage), matched by size."""
        return FeatureTaps("body-streams", [self.body])
