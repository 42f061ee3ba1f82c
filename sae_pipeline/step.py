"""One optimiser step of the trainer, importable where only torch is installed (`sae_pipeline.bench`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from sae_pipeline.saes.base import ForwardOutput, SparseAutoencoder


def make_optimizer(sae: SparseAutoencoder, lr: float, device: torch.device,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam; the fused kernel where PyTorch has one (CPU, CUDA): one pass over the parameters instead of one per
    operation, the same update."""
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))


def training_step(sae: SparseAutoencoder, forward: Callable[..., ForwardOutput], optimizer: torch.optim.Optimizer,
                  x: torch.Tensor, sparsity_coeff: float, dead_mask: torch.Tensor | None, grad_clip: float,
                  autocast: contextlib.AbstractContextManager) -> ForwardOutput:
    """Forward (`forward` is the SAE or its compiled form), backward, decoder-gradient projection, clipping,
    Adam, unit-norm decoder, the architecture's post-step hook. No host synchronisation."""
    with autocast:
        out = forward(x, sparsity_coeff, dead_mask)
    out.loss.backward()
    if sae.unit_norm_decoder:
        sae.remove_gradient_parallel_to_decoder()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if sae.unit_norm_decoder:
        sae.set_decoder_norm_to_unit()
    sae.after_step(out)
    return out


def update_firing(tokens_since_fired: torch.Tensor, out: ForwardOutput, n_tokens: int) -> None:
    """Tokens since each latent last fired, from what the forward already computed."""
    tokens_since_fired.add_(n_tokens).masked_fill_(out.fired(), 0)
