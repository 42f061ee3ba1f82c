"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): learnt per-latent thresholds and an L0 penalty.

z = pre * H(pre - theta) with theta = exp(log_threshold). The step H has no useful derivative, so the threshold
gets a straight-through estimate through a rectangle kernel of width `bandwidth` (eps):
    d JumpReLU / d theta = -(theta / eps) * rect((pre - theta) / eps)
    d H(pre - theta) / d theta = -(1 / eps) * rect((pre - theta) / eps)
and no gradient reaches `pre` through the step (JumpReLU passes H(pre - theta) to `pre`). The sparsity loss is
coeff * mean L0 (L0 = sum over latents of H, per token), or coeff * (L0 / target - 1)^2 toward a target L0.
The file layout is SAELens' JumpReLU: `threshold` [d_sae] (not its log) next to W_enc, b_enc, W_dec, b_dec.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from sae_pipeline.saes.base import ForwardOutput, SparseAutoencoder


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel: 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a broadcast gradient [..., d_sae] back to the threshold's shape [d_sae]."""
    return grad.reshape(-1, like.shape[-1]).sum(dim=0).reshape(like.shape)


class JumpReLUFunction(torch.autograd.Function):
    """pre * H(pre - threshold); straight-through threshold gradient via the rectangle kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        grad_threshold = -(threshold / eps) * rectangle((pre - threshold) / eps) * grad
        return grad_pre, _reduce_to(grad_threshold, threshold), None


class StepFunction(torch.autograd.Function):
    """H(pre - threshold); straight-through threshold gradient via the rectangle kernel, none to `pre`."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((pre - threshold) / eps) * grad
        return torch.zeros_like(pre), _reduce_to(grad_threshold, threshold), None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return JumpReLUFunction.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return StepFunction.apply(pre, threshold, bandwidth)


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", k: int | None = None,
                 bandwidth: float = 1e-3, init_threshold: float = 1e-3, target_l0: float | None = None):
        super().__init__(d_in, d_sae, normalize)
        if bandwidth <= 0 or init_threshold <= 0:
            raise ValueError(f"bandwidth {bandwidth} and init_threshold {init_threshold} must be > 0")
        self.bandwidth = bandwidth
        self.init_threshold = init_threshold
        self.target_l0 = target_l0
        """Target L0 as a number of latents per token (None: plain L0 penalty)."""
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, b_dec: Tensor | None = None) -> None:
        super().initialize(generator, b_dec)
        self.log_threshold.fill_(math.log(self.init_threshold))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        return jumprelu(self.pre_activations(x), self.threshold, self.bandwidth)

    def l0_loss(self, l0: Tensor, sparsity_coeff: float | Tensor) -> Tensor:
        """coeff * L0, or coeff * (L0 / target - 1)^2 when a target is set."""
        if self.target_l0 is None:
            return sparsity_coeff * l0
        return sparsity_coeff * (l0 / self.target_l0 - 1).pow(2)

    def forward(self, x: Tensor, sparsity_coeff: float | Tensor = 0.0, dead_mask: Tensor | None = None
                ) -> ForwardOutput:
        pre = self.pre_activations(x)
        threshold = self.threshold
        latents = jumprelu(pre, threshold, self.bandwidth)
        x_hat = self.decode(latents)
        recon = self.recon_loss(x_hat, x)
        l0 = step(pre, threshold, self.bandwidth).sum(dim=-1).mean()
        sparsity = self.l0_loss(l0, sparsity_coeff)
        return ForwardOutput(x_hat, latents, recon + sparsity, recon, sparsity, recon.new_zeros(()))

    def extra_cfg(self) -> dict[str, Any]:
        return {"activation_fn": "relu", "jumprelu_bandwidth": self.bandwidth,
                "jumprelu_init_threshold": self.init_threshold, "jumprelu_target_l0": self.target_l0}

    @classmethod
    def cfg_kwargs(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"bandwidth": cfg.get("jumprelu_bandwidth", 1e-3),
                "init_threshold": cfg.get("jumprelu_init_threshold", 1e-3),
                "target_l0": cfg.get("jumprelu_target_l0")}

    def file_tensors(self) -> dict[str, Tensor]:
        """SAELens layout: `threshold` = exp(log_threshold) in place of the trained log."""
        tensors = super().file_tensors()
        tensors["threshold"] = tensors.pop("log_threshold").exp().contiguous()
        return tensors

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        if "threshold" in tensors:
            tensors["log_threshold"] = tensors.pop("threshold").log()
        super().load_file_tensors(tensors)
