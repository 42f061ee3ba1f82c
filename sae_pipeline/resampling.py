"""Anthropic-style resampling of dead latents (Towards Monosemanticity, "neuron resampling").

Dead latents are re-initialised toward inputs the SAE reconstructs worst: inputs are drawn with probability
proportional to their squared reconstruction loss, the decoder row becomes the unit input direction, the encoder
column the same direction scaled to a fraction of the mean live encoder norm, the bias zero, and the Adam
moments of every resampled parameter entry are reset so stale momentum does not undo the new direction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_pipeline.saes import SparseAutoencoder

ENCODER_SCALE = 0.2
"""New encoder columns get this fraction of the mean encoder-column norm of live latents."""


@torch.no_grad()
def resample_dead_latents(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead: Tensor, inputs: Tensor,
                          generator: torch.Generator) -> int:
    """Re-initialise the latents in `dead` (bool [d_sae]) from `inputs` [n, d_in]; returns how many."""
    dead_ids = dead.nonzero(as_tuple=True)[0]
    if len(dead_ids) == 0 or len(dead_ids) == sae.d_sae:
        return 0  # nothing dead, or nothing live to take a scale from
    x_hat, _ = sae.reconstruct(inputs)
    loss = (x_hat - inputs).pow(2).sum(dim=-1)
    weights = loss.pow(2).cpu().double()
    if weights.sum() <= 0:
        return 0
    picks = torch.multinomial(weights, len(dead_ids), replacement=len(dead_ids) > len(inputs), generator=generator)
    directions = inputs[picks.to(inputs.device)] - sae.b_dec
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    live_norm = sae.W_enc[:, ~dead].norm(dim=0).mean()
    sae.W_dec[dead_ids] = directions
    sae.W_enc[:, dead_ids] = (directions * live_norm * ENCODER_SCALE).t()
    sae.b_enc[dead_ids] = 0.0
    _reset_adam_state(optimizer, sae, dead_ids)
    return len(dead_ids)


def _reset_adam_state(optimizer: torch.optim.Optimizer, sae: SparseAutoencoder, ids: Tensor) -> None:
    """Zero the Adam moments of the resampled rows/columns (W_enc columns, W_dec rows, b_enc entries)."""
    selectors = {id(sae.W_enc): (slice(None), ids), id(sae.W_dec): (ids,), id(sae.b_enc): (ids,)}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or id(param) not in selectors:
                continue
            for moment in ("exp_avg", "exp_avg_sq"):
                state[moment][selectors[id(param)]] = 0.0
