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

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sae_pipeline.kernels import sparse_decode
from sae_pipeline.saes.base import ForwardOutput
from sae_pipeline.saes.batchtopk import BatchTopKSAE
from sae_pipeline.saes.topk import Kernel

if TYPE_CHECKING:
    from sae_pipeline.config import SAEConfig

DEFAULT_GROUPS = (1 / 32, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
"""Group sizes when a config gives none: prefixes of d_sae / 32, / 16, / 8, / 4, / 2 and all of it."""
MAX_GROUPS = 64


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
    exclusive_fields = ("matryoshka_groups",)

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", *, k: int, k_aux: int | None = None,
                 aux_coeff: float = 1 / 32, threshold_decay: float = 0.99, kernel: Kernel = "auto",
                 widths: list[int] | None = None):
        super().__init__(d_in, d_sae, normalize, k=k, k_aux=k_aux, aux_coeff=aux_coeff,
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

    @classmethod
    def config_kwargs(cls, cfg: SAEConfig, d_in: int) -> dict[str, Any]:
        return {**super().config_kwargs(cfg, d_in), "widths": cls.prefix_widths(cfg, d_in)}

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        groups = cfg.matryoshka_groups
        if groups is None:
            return
        if not 2 <= len(groups) <= MAX_GROUPS:
            raise ValueError(f"matryoshka_groups: {len(groups)} group(s); allowed: 2 to {MAX_GROUPS} "
                             "(one group is `batchtopk`)")
        if abs(sum(groups) - 1.0) > 1e-6:
            raise ValueError(f"matryoshka_groups: fractions of d_sae sum to {sum(groups):.6g}; allowed: a sum of 1")

    @classmethod
    def check_for_model(cls, cfg: SAEConfig, d_model: int) -> None:
        cls.prefix_widths(cfg, d_model)

    @staticmethod
    def prefix_widths(cfg: SAEConfig, d_model: int) -> list[int]:
        """Cumulative widths of the prefixes (the groups' fractions of d_sae, rounded; the last is d_sae);
        ConfigError when rounding leaves a group without a latent."""
        from sae_pipeline.config import ConfigError  # the architectures import with torch alone

        d_sae, widths, total = cfg.d_sae(d_model), [], 0.0
        groups = cfg.matryoshka_groups or DEFAULT_GROUPS
        for fraction in groups:
            total += fraction
            widths.append(round(total * d_sae))
        widths[-1] = d_sae
        if any(b <= a for a, b in zip([0, *widths], widths, strict=False)):
            raise ConfigError(f"matryoshka_groups: {list(groups)} of d_sae {d_sae} gives prefix widths {widths}; "
                              "every group needs at least one latent (fewer or larger groups, or a larger "
                              "expansion_factor)")
        return widths
