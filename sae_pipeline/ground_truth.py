"""How well an SAE recovers known features: scores against the planted truth of `sae_pipeline.synthetic`.

Inputs, all on the same held-out tokens: the true unit feature directions D [F, d], the true coefficients
A [n, F] (token t holds sum_f A[t, f] D[f] plus noise), the SAE's decoder W [L, d] (rows in input units) and its
latent activations Z [n, L]. Two matchings pair features with latents one to one (Hungarian method, L >= F):
- the *decoder matching* m(f) maximises the summed cosine(D[f], W[m(f)]); precision/recall, absorption and
  shrinkage use it;
- the *activation matching* maximises the summed Pearson correlation of A[:, f] with Z[:, m(f)]; MCC uses it.

Definitions:
- recovery: mean over features of max_l cosine(D[f], W[l]); recovered_share: share of features whose max is
  >= RECOVERED_COSINE.
- mcc: mean correlation over the activation-matched pairs (a constant column correlates 0 with everything).
- precision / recall: latent m(f) read as a detector of feature f. precision_f = #{t: Z[t, m(f)] > 0 and
  A[t, f] > 0} / #{t: Z[t, m(f)] > 0} (0 when the latent never fires); recall_f = the same count /
  #{t: A[t, f] > 0}. Means over the features active on at least one token.
- absorption (after SAEBench's full-absorption score, with the ground truth in place of its probe): for a
  (parent p, child c) pair and the tokens where both are active, an *absorption event* is a token where the
  parent's latent m(p) is silent while some other active latent writes, along D[p], at least
  ABSORPTION_FRACTION of the parent's true coefficient: max_{l != m(p), Z[t, l] > 0} Z[t, l] (W[l] . D[p]) >=
  ABSORPTION_FRACTION A[t, p]. absorption_rate: share of such tokens that are events, averaged over the pairs;
  absorbed_pairs: pairs whose rate is >= ABSORBED_PAIR_RATE.
- split_features: features with two or more decoder rows at cosine >= SPLIT_COSINE.
- shrinkage: for each recovered feature (cosine(D[f], W[m(f)]) >= RECOVERED_COSINE, so that a misaligned
  latent's smaller projection is not counted as shrinkage), the mean over tokens where both f and m(f) are
  active of Z[t, m(f)] (W[m(f)] . D[f]) / A[t, f] (the latent's write along the feature over the true
  coefficient), then the mean over those features; 1 is unbiased, below 1 the SAE shrinks activations. The
  decoder bias is not credited: an SAE whose b_dec holds part of a frequent feature writes less for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from sae_pipeline.consistency import cosine_matrix, max_matching, unit_rows

RECOVERED_COSINE = 0.9
SPLIT_COSINE = 0.8
"""Above the ~0.71 cosine of a latent that absorbed its parent ((D[p] + D[c]) / sqrt 2), which is not a split."""
ABSORPTION_FRACTION = 0.4
ABSORBED_PAIR_RATE = 0.5


@dataclass(frozen=True)
class GroundTruthScores:
    """One SAE's scores against the planted features (definitions in the module docstring)."""

    recovery: float
    recovered_share: float
    mcc: float
    precision: float
    recall: float
    absorbed_pairs: int
    absorption_rate: float
    split_features: int
    shrinkage: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def recovery(directions: Tensor, decoder: Tensor) -> tuple[float, float]:
    """(mean over features of the best decoder-row cosine, share of features at >= RECOVERED_COSINE)."""
    best = cosine_matrix(directions, decoder).max(dim=1).values
    return best.mean().item(), (best >= RECOVERED_COSINE).double().mean().item()


def decoder_matching(directions: Tensor, decoder: Tensor) -> Tensor:
    """[F] index of the latent matched to each feature by decoder cosine (needs at least F decoder rows)."""
    if len(decoder) < len(directions):
        raise ValueError(f"decoder: {len(decoder)} rows, fewer than the {len(directions)} planted features")
    rows, cols = max_matching(cosine_matrix(directions, decoder))
    return cols[rows.argsort()]


def correlation_matrix(a: Tensor, b: Tensor) -> Tensor:
    """[a.shape[1], b.shape[1]] Pearson correlations between the columns of a and of b (0 for a constant one)."""
    a_c, b_c = a.double() - a.double().mean(dim=0), b.double() - b.double().mean(dim=0)
    return unit_rows(a_c.t()) @ unit_rows(b_c.t()).t()


