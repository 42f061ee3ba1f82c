"""Held-out metrics of a saved SAE on raw activations, streamed over the eval shards (memory flat in n_tokens).

Definitions (all over the held-out tokens):
- l0: mean number of active latents per token; l0_fraction = l0 / d_sae.
- dead_fraction: latents that never fire; dense_fraction: latents firing on more than 10 % of tokens.
- fvu: sum of squared reconstruction errors / sum of squared deviations of the activations from their
  per-dimension mean; explained_variance = 1 - fvu.
- mse: mean squared error per element; cosine: mean cosine(x, x_hat); l2_ratio: mean ||x_hat|| / ||x||.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sae_pipeline.activations import ActivationStore
from sae_pipeline.saes import SparseAutoencoder

DENSE_THRESHOLD = 0.1


@dataclass(frozen=True)
class EvalMetrics:
    l0: float
    l0_fraction: float
    dead_fraction: float
    dense_fraction: float
    fvu: float
    explained_variance: float
    mse: float
    cosine: float
    l2_ratio: float
    n_tokens: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, store: ActivationStore, device: str | torch.device = "cpu",
                 chunk: int = 4096) -> tuple[EvalMetrics, torch.Tensor]:
    """Metrics and per-latent firing counts on the eval split."""
    sae = sae.to(device).eval()
    d = store.d_model
    fire_counts = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    sum_x = torch.zeros(d, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros(d, dtype=torch.float64, device=device)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # active latents, sse, cosine, l2 ratio
    n = 0
    for x in store.iter_split("eval", chunk):
        x = x.to(device)
        x_hat, latents = sae.reconstruct(x)
        active = latents > 0
        fire_counts += active.sum(dim=0)
        sum_x += x.sum(dim=0, dtype=torch.float64)
        sum_x2 += x.double().pow(2).sum(dim=0)
        x_norm = x.norm(dim=-1).clamp(min=1e-12)
        totals += torch.stack([
            active.sum().double(),
            (x_hat - x).double().pow(2).sum(),
            torch.nn.functional.cosine_similarity(x_hat, x, dim=-1, eps=1e-12).double().sum(),
            (x_hat.norm(dim=-1) / x_norm).double().sum(),
        ])
        n += len(x)
    total_variance = (sum_x2 - sum_x.pow(2) / n).sum().clamp(min=1e-30)
    active_total, sse, cosine, l2_ratio = totals.tolist()
    fvu = sse / total_variance.item()
    frequency = fire_counts / n
    metrics = EvalMetrics(
        l0=active_total / n,
        l0_fraction=active_total / n / sae.d_sae,
        dead_fraction=(frequency == 0).double().mean().item(),
        dense_fraction=(frequency > DENSE_THRESHOLD).double().mean().item(),
        fvu=fvu,
        explained_variance=1.0 - fvu,
        mse=sse / (n * d),
        cosine=cosine / n,
        l2_ratio=l2_ratio / n,
        n_tokens=n,
    )
    return metrics, fire_counts.cpu()
