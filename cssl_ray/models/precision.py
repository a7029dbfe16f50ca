"""Mixed precision and memory format of the training step (``train.amp``, ``train.channels_last``).

    off            fp32 everywhere (the default)
    bf16           forward passes under ``torch.autocast(bfloat16)``, on CPU or CUDA. bf16 keeps fp32's
                   exponent range, so gradients need no loss scaling
    fp16           forward passes under ``torch.autocast(float16)`` with a ``GradScaler``; CUDA only:
                   fp16's range (smallest normal 6e-5) flushes small gradients to zero unless the
                   loss is scaled up first, and fp16 autocast on a CPU is slow and rarely useful
    channels_last  the model's 4-D weights and the 4-D input batches stored NHWC, the layout the
                   convolution kernels of tensor cores (and oneDNN on CPUs) prefer. In fp32 it only
                   reorders the arithmetic: losses equal the NCHW ones within rounding

Parameters, gradients, optimiser state and every loss stay fp32: autocast changes the dtype of the
activations (conv and matmul outputs), and the losses cast logits and embeddings with ``.float()``
before their reductions (``loop.supervised_epoch``, ``objective.patch_embeddings``,
``consistency.consistency_loss``, ``contrastive.contrastive_loss``).

Gradient averaging under a scaler (``backward_step``): the ranks average the *scaled* gradients and
``scaler.step`` then unscales the average and checks it for inf / NaN. The average is linear, so
mean_r(s g_r) / s = mean_r(g_r): the update is the unscaled one. And an overflow on any rank makes
the average non-finite on every rank, so every rank skips the same step and lowers its scale the
same way: the scalers (and the weights) stay equal across ranks. Unscaling before the average
(``scaler.unscale_``) would instead record each rank's own inf check, taken before the other
ranks' gradients arrive: a rank that saw none would step with the inf another rank sent it.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cssl_ray.config import ConfigError, TrainConfig

AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a run's forward passes compute: ``amp`` (off | bf16 | fp16) on ``device_type``, NHWC or not."""

    amp: str = "off"
    device_type: str = "cpu"
    channels_last: bool = False

    @classmethod
    def from_config(cls, train: TrainConfig, device: torch.device | str, *, inference: bool = False) -> Precision:
        """``train.amp`` / ``train.channels_last`` on ``device``. fp16 off CUDA is a ``ConfigError``;
        with ``inference`` (a forward-only caller, e.g. the Ray driver testing on its CPU) it is fp32."""
        device = torch.device(device)
        if train.amp not in AMP_DTYPES:
            raise ConfigError(f"train.amp: {train.amp!r} is not allowed; choose one of {', '.join(AMP_DTYPES)}")
        if train.amp == "fp16" and device.type != "cuda":
            if inference:
                return cls("off", device.type, train.channels_last)
            raise ConfigError(f"train.amp: fp16 needs a CUDA device (loss scaling), this run is on {device}; "
                              f"use bf16 or off")
        return cls(train.amp, device.type, train.channels_last)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None = fp32."""
        return AMP_DTYPES[self.amp]

    def autocast(self) -> AbstractContextManager:
        """The context of a forward pass: ``torch.autocast`` under bf16 / fp16, nothing when off."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def layout(self, x: Tensor | None) -> Tensor | None:
        """``x`` NHWC when channels_last and ``x`` is a 4-D batch; other tensors (masks, None) as they are."""
        if self.channels_last and x is not None and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model with its 4-D weights NHWC when channels_last (in place, like ``Module.to``)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh loss scaler for fp16 (CUDA); None otherwise (fp32 and bf16 need none)."""
        return torch.amp.GradScaler("cuda") if self.amp == "fp16" else None


FP32 = Precision()


def backward_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None, *,
                  after_backward: Callable[[], None] | None = None) -> None:
    """One optimiser step on ``loss``: zero the gradients, (scaled) backward, ``after_backward`` (the
    loops' gradient all-reduce, on the scaled gradients: the module docstring says why that is
    right), then the step; with a scaler ``scaler.step`` unscales and skips a non-finite step, and
    ``scaler.update`` moves the scale."""
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if after_backward is not None:
        after_backward()
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
