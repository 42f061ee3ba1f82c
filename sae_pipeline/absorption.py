"""First-letter feature absorption (Chanin et al. 2024, "A is for Absorption"), with SAEBench's (0.6.0,
`evals/absorption`) definitions.

On single-token words of the model's vocabulary, read at the word in a fixed template:
- a **letter probe** per first letter: a logistic regression on the raw activations (train words); its direction,
  unit-normed, is the ground truth the SAE is judged against;
- the letter's **main latents**: k-sparse probing on the SAE's latents for k = 1..MAX_SPLIT_K, the latents chosen by
  mean difference (as SAEBench's `sparse_probing` chooses them; its absorption eval fits an L1 probe for that); the
  main latents are those of the largest k reached while each added latent raises the probe's test F1 by more
  than F1_JUMP; `split_latents` = their number - 1 (feature splitting);
- on the test words that start with the letter and that the letter probe classifies as positive, each latent's
  **probe projection** is its activation times the cosine of its decoder row with the probe direction, and the
  word's is its (SAE-input) activation's dot product with the unit probe direction. Then, per word:
  - **full absorption**: no main latent fires (all below EPS), the latent with the largest probe projection has a
    cosine with the probe of at least FULL_COS, and its projection is at least PROJECTION_SHARE of the word's;
  - **absorption fraction**: of the word's probe projection, the share the main latents do not account for and
    up to MAX_ABSORBERS other latents (each with cosine >= FRACTION_COS and positive projection) do: 0 when the
    main latents' projection reaches the word's or those absorbers carry less than PROJECTION_SHARE of it, 1 when
    the main latents' is <= 0, else min(absorbers, word - main) / (that + main).
- Per letter: the **absorption rate** (fully absorbed words / probe-positive words) and the mean absorption
  fraction; the SAE's figures are their means over the letters with probe-positive words (SAEBench's
  `mean_full_absorption_score` and `mean_absorption_fraction_score`), with the mean number of split latents.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from sae_pipeline.probing import MIN_CLASS, LogisticProbe, fit_logistic, mean_difference_latents
from sae_pipeline.saes import SparseAutoencoder

EPS = 1e-8
"""A main latent at or below this does not fire."""
FULL_COS = 0.025
"""Full absorption: the least cosine between the top projecting latent's decoder row and the probe."""
FRACTION_COS = 0.1
"""Absorption fraction: the least cosine of a latent with the probe to count as an absorber."""
PROJECTION_SHARE = 0.4
"""The least share of the word's probe projection the absorbing latent(s) must carry."""
MAX_ABSORBERS = 3
"""Absorption fraction: at most this many absorbing latents are summed."""
MAX_SPLIT_K = 10
"""The largest k tried for a letter's main latents."""
F1_JUMP = 0.03
"""A latent joins the main latents when it raises the k-sparse probe's test F1 by more than this."""
TEST_SHARE = 0.2
"""Share of each letter's words held out (the probes are fitted on the rest)."""


@dataclass(frozen=True)
class WordScores:
    """Absorption of a set of probe-positive words of one letter."""

    fraction: Tensor
    """[m] absorption fraction of each word, in [0, 1]."""
    full: Tensor
    """[m] bool: whether the word is fully absorbed."""


def word_absorption(latents: Tensor, word_projection: Tensor, cosines: Tensor, main: Tensor) -> WordScores:
    """SAEBench's per-word absorption (module docstring) from the words' latents [m, d_sae], their probe
    projection [m], each latent's decoder cosine with the probe [d_sae] and the letter's main latents."""
    latents, word_projection, cosines = latents.double(), word_projection.double(), cosines.double()
    projections = latents * cosines
    is_main = torch.zeros(latents.shape[1], dtype=torch.bool)
    is_main[main] = True
    main_projection = projections[:, is_main].sum(dim=1)
    candidates = torch.where(~is_main & (cosines >= FRACTION_COS) & (projections > 0), projections,
                             torch.zeros_like(projections))
    absorbed = candidates.topk(min(MAX_ABSORBERS, candidates.shape[1]), dim=1).values.sum(dim=1)
    positive = word_projection > 0
    share = torch.where(positive, absorbed / word_projection.clamp(min=EPS), torch.zeros_like(absorbed))
    unaccounted = torch.minimum(absorbed, word_projection - main_projection)
    partial = (unaccounted / (unaccounted + main_projection).clamp(min=EPS)).clamp(0.0, 1.0)
    fraction = torch.where(main_projection <= 0, torch.ones_like(partial), partial)
    fraction = torch.where((main_projection >= word_projection) | (share < PROJECTION_SHARE) | ~positive,
                           torch.zeros_like(fraction), fraction)
    top = projections.max(dim=1)
    top_cosine = cosines[top.indices]
    full = ((latents[:, is_main] < EPS).all(dim=1) & (top_cosine >= FULL_COS) & positive
            & (top.values >= PROJECTION_SHARE * word_projection))
    return WordScores(fraction, full)


