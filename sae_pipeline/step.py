"""One optimiser step of the trainer, importable where only torch is installed (`sae_pipeline.bench`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from sae_pipeline.saes.base import ForwardOutput, SparseAutoencoder


def make_optimizer(sae: SparseAutoencoder, lr: float, device: torch.device,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam; the fused kernel where PyTorch has one (CPU, CUDA): one pass over the parameters instead of one per
    operation, the same update."""
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))


def training_step(sae: SparseAutoencoder, forward: Callable[..., ForwardOutput], optimizer: torch.optim.Optimizer,
                  x: torch.Tensor, sparsity_coeff: float, dead_mask: torch.Tensor | None, grad_clip: float,
                  autocast: contextlib.AbstractContextManager, idle_latents_still: bool = False) -> ForwardOutput:
    """Forward (`forward` is the SAE or its compiled form), backward, decoder-gradient projection, clipping,
    Adam (with `idle_latents_still`, see `hold_idle_latents`), unit-norm decoder, the architecture's post-step
    hook. No host synchronisation."""
    with autocast:
        out = forward(x, sparsity_coeff, dead_mask)
    out.loss.backward()
    if sae.unit_norm_decoder:
        sae.remove_gradient_parallel_to_decoder()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    if idle_latents_still:
        with hold_idle_latents(sae):
            optimizer.step()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if sae.unit_norm_decoder:
        sae.set_decoder_norm_to_unit()
    sae.after_step(out)
    return out


@contextlib.contextmanager
def hold_idle_latents(sae: SparseAutoencoder, by_index: bool | None = None) -> Iterator[None]:
    """Around an optimiser step: latents that got no gradient this step (not selected, nor used by AuxK) keep
    their encoder column, decoder row and encoder bias, as lazy (sparse) Adam leaves rows without a gradient
    alone. Plain Adam would go on moving them by their momentum for ~1 / (1 - beta1) steps after they
    stop firing; at the learning rates TopK trains well at, that drift is what left latents dead on held-out
    tokens (`benchmarks/RESULTS.md`, TopK defaults). Their Adam moments still decay as Adam decays them.
    `by_index` (default: on the CPU only) copies just the idle latents instead of whole weights; the same result."""
    if sae.W_dec.grad is None:
        yield
        return
    has_b_enc = getattr(sae, "b_enc", None) is not None and sae.b_enc.grad is not None  # Gated has none
    # a latent with no gradient on its encoder bias had none anywhere: it fed no pre-activation that was kept
    idle = sae.b_enc.grad.eq(0) if has_b_enc else sae.W_dec.grad.eq(0).all(dim=1)
    # (parameter, the dimension of its latents)
    params = [(sae.W_enc, 1), (sae.W_dec, 0)] + ([(sae.b_enc, 0)] if has_b_enc else [])
    if by_index if by_index is not None else idle.device.type == "cpu":  # counting them is free on the host
        ids = idle.nonzero(as_tuple=True)[0]
        kept = [param.detach().index_select(dim, ids) for param, dim in params]
        yield
        with torch.no_grad():
            for (param, dim), before in zip(params, kept, strict=True):
                param.index_copy_(dim, ids, before)
        return
    # on an accelerator their number would synchronise with the host: full copies and a `where`
    kept = [param.detach().clone() for param, _ in params]
    yield
    with torch.no_grad():
        for (param, dim), before in zip(params, kept, strict=True):
            mask = idle[None, :] if dim == 1 else (idle[:, None] if param.dim() == 2 else idle)
            param.copy_(torch.where(mask, before, param))


def update_firing(tokens_since_fired: torch.Tensor, out: ForwardOutput, n_tokens: int) -> None:
    """Tokens since each latent last fired, from what the forward already computed."""
    tokens_since_fired.add_(n_tokens).masked_fill_(out.fired(), 0)
