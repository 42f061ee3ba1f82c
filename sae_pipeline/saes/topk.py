"""TopK SAE (Gao et al. 2024) with the AuxK loss that gives dead latents a gradient.

Two training paths compute the same loss and gradients (pinned within 1e-5 by `test_kernels.py`):
- `dense`, the reference: a [batch, d_sae] code, dense decode; 6 matmuls of batch x d_in x d_sae per step,
  9 with AuxK;
- `sparse`: one dense encoder matmul, then only the selected (token, latent) pairs in the decode and in every
  backward (`sae_pipeline.kernels`).
`kernel="auto"` takes the sparse path when k is at most `SPARSE_MAX_DENSITY` of d_sae, where it is the faster one
(`benchmarks/RESULTS.md`), the dense one otherwise. AuxK's k_aux does not enter the rule: AuxK runs only while
latents are dead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from sae_pipeline.kernels import SparseCode, gather_preactivations, sparse_decode, topk_selection
from sae_pipeline.saes.base import ForwardOutput, SparseAutoencoder

if TYPE_CHECKING:
    from sae_pipeline.config import SAEConfig

Kernel = Literal["auto", "dense", "sparse"]
SPARSE_MAX_DENSITY = 1 / 12
"""`auto` picks the sparse step when k / d_sae is at most this."""


def topk_latents(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest ReLU'd pre-activations per row, zero elsewhere."""
    values, indices = torch.relu(pre).topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


def auxk_error(residual: Tensor, residual_hat: Tensor, dead_mask: Tensor, k_aux: int) -> Tensor:
    """AuxK's loss: squared error of the dead latents' reconstruction of the residual, summed over d_in and
    averaged over the batch (the units of `recon_loss`, as in Gao et al.'s L + alpha * L_aux), scaled by
    min(n_dead / k_aux, 1) as a tensor (no host synchronisation).

    Dividing by the residual's variance instead (sparsify's form, whose main loss is an FVU) made the term about
    d_model times weaker than `recon_loss` here: at aux_coeff 1/32 it moved nothing (`benchmarks/RESULTS.md`,
    TopK defaults)."""
    scale = (dead_mask.sum() / k_aux).clamp(max=1.0)
    return scale * (residual_hat - residual).pow(2).sum(dim=-1).mean()


class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    saelens_architecture = "topk"
    sparsity_field = "k"
    key_fields = ("k", "lr", "aux_coeff")
    config_defaults = {"lr": 4e-3, "lr_warmup_steps": 100, "idle_latents_still": True}
    """The TopK family's defaults, tuned on the embedded default (`benchmarks/RESULTS.md`, "TopK defaults")."""
    sparse_kernel = True

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", *, k: int, k_aux: int | None = None,
                 aux_coeff: float = 1 / 32, kernel: Kernel = "auto"):
        super().__init__(d_in, d_sae, normalize)
        self.k = k
        self.k_aux = min(k_aux or d_in // 2, d_sae - 1)
        self.aux_coeff = aux_coeff
        self.kernel = kernel

    def encode(self, x: Tensor) -> Tensor:
        return topk_latents(self.pre_activations(x), self.k)

    def uses_sparse_kernel(self) -> bool:
        """The training path: `kernel`, or for `auto` the density rule above."""
        if self.kernel != "auto":
            return self.kernel == "sparse"
        return self.k <= SPARSE_MAX_DENSITY * self.d_sae

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor) -> Tensor:
        """AuxK, dense reference: the top-k_aux dead latents reconstruct the residual."""
        residual = (x - x_hat).detach()
        aux_latents = topk_latents(pre.masked_fill(~dead_mask, float("-inf")), self.k_aux)
        return auxk_error(residual, aux_latents @ self.W_dec, dead_mask, self.k_aux)

    def training_latents(self, pre: Tensor) -> Tensor:
        """The sparse code of the dense training forward pass (BatchTopK overrides this)."""
        return topk_latents(pre, self.k)

    def training_selection(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(crow, cols) of the sparse training forward pass; the same latents as `training_latents` keeps."""
        return topk_selection(pre, self.k)

    def forward(self, x: Tensor, sparsity_coeff: float | Tensor = 0.0, dead_mask: Tensor | None = None
                ) -> ForwardOutput:
        """`dead_mask` None skips AuxK altogether (the trainer passes None while no latent can be dead)."""
        with_aux = dead_mask is not None and self.aux_coeff > 0
        if self.uses_sparse_kernel():
            return self._sparse_forward(x, dead_mask if with_aux else None)
        pre = self.pre_activations(x)
        latents = self.training_latents(pre)
        x_hat = self.decode(latents)
        recon = self.recon_loss(x_hat, x)
        aux = self.aux_coeff * self.aux_loss(x, x_hat, pre, dead_mask) if with_aux else recon.new_zeros(())
        return ForwardOutput(x_hat, latents, recon + aux, recon, recon.new_zeros(()), aux)

    def _sparse_code(self, x_c: Tensor, pre: Tensor, crow: Tensor, cols: Tensor) -> SparseCode:
        values = torch.relu(gather_preactivations(x_c, self.b_dec, self.W_enc, self.b_enc, pre, crow, cols))
        return SparseCode(crow, cols, values, self.d_sae)

    def _sparse_forward(self, x: Tensor, dead_mask: Tensor | None) -> ForwardOutput:
        with torch.no_grad():  # the one dense matmul; under autocast it runs in bf16
            x_c = x - self.b_dec
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
        with torch.autocast(x.device.type, enabled=False):  # the sparse kernels run in fp32
            # top-k of pre, not relu(pre): the same kept values once ReLU'd, without a [batch, d_sae] copy
            code = self._sparse_code(x_c, pre, *self.training_selection(pre))
            x_hat = sparse_decode(code, self.W_dec) + self.b_dec
            recon = self.recon_loss(x_hat, x)
            aux = recon.new_zeros(())
            if dead_mask is not None:
                crow, cols = topk_selection(pre.masked_fill(~dead_mask, float("-inf")), self.k_aux)
                aux_code = self._sparse_code(x_c, pre, crow, cols)
                # selected but not dead (fewer than k_aux dead latents): contributes nothing, as in the dense path
                aux_code = aux_code._replace(values=aux_code.values * dead_mask[cols])
                residual = (x - x_hat).detach()
                aux = self.aux_coeff * auxk_error(residual, sparse_decode(aux_code, self.W_dec), dead_mask,
                                                  self.k_aux)
        return ForwardOutput(x_hat, None, recon + aux, recon, recon.new_zeros(()), aux, code)

    def extra_cfg(self) -> dict:
        return {"k": self.k, "activation_fn": "topk", "activation_fn_kwargs": {"k": self.k}}

    @classmethod
    def cfg_kwargs(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"k": cfg["k"]}

    @classmethod
    def config_kwargs(cls, cfg: SAEConfig, d_in: int) -> dict[str, Any]:
        return {"k": cfg.k, "k_aux": cfg.k_aux, "aux_coeff": cfg.aux_coeff, "kernel": cfg.kernel}

    @classmethod
    def penalty_coefficient(cls, cfg: SAEConfig) -> float | None:
        """None: k makes the sparsity structural."""
        return None
