"""Held-out metrics of a saved SAE on raw activations, streamed over the eval shards (memory flat in n_tokens).

Definitions (all over the held-out tokens t, on raw activations x_t and their reconstructions x_hat_t):
- l0: mean number of active latents per token; l0_fraction = l0 / d_sae.
- dead_fraction: latents that never fire; frequent_fraction: latents firing on more than 1 % of tokens;
  dense_fraction: on more than 10 %.
- fvu: sum_t ||x_hat_t - x_t||^2 / sum_t ||x_t - mean||^2, the mean being the per-dimension mean of the
  held-out activations (against the mean, not against zero: a reconstruction that outputs the mean scores
  fvu 1, explained variance 0); explained_variance = 1 - fvu.
- mse: mean squared error per element; cosine: mean cosine(x, x_hat); l2_ratio: mean ||x_hat|| / ||x||.
- relative_reconstruction_bias (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
  Autoencoders", their measure of shrinkage): the gamma minimising
  sum_t ||x_hat_t / gamma - x_t||^2, in closed form sum_t ||x_hat_t||^2 / sum_t <x_hat_t, x_t> (the inverse of
  the best rescaling <x_hat, x> / ||x_hat||^2). 1 is unbiased; below 1 the reconstructions are shrunk
  (x_hat ~ gamma * x), as an L1 penalty does; NaN when sum_t <x_hat_t, x_t> is 0.
- decoder_max_cosine_mean / decoder_max_cosine_max: for each latent, the largest cosine between its decoder row
  and any other latent's; the mean over latents, and the largest of all (near 1: duplicated latents).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from sae_pipeline.saes import SparseAutoencoder
from sae_pipeline.store import ActivationStore

DENSE_THRESHOLD = 0.1
FREQUENT_THRESHOLD = 0.01
COSINE_CHUNK = 1024
"""Decoder rows compared at once in `decoder_max_cosines` (memory COSINE_CHUNK x d_sae)."""


@dataclass(frozen=True)
class EvalMetrics:
    l0: float
    l0_fraction: float
    dead_fraction: float
    dense_fraction: float
    frequent_fraction: float
    fvu: float
    explained_variance: float
    mse: float
    cosine: float
    l2_ratio: float
    relative_reconstruction_bias: float
    decoder_max_cosine_mean: float
    decoder_max_cosine_max: float
    n_tokens: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def reported(self) -> dict[str, float]:
        """The metrics of REPORTED_METRICS, in that order (the `sae` metadata and the sweep report's columns)."""
        return {name: getattr(self, name) for name in REPORTED_METRICS}


REPORTED_METRICS: tuple[str, ...] = tuple(f.name for f in fields(EvalMetrics) if f.name != "n_tokens")
"""The one list of held-out metrics: every EvalMetrics field but the token count, so a new metric is one field."""


@dataclass(frozen=True)
class TaskMetrics:
    """An SAE's figures on the real tasks: what the `sae` metadata, summary.json and the sweep report show."""

    absorption_rate: float
    """Mean over letters of the share of probe-positive words fully absorbed (lower is better)."""
    absorption_fraction: float
    """Mean over letters of the mean absorption fraction, partial absorption included (lower is better)."""
    split_latents: float
    """Mean over letters of the main latents beyond the first (feature splitting)."""
    probe_acc_k1: float
    """Test accuracy of the 1-sparse probe on the SAE's latents: the mean over task families (first letter,
    package, doctest) of each family's mean over its tasks."""
    probe_acc_k2: float
    probe_acc_k5: float
    probe_acc_k10: float
    probe_acc_k20: float
    probe_acc_k5_first_letter: float
    """The 5-sparse probe's mean over one family's tasks (NaN when the family could not be built)."""
    probe_acc_k5_package: float
    probe_acc_k5_doctest: float
    probe_acc_dense: float
    """The ceiling: a probe on the raw activations, same splits, same means."""
    probe_acc_dense_first_letter: float
    probe_acc_dense_package: float
    probe_acc_dense_doctest: float
    probe_acc_random_k1: float
    """The floor: the 1-sparse probe on a randomly initialised SAE of the same architecture and shape."""
    probe_acc_random_k2: float
    probe_acc_random_k5: float
    probe_acc_random_k10: float
    probe_acc_random_k20: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


TASK_METRICS: tuple[str, ...] = tuple(f.name for f in fields(TaskMetrics))
"""Every TaskMetrics field, in order: the real-task part of the one metric list (`eval_tasks` computes them)."""
TASK_BASELINES: tuple[str, ...] = tuple(name for name in TASK_METRICS if name.startswith(("probe_acc_dense",
                                                                                       "probe_acc_random")))
"""The probing ceiling and floor: what the SAE's accuracies are read against, not figures of the SAE itself."""
REPORTED_TASK_METRICS: tuple[str, ...] = tuple(name for name in TASK_METRICS if name not in TASK_BASELINES)
"""The SAE's own real-task figures: the sweep report's statistics and correlations include them."""


@torch.no_grad()
def decoder_max_cosines(W_dec: torch.Tensor, chunk: int = COSINE_CHUNK) -> torch.Tensor:
    """[d_sae]: each decoder row's largest cosine with any other row, COSINE_CHUNK rows at a time."""
    rows = W_dec.double()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
    best = torch.empty(len(rows), dtype=torch.float64, device=rows.device)
    for start in range(0, len(rows), chunk):
        cosines = rows[start:start + chunk] @ rows.t()
        cosines[:, start:start + chunk].fill_diagonal_(float("-inf"))
        best[start:start + chunk] = cosines.max(dim=1).values
    return best


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, store: ActivationStore, device: str | torch.device = "cpu",
                 chunk: int = 4096) -> tuple[EvalMetrics, torch.Tensor]:
    """Metrics and per-latent firing counts on the eval split."""
    sae = sae.to(device).eval()
    d = store.d_model
    fire_counts = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    sum_x = torch.zeros(d, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros(d, dtype=torch.float64, device=device)
    # active latents, sse, cosine, l2 ratio, sum ||x_hat||^2, sum <x_hat, x>
    totals = torch.zeros(6, dtype=torch.float64, device=device)
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
            x_hat.double().pow(2).sum(),
            (x_hat.double() * x.double()).sum(),
        ])
        n += len(x)
    total_variance = (sum_x2 - sum_x.pow(2) / n).sum().clamp(min=1e-30)
    active_total, sse, cosine, l2_ratio, hat_squared, hat_dot_x = totals.tolist()
    fvu = sse / total_variance.item()
    frequency = fire_counts / n
    max_cosines = decoder_max_cosines(sae.W_dec) if sae.d_sae > 1 else torch.full((1,), float("nan"))
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
        frequent_fraction=(frequency > FREQUENT_THRESHOLD).double().mean().item(),
        relative_reconstruction_bias=hat_squared / hat_dot_x if hat_dot_x else float("nan"),
        decoder_max_cosine_mean=max_cosines.mean().item(),
        decoder_max_cosine_max=max_cosines.max().item(),
    )
    return metrics, fire_counts.cpu()
