"""ReLU SAE with an L1 penalty (Towards Monosemanticity; optional decoder-norm weighting, April 2024 update)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sae_pipeline.saes.base import ForwardOutput, SparseAutoencoder, l1_penalty

if TYPE_CHECKING:
    from sae_pipeline.config import SAEConfig


class ReluSAE(SparseAutoencoder):
    architecture = "relu"
    saelens_architecture = "standard"
    sparsity_field = "l1_alpha"
    key_fields = ("l1_alpha", "lr")
    exclusive_fields = ("resample_every",)
    l1_steered = True

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", weight_l1_by_decoder_norm: bool = False):
        super().__init__(d_in, d_sae, normalize)
        self.weight_l1_by_decoder_norm = weight_l1_by_decoder_norm

    @classmethod
    def config_kwargs(cls, cfg: SAEConfig, d_in: int) -> dict[str, Any]:
        return {"weight_l1_by_decoder_norm": cfg.l1_weighted_by_decoder_norm}

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x))

    def forward(self, x: Tensor, sparsity_coeff: float | Tensor = 0.0, dead_mask: Tensor | None = None
                ) -> ForwardOutput:
        latents = self.encode(x)
        x_hat = self.decode(latents)
        recon = self.recon_loss(x_hat, x)
        norms = self.W_dec.norm(dim=1) if self.weight_l1_by_decoder_norm else None
        sparsity = sparsity_coeff * l1_penalty(latents, norms)
        zero = recon.new_zeros(())
        return ForwardOutput(x_hat, latents, recon + sparsity, recon, sparsity, zero)
