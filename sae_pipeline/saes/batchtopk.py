"""BatchTopK SAE (Bussmann et al. 2024): top k*B activations over the whole batch, a JumpReLU at inference.

Training keeps the k * batch largest ReLU'd pre-activations of the batch, so a token may use more or fewer than k
latents while the batch averages exactly k. After every optimizer step the trainer calls `after_step`, which moves
the `threshold` buffer towards the smallest activation kept in that step (an EMA, as saprmarks/dictionary_learning
does). In eval mode `encode` is then the JumpReLU relu(pre) * (pre > threshold), which needs no batch, and the saved
file is SAELens' JumpReLU layout (W_enc, b_enc, W_dec, b_dec, threshold [d_sae]). AuxK on dead latents is TopK's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sae_pipeline.kernels import batch_topk_selection
from sae_pipeline.saes.base import ForwardOutput
from sae_pipeline.saes.topk import Kernel, TopKSAE

if TYPE_CHECKING:
    from sae_pipeline.config import SAEConfig


def batch_topk_latents(pre: Tensor, k: int) -> Tensor:
    """Keep the k * batch largest ReLU'd pre-activations of the whole batch, zero elsewhere."""
    acts = torch.relu(pre)
    flat = acts.flatten()
    values, indices = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre)


def jumprelu_latents(pre: Tensor, threshold: Tensor) -> Tensor:
    """relu(pre) where pre > threshold, else 0 (SAELens' JumpReLU encode)."""
    return torch.relu(pre) * (pre > threshold)


def min_kept_activation(latents: Tensor) -> Tensor:
    """The smallest positive latent of a batch (0 when nothing fired), without a host synchronisation."""
    return latents.masked_fill(latents <= 0, float("inf")).min().nan_to_num(posinf=0.0)


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    config_defaults = {"idle_latents_still": False}
    """TopK's lr and warmup, not its hold on idle latents, which cost BatchTopK and Matryoshka recovered features on
    the synthetic ground truth (`benchmarks/RESULTS.md`, "TopK defaults")."""

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", *, k: int, k_aux: int | None = None,
                 aux_coeff: float = 1 / 32, threshold_decay: float = 0.99, kernel: Kernel = "auto"):
        super().__init__(d_in, d_sae, normalize, k=k, k_aux=k_aux, aux_coeff=aux_coeff, kernel=kernel)
        self.threshold_decay = threshold_decay
        # inference threshold on the pre-activations; negative (a plain ReLU) until the first training step
        self.register_buffer("threshold", torch.full((d_sae,), -1.0))

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activations(x)
        return batch_topk_latents(pre, self.k) if self.training else jumprelu_latents(pre, self.threshold)

    def training_latents(self, pre: Tensor) -> Tensor:
        return batch_topk_latents(pre, self.k)

    def training_selection(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        return batch_topk_selection(pre, self.k)

    @torch.no_grad()
    def update_threshold(self, latents: Tensor) -> None:
        """threshold <- decay * threshold + (1 - decay) * (smallest kept activation); set outright the first time.

        `latents` is the dense code or the sparse code's values: only its positive entries matter."""
        kept = min_kept_activation(latents.detach()).to(self.threshold.dtype)
        first = self.threshold < 0
        blended = self.threshold * self.threshold_decay + kept * (1 - self.threshold_decay)
        self.threshold.copy_(torch.where(first, kept, blended))

    def after_step(self, out: ForwardOutput) -> None:
        self.update_threshold(out.code.values if out.code is not None else out.latents)

    def extra_cfg(self) -> dict:
        return {"k": self.k, "activation_fn": "relu", "threshold_decay": self.threshold_decay,
                "threshold_from": "batchtopk running estimate (EMA of the smallest kept activation per batch)"}

    @classmethod
    def cfg_kwargs(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {**super().cfg_kwargs(cfg), "threshold_decay": cfg.get("threshold_decay", 0.99)}

    @classmethod
    def config_kwargs(cls, cfg: SAEConfig, d_in: int) -> dict[str, Any]:
        return {**super().config_kwargs(cfg, d_in), "threshold_decay": cfg.batchtopk_threshold_decay}