def f1_score(predicted: Tensor, actual: Tensor) -> float:
    true_positives = (predicted & actual).sum().item()
    denominator = predicted.sum().item() + actual.sum().item()
    return 2 * true_positives / denominator if denominator else 0.0


def main_latents(train_latents: Tensor, train_y: Tensor, test_latents: Tensor, test_y: Tensor,
                 max_k: int = MAX_SPLIT_K) -> Tensor:
    """A letter's main latents by SAEBench's feature-split rule (module docstring)."""
    best, chosen = -1.0, torch.empty(0, dtype=torch.long)
    for k in range(1, max_k + 1):
        latents = mean_difference_latents(train_latents, train_y, k)
        probe = fit_logistic(train_latents[:, latents], train_y, balanced=True)
        score = f1_score(probe.logits(test_latents[:, latents]) > 0, test_y)
        if score <= best + F1_JUMP:
            break
        best, chosen = score, latents
    return chosen


@dataclass(frozen=True)
class LetterAbsorption:
    letter: str
    probe_positives: int
    """Test words of this letter the letter probe classifies as positive."""
    absorption_rate: float
    absorption_fraction: float
    split_latents: int
    main_latents: list[int]


@dataclass(frozen=True)
class AbsorptionResult:
    absorption_rate: float
    """Mean over letters of the share of probe-positive words fully absorbed."""
    absorption_fraction: float
    """Mean over letters of the mean absorption fraction."""
    split_latents: float
    """Mean over letters of the number of main latents beyond the first."""
    letters: list[LetterAbsorption]

    def as_dict(self) -> dict:
        return asdict(self)


def word_split(letters: Tensor, seed: int, test_share: float = TEST_SHARE) -> tuple[Tensor, Tensor]:
    """(train, test) word indices, `test_share` of each letter's words held out."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for letter in letters.unique():
        rows = torch.nonzero(letters == letter).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_test = max(1, round(len(rows) * test_share))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return torch.cat(train), torch.cat(test)


@dataclass(frozen=True)
class LetterProbes:
    """The SAE-independent half of the eval: the word split and each letter's probe on the raw activations."""

    x: Tensor
    letters: Tensor
    train: Tensor
    test: Tensor
    probes: dict[str, LogisticProbe]
    """Letter -> its probe (letters with fewer than MIN_CLASS train or test words have none)."""
    alphabet: str


def fit_letter_probes(x: Tensor, letters: Tensor, alphabet: str, seed: int) -> LetterProbes:
    """Split the words (`word_split`) and fit a balanced logistic probe per first letter on the train words;
    `letters` index into `alphabet`."""
    train, test = word_split(letters, seed)
    probes = {}
    for index, letter in enumerate(alphabet):
        train_y, test_y = letters[train] == index, letters[test] == index
        if min(int(train_y.sum()), int(test_y.sum())) >= MIN_CLASS:
            probes[letter] = fit_logistic(x[train], train_y, balanced=True)
    return LetterProbes(x, letters, train, test, probes, alphabet)


@torch.no_grad()
def first_letter_absorption(sae: SparseAutoencoder, probes: LetterProbes) -> AbsorptionResult:
    """First-letter absorption of `sae` on the words and letter probes of `probes` (module docstring)."""
    sae = sae.cpu().eval()
    x, letters, train, test = probes.x, probes.letters, probes.train, probes.test
    inputs = sae.inputs(x.float())
    latents = sae.encode(inputs)
    decoder = torch.nn.functional.normalize(sae.W_dec.double(), dim=1)
    results = []
    for letter, probe in probes.probes.items():
        index = probes.alphabet.index(letter)
        train_y, test_y = letters[train] == index, letters[test] == index
        main = main_latents(latents[train], train_y, latents[test], test_y)
        positive = test[test_y & (probe.logits(x[test]) > 0)]
        direction = torch.nn.functional.normalize(probe.direction(), dim=0)
        scores = word_absorption(latents[positive], inputs[positive].double() @ direction, decoder @ direction,
                                 main)
        n = len(positive)
        results.append(LetterAbsorption(
            letter, n, scores.full.double().mean().item() if n else float("nan"),
            scores.fraction.mean().item() if n else float("nan"), max(len(main) - 1, 0), main.tolist()))
    scored = [r for r in results if r.probe_positives]  # a letter without probe-positive words has no rate
    return AbsorptionResult(_mean([r.absorption_rate for r in scored]),
                            _mean([r.absorption_fraction for r in scored]),
                            _mean([float(r.split_latents) for r in results]), results)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
