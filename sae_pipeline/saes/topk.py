"""TopK SAE (Gao et al. 2024) with the AuxK loss that gives dead latents a gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_pipeline.saes.base import ForwardOutput, SparseAutoencoder


def topk_latents(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest ReLU'd pre-activations per row, zero elsewhere."""
    values, indices = torch.relu(pre).topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    saelens_architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", k: int | None = None,
                 k_aux: int | None = None, aux_coeff: float = 1 / 32):
        if k is None:
            raise ValueError("k: required for the topk architecture")
        super().__init__(d_in, d_sae, normalize, k)
        self.k_aux = min(k_aux or d_in // 2, d_sae - 1)
        self.aux_coeff = aux_coeff

    def encode(self, x: Tensor) -> Tensor:
        return topk_latents(self.pre_activations(x), self.k)

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor) -> Tensor:
        """AuxK: the top-k_aux dead latents reconstruct the residual, normalised by its variance.

        Scaled by min(n_dead / k_aux, 1) as a tensor, so it is exactly zero without dead latents and needs
        no host synchronisation.
        """
        residual = (x - x_hat).detach()
        dead_pre = pre.masked_fill(~dead_mask, float("-inf"))
        aux_latents = topk_latents(dead_pre, self.k_aux)
        residual_hat = aux_latents @ self.W_dec
        variance = (residual - residual.mean(dim=0)).pow(2).sum().clamp(min=1e-12)
        scale = (dead_mask.sum() / self.k_aux).clamp(max=1.0)
        return scale * (residual_hat - residual).pow(2).sum() / variance

    def training_latents(self, pre: Tensor) -> Tensor:
        """The sparse code of the training forward pass (BatchTopK overrides this)."""
        return topk_latents(pre, self.k)

    def forward(self, x: Tensor, sparsity_coeff: float | Tensor = 0.0, dead_mask: Tensor | None = None
                ) -> ForwardOutput:
        pre = self.pre_activations(x)
        latents = self.training_latents(pre)
        x_hat = self.decode(latents)
        recon = self.recon_loss(x_hat, x)
        aux = recon.new_zeros(())
        if dead_mask is not None and self.aux_coeff > 0:
            aux = self.aux_coeff * self.aux_loss(x, x_hat, pre, dead_mask)
        return ForwardOutput(x_hat, latents, recon + aux, recon, recon.new_zeros(()), aux)

    def extra_cfg(self) -> dict:
        return {"k": self.k, "activation_fn": "topk", "activation_fn_kwargs": {"k": self.k}}
