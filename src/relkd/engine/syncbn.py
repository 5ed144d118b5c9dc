"""Batch norm over the global batch of all ranks, on any device (``nn.SyncBatchNorm`` is
GPU-only). Used when ``train.sync_bn`` is on: then N processes at batch b train exactly like one
process at batch N*b, which the distributed tests check on CPU with gloo."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is again all_reduce(SUM): every rank's loss depends on
    the summed statistics, so each rank's input receives the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """Same parameters and buffers as ``BatchNorm{1,2,3}d`` (checkpoints stay compatible);
    in training mode the mean and variance are those of the batch gathered over all ranks.

    Input [B, C, *]. Statistics in fp32; the all-reduce is differentiable, so gradients flow
    through the global statistics as in single-process batch norm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input [B, C, ...], got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        n_local = torch.tensor([x.numel() / c], device=x.device, dtype=torch.float32)
        # Two passes (mean, then squared deviations), as single-process batch norm: the one-pass
        # E[x^2] - mean^2 cancels catastrophically for near-constant channels.
        sums = _SumOverRanks.apply(torch.cat([xf.sum(dims), n_local]))
        total = sums[c]
        mean = sums[:c] / total
        dev = xf - mean.view(shape)
        var = _SumOverRanks.apply(dev.square().sum(dims)) / total  # biased, as BN normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        y = dev * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap every batch norm for a global one: ``nn.SyncBatchNorm`` on CUDA, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        state = list(module.state_dict().values())
        if state:
            out.to(state[0].device)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_bn(child, device))
    return out
