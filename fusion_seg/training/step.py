"""One optimisation step of a decoder: what the trainer runs on every batch, and what the bench and
``compare`` time, so that they time what training runs.

HRNet's recipe (config.py): the sum of the decoder's own losses (``Decoder.losses``: logits upsampled to
the labels, plus any deep supervision) under autocast, then SGD with momentum and weight decay, and the
poly learning-rate decay per step.
"""
from __future__ import annotations

import torch
from torch import nn

from fusion_seg.training.config import TrainConfig
from fusion_seg.training.losses import build_loss, decoder_loss


class TrainingStep:
    """The loss of a batch (:meth:`loss`) and the update it drives (:meth:`update`); calling the step does both.

    ``decoder`` is the (placed) decoder whose parameters are trained, with ``extra_params`` (fine-tuning's
    encoder, in the bench). ``world`` processes share OHEM's ``min_kept``, each keeping its share. The poly
    schedule runs over ``total_steps`` when given; without it the lr stays ``cfg.lr`` (a timed step).
    :attr:`model` runs the forward: the decoder itself, or a wrapper of it (DistributedDataParallel,
    ``torch.compile``).
    """

    def __init__(self, decoder: nn.Module, cfg: TrainConfig, device: torch.device, *, ignore_index: int = 255,
                 loss_weights=None, world: int = 1, total_steps: int | None = None, extra_params=()):
        self.decoder = self.model = decoder
        self.device, self.precision = device, cfg.precision
        self.criterion = build_loss(cfg.loss, ignore_index, thresh=cfg.ohem_thresh,
                                    min_kept=-(-cfg.ohem_min_kept // world), weight=loss_weights)
        self.optimizer = torch.optim.SGD([*decoder.parameters(), *extra_params], lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.PolynomialLR(self.optimizer, total_iters=total_steps,
                                                                power=cfg.poly_power) if total_steps else None)

    def loss(self, features: dict, labels: torch.Tensor) -> torch.Tensor:
        return decoder_loss(self.model, self.decoder, features, labels, self.criterion, self.device, self.precision)

    def update(self, loss: torch.Tensor) -> None:
        """Backward (under DDP this averages the gradients over the processes), the SGD step and the lr decay."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def __call__(self, features: dict, labels: torch.Tensor) -> float:
        loss = self.loss(features, labels)
        self.update(loss)
        return float(loss.detach())
