"""The decoders' base class :class:`Decoder`, their registry, and the helpers they share.

Every decoder (``reverse-hrnet``, ``linear``, ``fpn``, ``eseg``, ``frm``,
``exfuse``, ``hrnet``) is a :class:`Decoder` registered under its name with
:func:`register_decoder` in its own module. They follow the conventions of the
reverse HRNet decoder: feature maps are selected by ``ShapeSpec.stride``
(never by name or width), a missing stride is a :class:`UserError` that lists
what the cache holds and says to re-extract with ``--strides``, and weights
are initialised as there (Kaiming fan-out convs, unit norms, a
normal(std=0.001) classifier).
"""
from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fusion_seg.errors import UserError
from fusion_seg.registry import Registry
from fusion_seg.shapes import ShapeSpec

Criterion = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- resizing
def resize_to(x: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """``x`` resized to spatial ``size``, or ``x`` itself when it already has that size.

    ``mode``: an ``F.interpolate`` mode: ``"bilinear"`` (with ``align_corners=False``; the
    decoders' fusion and the logits) or ``"nearest"`` (FPN's top-down pathway).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=tuple(size), mode=mode, **corners)


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Decoder logits bilinearly upsampled to the label (or image) size: :func:`resize_to` for logits."""
    return resize_to(logits, size, "bilinear")


# --------------------------------------------------------------------------- option checks
def select_features(input_shapes: dict[str, ShapeSpec], strides: Sequence[int],
                    decoder: str, hint: str = "") -> list[str]:
    """Names of the feature maps at ``strides`` (matched on ``ShapeSpec.stride``), in that order."""
    by_stride = {spec.stride: name for name, spec in input_shapes.items()}
    missing = [s for s in strides if s not in by_stride]
    if missing:
        available = ", ".join(f"{n} (stride {s.stride})" for n, s in
                              sorted(input_shapes.items(), key=lambda kv: kv[1].stride))
        need = ", ".join(str(s) for s in missing)
        what = f"stride-{need} map" if len(missing) == 1 else f"maps at strides {need}"
        raise UserError(f"the {decoder} decoder needs the {what} (available: "
                        f"{available or 'none'}); re-extract with stride {need} in --strides{hint}.")
    return [by_stride[s] for s in strides]


def check_input_shapes(input_shapes, num_classes) -> None:
    """``input_shapes`` must be ``{name: ShapeSpec(channels, stride)}`` and ``num_classes`` an integer >= 1: what
    :func:`~fusion_seg.decoders.build_decoder` is given by a caller (a tuple ``(256, 4)`` for a ShapeSpec
    would otherwise fail deep inside a decoder)."""
    if not isinstance(input_shapes, dict):
        raise UserError(f"input_shapes={input_shapes!r}: pass a dict of the feature maps, "
                        "{name: fusion_seg.ShapeSpec(channels, stride)}, e.g. {'s4': fusion_seg.ShapeSpec(256, 4)} "
                        "(an encoder's output_shape()).")
    for name, spec in input_shapes.items():
        if not isinstance(spec, ShapeSpec):
            example = (f"fusion_seg.ShapeSpec({spec[0]!r}, {spec[1]!r})"
                       if isinstance(spec, (tuple, list)) and len(spec) == 2 else "fusion_seg.ShapeSpec(256, 4)")
            raise UserError(f"input_shapes[{name!r}] is {spec!r}: pass ShapeSpec(channels, stride), e.g. {example}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise UserError(f"num_classes={num_classes!r}: pass the number of classes, an integer >= 1.")


def check_preset(decoder: str, preset: str, presets: Iterable[str]) -> None:
    if preset not in presets:
        raise UserError(f"unknown {decoder} preset {preset!r}; choose one of {', '.join(presets)}")


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise UserError(f"{name} must be >= 1, got {value}")


# Repeated parts of a decoder (HRNet modules per stage, blocks per branch, BiFPN repeats): the deepest published
# decoders use a handful; a count beyond this is a typo, whose decoder would take minutes just to be built.
MAX_REPEATS = 64


def check_counts(**values: int) -> None:
    """Each count of repeated parts is in 1..:data:`MAX_REPEATS` (a UserError naming it otherwise)."""
    for name, value in values.items():
        if not 1 <= int(value) <= MAX_REPEATS:
            raise UserError(f"{name} must be in 1..{MAX_REPEATS}, got {value}")


def norm_layer(norm: str) -> str:
    """timm norm-layer name for ``norm``: ``"bn"`` (BatchNorm) or ``"gn"`` (GroupNorm, 32 groups)."""
    names = {"bn": "batchnorm", "gn": "groupnorm"}
    if norm not in names:
        raise UserError(f"norm must be one of {', '.join(names)}, got {norm!r}")
    return names[norm]


def check_group_norm(norm: str, **widths: int) -> None:
    """GroupNorm uses 32 groups: with ``norm="gn"`` every width must be a multiple of 32."""
    if norm != "gn":
        return
    for name, width in widths.items():
        if width % 32:
            raise UserError(f"{name}={width} is not a multiple of 32, which norm='gn' "
                            f"(GroupNorm, 32 groups) needs; pick another width or norm='bn'")


# --------------------------------------------------------------------------- activation checkpointing
class RecomputedForward:
    """A module's forward run under :func:`torch.utils.checkpoint.checkpoint` while it trains: its inputs are
    kept, its activations recomputed in the backward pass (non-reentrant, so a list of tensors may go in).

    The recomputation runs the module a second time, and BatchNorm in training mode would update its
    running statistics twice; they are put back after it, so running statistics, like the gradients, are
    those of a run without checkpointing (tested). In eval mode or without gradients it is the plain forward.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.plain = type(module).forward

    def __call__(self, *args):
        module = self.module
        if not (module.training and torch.is_grad_enabled()):
            return self.plain(module, *args)
        calls = []

        def run(*inputs):
            # A fresh list each call: HRNet modules (timm's among them) assign their outputs into the list they
            # are given, which would change the inputs the recomputation is run on.
            inputs = [list(a) if isinstance(a, list) else a for a in inputs]
            if not calls:  # the forward pass
                calls.append(True)
                return self.plain(module, *inputs)
            with _running_stats_kept(module):  # the recomputation in the backward pass
                return self.plain(module, *inputs)

        return checkpoint(run, *args, use_reentrant=False)


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """BatchNorm running statistics of ``module`` as they were before the ``with`` block (also if it is cut
    short, as the checkpoint's recomputation may be once it has what it needs)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


# --------------------------------------------------------------------------- the base class
class FeatureTaps(NamedTuple):
    """What ``fusion-seg visualize`` hooks to show a decoder's multi-scale feature maps.

    ``modules``: the submodules whose outputs (tensors, or the tensors of a list, tuple or
    dict they return) are candidates; per stride the last one computed at that stride's size
    is shown. ``rule`` names the choice; ``"size-match"`` (every submodule) also makes
    visualize skip logits: the decoder's output, tensors sharing its memory, and maps with
    as many channels as the classifier.
    """

    rule: str
    modules: list[nn.Module]


class Decoder(nn.Module):
    """Base of every decoder: logits from a ``dict[str, Tensor]`` of feature maps.

    As in detectron2, a decoder is built from ``input_shapes: dict[str, ShapeSpec]``
    (never hard-coded widths) and consumes ``dict[str, Tensor]`` keyed the same way.
    A subclass's ``__init__(input_shapes, num_classes, *, options...)`` takes its
    options as keyword-only arguments (:func:`~fusion_seg.decoders.build_decoder`
    checks them against the signature), validates them, calls :meth:`select_inputs`,
    stores its resolved options in ``self._config``, builds its layers and its 1x1
    ``classifier``, and ends with :meth:`init_weights`. Its ``forward(features)``
    returns the logits at stride ``output_stride``, not upsampled: :meth:`losses`
    and the callers upsample them.

    Attributes:
        in_features: the ``input_shapes`` keys this decoder reads, in the order it
            reads them (ascending stride): the maps a cache must hold for it.
        required_strides: the strides of those maps.
        output_stride: the stride of the logits.
        classifier: the 1x1 conv that predicts the classes.
        config: the JSON-able options that rebuild this architecture, what
            checkpoints store: ``build_decoder(name, input_shapes, num_classes,
            **decoder.config)`` gives the same layers and state-dict keys.
    """

    #: Trained from images with its own stem, not from a frozen encoder's cached
    #: maps (``train-decoder --online`` only).
    end_to_end: ClassVar[bool] = False

    in_features: list[str]
    required_strides: tuple[int, ...]
    output_stride: int
    classifier: nn.Conv2d
    _config: dict

    def select_inputs(self, input_shapes: dict[str, ShapeSpec], strides: Sequence[int], decoder: str, *,
                      hint: str = "", output_stride: int | None = None) -> list[str]:
        """Read the maps at ``strides`` (matched on ``ShapeSpec.stride``); logits at ``output_stride``.

        Sets ``required_strides``, ``in_features`` (the maps' names, in ``strides`` order) and
        ``output_stride`` (default: the finest of ``strides``), and returns ``in_features``.
        A missing stride is a :class:`UserError` naming ``decoder``, the maps there are, and
        ``--strides`` (then ``hint``).
        """
        self.required_strides = tuple(strides)
        self.in_features = select_features(input_shapes, self.required_strides, decoder, hint=hint)
        self.output_stride = min(self.required_strides) if output_stride is None else output_stride
        return self.in_features

    @property
    def config(self) -> dict:
        """JSON-able settings that rebuild this architecture via ``build_decoder`` (a copy)."""
        return copy.deepcopy(self._config)

    def classifiers(self) -> list[nn.Conv2d]:
        """The convs that predict classes (``classifier``, plus any auxiliary heads)."""
        return [self.classifier]

    def checkpoint_units(self) -> list[nn.Module]:
        """The parts whose activations ``--checkpoint-activations`` recomputes in the backward pass instead of
        keeping them (an HRNet module, a fuse layer); none by default: a decoder without stages has nothing
        worth recomputing, and refuses the option."""
        return []

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each of :meth:`checkpoint_units`' activations in the backward pass (mmseg's ``with_cp``):
        memory for time, the same gradients. The units keep their parameters and state-dict keys; only their
        ``forward`` is wrapped (:class:`RecomputedForward`), so checkpoints do not depend on it."""
        units = self.checkpoint_units()
        if enabled and not units:
            raise UserError(f"--checkpoint-activations: the {type(self).__name__} decoder has no stages to "
                            "checkpoint (only reverse-hrnet and hrnet have); drop the option.")
        for unit in units:
            if enabled:
                unit.forward = RecomputedForward(unit)
            else:
                unit.__dict__.pop("forward", None)

    def init_weights(self, scope: nn.Module | None = None) -> None:
        """Kaiming fan-out convs and unit norms (as ``ReverseHRNet``); tiny normal :meth:`classifiers`.

        Convs and norms are initialised within ``scope`` (default: the whole decoder; a
        pretrained body is left out by passing the part that is the decoder's own), then
        each classifier gets normal(std=0.001) weights and zero bias (HRNet's init).
        Only ``nn.Conv2d`` and 2-D norms are touched: ``nn.Linear`` layers inside timm
        transformer blocks keep timm's own initialisation.
        """
        for m in (self if scope is None else scope).modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for classifier in self.classifiers():
            nn.init.normal_(classifier.weight, std=0.001)
            if classifier.bias is not None:
                nn.init.zeros_(classifier.bias)

    def losses(self, logits: Tensor, labels: Tensor, criterion: Criterion) -> dict[str, Tensor]:
        """The training losses of the last forward, whose output was ``logits``; their sum is the loss.

        ``{"loss_seg": criterion(logits upsampled to labels, labels)}``: ``logits`` are
        bilinearly upsampled to ``labels``' size (:func:`upsample_logits`) and cast to
        float32. ``criterion(logits, labels)`` is e.g. the training loss. Decoders with
        deep supervision add their terms (ExFuse: ``"loss_aux"``).
        """
        return {"loss_seg": criterion(upsample_logits(logits, labels.shape[-2:]).float(), labels)}

    def feature_taps(self) -> FeatureTaps:
        """The submodules whose outputs show this decoder's feature maps (``fusion-seg visualize``).

        The default, rule ``"size-match"``, is every submodule (see :class:`FeatureTaps`):
        per stride the deepest map at that resolution that is not logits. Decoders with a
        better place to look override this.
        """
        return FeatureTaps("size-match", [m for name, m in self.named_modules() if name])


# --------------------------------------------------------------------------- the registry
#: Decoders by name, in registration order (the order of the imports in ``fusion_seg.decoders``).
DECODERS = Registry("decoder", Decoder)
register_decoder = DECODERS.register  # @register_decoder("reverse-hrnet") on the class