def mcc(coefficients: Tensor, latents: Tensor) -> float:
    """Mean correlation of each feature's activations with those of its activation-matched latent."""
    correlation = correlation_matrix(coefficients, latents)
    rows, cols = max_matching(correlation)
    return correlation[rows, cols].mean().item()


def detection_precision_recall(coefficients: Tensor, latents: Tensor, match: Tensor) -> tuple[float, float]:
    """Mean precision and recall of latent match[f] as a detector of feature f (module docstring)."""
    feature_on, latent_on = coefficients > 0, latents[:, match] > 0
    both = (feature_on & latent_on).sum(dim=0).double()
    n_feature, n_latent = feature_on.sum(dim=0).double(), latent_on.sum(dim=0).double()
    seen = n_feature > 0
    precision = torch.where(n_latent > 0, both / n_latent.clamp(min=1), torch.zeros_like(both))
    return precision[seen].mean().item(), (both / n_feature.clamp(min=1))[seen].mean().item()


def absorption(directions: Tensor, coefficients: Tensor, decoder: Tensor, latents: Tensor, pairs: Tensor,
               match: Tensor) -> tuple[int, float]:
    """(absorbed pairs, mean absorption rate) over the (parent, child) rows of `pairs` [P, 2] (module docstring).
    Pairs never active together on these tokens are left out of the mean."""
    rates = []
    for parent, child in pairs.tolist():
        tokens = (coefficients[:, parent] > 0) & (coefficients[:, child] > 0)
        if not bool(tokens.any()):
            continue
        z = latents[tokens].double()
        writes = z * (decoder.double() @ unit_rows(directions)[parent])  # [tokens, L]: each latent along D[p]
        writes[:, match[parent]] = 0.0
        writes = writes.masked_fill(z <= 0, float("-inf"))
        absorbed = writes.max(dim=1).values >= ABSORPTION_FRACTION * coefficients[tokens, parent].double()
        events = (z[:, match[parent]] <= 0) & absorbed
        rates.append(events.double().mean().item())
    if not rates:
        return 0, 0.0
    return sum(rate >= ABSORBED_PAIR_RATE for rate in rates), sum(rates) / len(rates)


def split_features(directions: Tensor, decoder: Tensor) -> int:
    """Features with two or more decoder rows at cosine >= SPLIT_COSINE."""
    return int(((cosine_matrix(directions, decoder) >= SPLIT_COSINE).sum(dim=1) >= 2).sum())


def shrinkage(directions: Tensor, coefficients: Tensor, decoder: Tensor, latents: Tensor, match: Tensor) -> float:
    """Mean over recovered features of the matched latent's write along the feature over the true coefficient
    (module docstring); NaN when no recovered feature is ever active together with its latent."""
    along = (decoder.double()[match] * unit_rows(directions)).sum(dim=1)  # W[m(f)] . D[f]
    recovered = along >= RECOVERED_COSINE * decoder.double()[match].norm(dim=1)
    z = latents[:, match].double()
    a = coefficients.double()
    both = (a > 0) & (z > 0) & recovered
    ratio = torch.where(both, z * along / a.clamp(min=1e-12), torch.zeros_like(a))
    count = both.sum(dim=0)
    per_feature = ratio.sum(dim=0)[count > 0] / count[count > 0]
    return per_feature.mean().item() if per_feature.numel() else float("nan")


def score_against_truth(directions: Tensor, coefficients: Tensor, decoder: Tensor, latents: Tensor,
                        pairs: Tensor) -> GroundTruthScores:
    """Every score of the module docstring for one SAE."""
    directions, decoder = directions.detach(), decoder.detach()
    latents = latents.detach()
    match = decoder_matching(directions, decoder)
    mean_cosine, share = recovery(directions, decoder)
    precision, recall = detection_precision_recall(coefficients, latents, match)
    n_absorbed, rate = absorption(directions, coefficients, decoder, latents, pairs, match)
    return GroundTruthScores(
        recovery=mean_cosine, recovered_share=share, mcc=mcc(coefficients, latents), precision=precision,
        recall=recall, absorbed_pairs=n_absorbed, absorption_rate=rate,
        split_features=split_features(directions, decoder),
        shrinkage=shrinkage(directions, coefficients, decoder, latents, match))
