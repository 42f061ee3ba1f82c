"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

The dictionary is split into consecutive groups; prefix j is the first j groups (latents [0, widths[j])). The
BatchTopK code of the whole dictionary is computed once, and every prefix reconstructs the input from its own
latents alone:
    x_hat_j = sum over kept latents i < widths[j] of z_i W_dec[i] + b_dec
    loss = mean over prefixes j of ||x - x_hat_j||^2 (summed over d_in, averaged over the batch) + AuxK
The last prefix is the whole dictionary, so `recon_loss` (what the trainer logs) is BatchTopK's reconstruction
loss; the mean, not SAELens' sum, keeps the loss on one reconstruction's scale, so gradient clipping and the AuxK
coefficient act as for the other architectures (the two differ by the constant factor len(widths)).
Early latents must reconstruct on their own, which pulls general, frequent features into them and stops later,
more specific latents absorbing them. Everything else is BatchTopK's: the running inference threshold, AuxK on
dead latents, the sparse kernel, and the saved SAELens JumpReLU layout (SAELens saves its
MatryoshkaBatchTopK as JumpReLU after training too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sae_pipeline.kernels import sparse_decode
from sae_pipeline.saes.base import ForwardOutput
from sae_pipeline.saes.batchtopk import BatchTopKSAE
from sae_pipeline.saes.topk import Kernel


def inner_prefix_reconstructions(latents: Tensor, W_dec: Tensor, b_dec: Tensor, widths: list[int]) -> list[Tensor]:
    """x_hat of every prefix but the last, from a dense code: group by group, each added to the previous prefix
    (one full decode's worth of matmuls in all)."""
    decoded, start, out = b_dec, 0, []
    for width in widths[:-1]:
        decoded = decoded + latents[:, start:width] @ W_dec[start:width]
        out.append(decoded)
        start = width
    return out


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    saelens_architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", k: int | None = None,
                 k_aux: int | None = None, aux_coeff: float = 1 / 32, threshold_decay: float = 0.99,
                 kernel: Kernel = "auto", widths: list[int] | None = None):
        super().__init__(d_in, d_sae, normalize, k, k_aux=k_aux, aux_coeff=aux_coeff,
                         threshold_decay=threshold_decay, kernel=kernel)
        self.widths = list(widths) if widths is not None else [d_sae]
        """Prefix widths, increasing, the last = d_sae."""
        if self.widths[-1] != d_sae or any(b <= a for a, b in zip([0, *self.widths], self.widths, strict=False)):
            raise ValueError(f"widths: {self.widths} must increase strictly from >= 1 to d_sae = {d_sae}")

    def inner_reconstructions(self, out: ForwardOutput) -> list[Tensor]:
        """x_hat of the prefixes before the whole dictionary, from the step's dense or sparse code."""
        if out.code is None:
            return inner_prefix_reconstructions(out.latents, self.W_dec, self.b_dec, self.widths)
        code = out.code
        with torch.autocast(code.values.device.type, enabled=False):  # the sparse kernels run in fp32
            return [sparse_decode(code._replace(values=code.values * (code.cols < width)), self.W_dec) + self.b_dec
                    for width in self.widths[:-1]]

    def forward(self, x: Tensor, sparsity_coeff: float | Tensor = 0.0, dead_mask: Tensor | None = None
                ) -> ForwardOutput:
        out = super().forward(x, sparsity_coeff, dead_mask)
        inner = [self.recon_loss(x_hat.to(x.dtype), x) for x_hat in self.inner_reconstructions(out)]
        nested = torch.stack([*inner, out.recon_loss]).mean()
        return out._replace(loss=nested + out.aux_loss)

    def extra_cfg(self) -> dict[str, Any]:
        return {**super().extra_cfg(), "matryoshka_widths": self.widths}

    @classmethod
    def cfg_kwargs(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {**super().cfg_kwargs(cfg), "widths": cfg["matryoshka_widths"]}
