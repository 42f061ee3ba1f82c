"""A ground-truth benchmark: activations built from known sparse features, and every architecture scored on them.

The planted world (`plant_features`): `n_features` random unit directions in `d_model` (more features than
dimensions: superposition). Each token is a sparse non-negative combination of them plus Gaussian noise:
- *root* features fire with Zipf-like marginal frequencies, p(rank r) = min(max_frequency, c (r + 1)^-s), with
  c solved so that the expected number of active features per token is `planted_l0`;
- *correlated* groups of roots fire through a Gaussian copula (one shared normal per group, correlation
  `correlation` between members' latent normals), which keeps each member's marginal frequency;
- *hierarchical* features: each parent (a root among the most frequent ones) has `children_per_parent` children,
  and when the parent fires one of its children, chosen uniformly, fires with probability `child_given_parent`.
  A child never fires without its parent: the setup in which an SAE saves a latent by folding the parent into
  the child's latent (feature absorption; Chanin et al. 2024, "A is for Absorption");
- active coefficients are uniform in [MIN_COEFFICIENT, MAX_COEFFICIENT].

`run_synthetic_benchmark` writes the tokens as an activation store, trains one SAE per architecture on it with
the project's trainer (all in one lockstep group), and scores each against the truth (`sae_pipeline.ground_truth`)
on held-out tokens drawn from the same world.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import polars as pl
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from sae_pipeline.activations import norm_statistics
from sae_pipeline.config import MAX_SEED, ConfigError, Int, SAEConfig, architecture_default
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.ground_truth import RECOVERED_COSINE, GroundTruthScores, recovery, score_against_truth
from sae_pipeline.markdown import markdown_table
from sae_pipeline.plots import figure_png
from sae_pipeline.saes import SparseAutoencoder
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.store import META_FILE, ActivationStore, ShardWriter
from sae_pipeline.training import TrainResult, train_group

MIN_COEFFICIENT, MAX_COEFFICIENT = 0.5, 1.5
SEQUENCE_LENGTH = 64
"""Synthetic tokens are grouped into sequences of this length in the store's `locations` (nothing reads order)."""
SHARD_TOKENS = 32_768
CHUNK_TOKENS = 8_192
"""Tokens sampled and written at a time (memory flat in n_train_tokens)."""
L0_BAND = 2.0
"""An architecture competes for least absorption when its held-out L0 is within this factor of the planted L0."""
MIN_COMPETING_MCC = 0.5
"""... and when its latents track the features (MCC at least this): an SAE collapsed onto a few dense latents
absorbs nothing, trivially, as a dense one does."""
TARGET_RECOVERED_SHARE = 0.9
"""Issue 13's target: TopK-style SAEs recover this share of the planted features at cosine >= 0.9."""
TARGET_ARCHITECTURES = ("topk", "matryoshka")
"""The architectures issue 13's target names."""
SPARSITY_DEFAULTS: dict[str, float] = {"l1_alpha": 1.0, "l0_coeff": 1.0}
"""Sparsity coefficients of architectures set by a penalty (an L1: `relu`, `gated`; an L0 toward the planted L0:
`jumprelu`), unless SPARSITY_BY_ARCHITECTURE sets theirs."""
SPARSITY_BY_ARCHITECTURE: dict[str, dict[str, float]] = {"relu": {"l1_alpha": 3.0}, "gated": {"l1_alpha": 4.0}}
"""The L1 coefficients on the default world: `gated` lands near the planted L0; `relu` at a coefficient that would
land there recovers far fewer features (its L1 shrinks them), so it trains at a weaker one
(`benchmarks/RESULTS.md`)."""


class SyntheticSpec(BaseModel):
    """What the benchmark plants, and the training budget every architecture gets on it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    d_model: Int = Field(64, ge=4, le=4096)
    """Width of the synthetic activations."""
    n_features: Int = Field(256, ge=2, le=65536)
    """Planted feature directions (unit vectors)."""
    planted_l0: float = Field(6.0, gt=0.0)
    """Expected number of active features per token; TopK-style SAEs train with k = round(planted_l0)."""
    zipf_exponent: float = Field(1.0, ge=0.0, le=4.0)
    """s of the root features' frequencies, proportional to (rank + 1)^-s before the cap."""
    max_frequency: float = Field(0.16, gt=0.0, le=1.0)
    """Cap on a root feature's firing frequency. 0.16 is that of a published SynthSAEBench world. At 0.5 the
    two capped features are near-dense, and a TopK SAE at k = the planted L0 folds them into b_dec and encodes
    each as "this one without that one" (cosine 0.84; benchmarks/RESULTS.md): a finding about dense features
    that the recovery share would mix up with the sparse ones."""
    n_parents: Int = Field(8, ge=0)
    """Parent features, each with `children_per_parent` children that fire only with it."""
    children_per_parent: Int = Field(3, ge=1, le=64)
    """Children of each parent (mutually exclusive: at most one fires per token)."""
    child_given_parent: float = Field(0.6, gt=0.0, le=1.0)
    """Probability that one of a firing parent's children fires with it."""
    n_correlated_groups: Int = Field(8, ge=0)
    """Groups of root features that tend to fire together."""
    correlated_group_size: Int = Field(3, ge=2, le=64)
    """Features per correlated group."""
    correlation: float = Field(0.5, ge=0.0, lt=1.0)
    """Correlation of the normals behind the members of a group (Gaussian copula)."""
    noise_std: float = Field(0.02, ge=0.0, le=10.0)
    """Standard deviation of the Gaussian noise added to each dimension."""
    n_train_tokens: Int = Field(131_072, ge=1024, le=10_000_000)
    """Tokens written to the train split (training repeats them for `train_tokens`)."""
    n_eval_tokens: Int = Field(16_384, ge=256, le=1_000_000)
    """Held-out tokens every score is computed on."""
    expansion_factor: Int = Field(8, ge=1, le=256)
    """d_sae = expansion_factor * d_model; at least n_features, so every feature can have its own latent."""
    train_tokens: Int = Field(4_096_000, ge=1024)
    """Training tokens per SAE. At a quarter of this (the default before), on the world capped at 0.5, Matryoshka
    recovered 70 % of the features and missed the rare ones (0.4 % of tokens); at this budget 95-98 % over three
    seeds (benchmarks/RESULTS.md)."""
    batch_size: Int = Field(512, ge=16, le=65536)
    """Tokens per training step."""
    lr: float | None = Field(None, gt=0.0, le=1.0)
    """Adam learning rate of every architecture; None: each its own default (`config_defaults`). One lr of
    3e-3 for all, the setting before, collapsed `jumprelu` (97 % dead, MCC 0.04) and cost `gated` and `relu`
    recovered features (benchmarks/RESULTS.md)."""
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the planted world, its tokens and the SAEs' initialisation."""

    @model_validator(mode="after")
    def _fits(self) -> SyntheticSpec:
        roles = self.n_parents * (1 + self.children_per_parent) + self.n_correlated_groups * self.correlated_group_size
        if roles > self.n_features:
            raise ValueError(f"n_features: {self.n_features} is fewer than the {roles} features the hierarchy and "
                             "the correlated groups need (n_parents x (1 + children_per_parent) + "
                             "n_correlated_groups x correlated_group_size); raise it or shrink those")
        if self.expansion_factor * self.d_model < self.n_features:
            raise ValueError(f"expansion_factor: d_sae = {self.expansion_factor} x {self.d_model} is below "
                             f"n_features {self.n_features}; allowed: >= {math.ceil(self.n_features / self.d_model)}")
        if self.planted_l0 > (most := max_planted_l0(self)):
            raise ValueError(f"planted_l0: {self.planted_l0} is above {most:.3g}, what every feature firing at "
                             "max_frequency gives; allowed: (0, that]")
        return self

    @property
    def n_roots(self) -> int:
        return self.n_features - self.n_parents * self.children_per_parent

    @property
    def k(self) -> int:
        """The planted L0 as the k of TopK-style SAEs."""
        return max(1, round(self.planted_l0))


def max_planted_l0(spec: SyntheticSpec) -> float:
    """Expected active features per token when every root fires at max_frequency."""
    return spec.max_frequency * (spec.n_roots + spec.n_parents * spec.child_given_parent)


@dataclass(frozen=True)
class PlantedFeatures:
    """The ground truth: directions and how each feature fires."""

    directions: Tensor
    """[n_features, d_model] unit rows."""
    frequency: Tensor
    """[n_features] marginal firing probability of each root feature; 0 for children (they fire via a parent)."""
    group: Tensor
    """[n_features] index of the feature's correlated group, -1 for none."""
    children: Tensor
    """[n_parents, children_per_parent] ids of each parent's children; parent j is feature j."""
    child_given_parent: float
    correlation: float
    noise_std: float

    @property
    def pairs(self) -> Tensor:
        """[n_parents x children_per_parent, 2] (parent, child) ids."""
        parents = torch.arange(len(self.children)).repeat_interleave(self.children.shape[1])
        return torch.stack([parents, self.children.flatten()], dim=1)

    def expected_l0(self) -> float:
        parents = self.frequency[: len(self.children)]
        return (self.frequency.sum() + parents.sum() * self.child_given_parent).item()


def plant_features(spec: SyntheticSpec) -> PlantedFeatures:
    """The planted world of `spec` (module docstring), deterministic in `spec.seed`.

    Feature ids: parents 0..n_parents-1, then their children, then the correlated groups, then free roots.
    Parents take random ranks among the 2 x n_parents most frequent (frequent enough that their children are
    learnable), the other roots (grouped and free) the remaining ranks at random.
    """
    generator = torch.Generator().manual_seed(spec.seed)
    directions = torch.randn(spec.n_features, spec.d_model, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    n_parents, n_children = spec.n_parents, spec.n_parents * spec.children_per_parent
    roots = torch.cat([torch.arange(n_parents), torch.arange(n_parents + n_children, spec.n_features)])
    top = min(2 * n_parents, len(roots))
    parent_ranks = torch.randperm(top, generator=generator)[:n_parents]
    rest = torch.ones(len(roots), dtype=torch.bool)
    rest[parent_ranks] = False
    other_ranks = torch.arange(len(roots))[rest][torch.randperm(len(roots) - n_parents, generator=generator)]
    ranks = torch.cat([parent_ranks, other_ranks])
    weights = torch.zeros(spec.n_features, dtype=torch.float64)
    weights[roots] = (ranks + 1).double().pow(-spec.zipf_exponent)
    frequency = _solve_scale(weights, spec.max_frequency,
                             lambda f: f.sum() + spec.child_given_parent * f[:n_parents].sum(), spec.planted_l0)
    group = torch.full((spec.n_features,), -1, dtype=torch.long)
    first = n_parents + n_children
    n_grouped = spec.n_correlated_groups * spec.correlated_group_size
    group[first:first + n_grouped] = torch.arange(spec.n_correlated_groups).repeat_interleave(
        spec.correlated_group_size)
    children = (n_parents + torch.arange(n_children)).reshape(n_parents, spec.children_per_parent)
    return PlantedFeatures(directions.float(), frequency.float(), group, children, spec.child_given_parent,
                           spec.correlation, spec.noise_std)


def _solve_scale(weights: Tensor, cap: float, expected: Callable[[Tensor], Tensor], total: float) -> Tensor:
    """min(cap, c x weights) with c set by bisection so that expected(frequencies) = total (it grows with c;
    `SyntheticSpec` checks that the cap leaves `total` reachable)."""
    low, high = 0.0, cap / weights[weights > 0].min().item()
    for _ in range(100):
        middle = (low + high) / 2
        if expected((middle * weights).clamp(max=cap)).item() < total:
            low = middle
        else:
            high = middle
    return (high * weights).clamp(max=cap)


def sample_tokens(features: PlantedFeatures, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(activations [n, d_model], true coefficients [n, n_features]) of n tokens of the planted world."""
    n_features = len(features.frequency)
    normals = torch.randn(n, n_features, generator=generator, dtype=torch.float64)
    grouped = features.group >= 0
    if bool(grouped.any()):
        shared = torch.randn(n, int(features.group.max()) + 1, generator=generator, dtype=torch.float64)
        rho = features.correlation
        normals[:, grouped] = math.sqrt(rho) * shared[:, features.group[grouped]] + math.sqrt(1 - rho) * normals[
            :, grouped]
    # a root fires when its normal exceeds the (1 - p) quantile; children (p = 0) never fire here
    active = normals > torch.special.ndtri(1 - features.frequency.double())
    n_parents, per_parent = features.children.shape
    if n_parents:
        triggered = active[:, :n_parents] & (torch.rand(n, n_parents, generator=generator) <
                                             features.child_given_parent)
        which = torch.randint(per_parent, (n, n_parents), generator=generator)
        child = features.children[torch.arange(n_parents), which]  # [n, n_parents]
        rows = torch.arange(n)[:, None].expand_as(child)
        active[rows[triggered], child[triggered]] = True
    magnitude = MIN_COEFFICIENT + (MAX_COEFFICIENT - MIN_COEFFICIENT) * torch.rand(n, n_features,
                                                                                    generator=generator)
    coefficients = magnitude * active
    noise = features.noise_std * torch.randn(n, features.directions.shape[1], generator=generator)
    return coefficients @ features.directions + noise, coefficients


def write_planted_store(features: PlantedFeatures, spec: SyntheticSpec, folder: Path) -> tuple[Tensor, Tensor]:
    """Write `spec.n_train_tokens` + `spec.n_eval_tokens` tokens as an activation store in `folder` (the
    `activations` layout the trainer reads); returns the eval split's (activations, true coefficients)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(spec.seed + 1)
    writers = {split: ShardWriter(folder, split, SHARD_TOKENS, torch.float32) for split in ("train", "eval")}
    train_norms, evals = [], []
    first_eval_sequence = math.ceil(spec.n_train_tokens / SEQUENCE_LENGTH)
    for split, n_tokens, offset in (("train", spec.n_train_tokens, 0),
                                    ("eval", spec.n_eval_tokens, first_eval_sequence * SEQUENCE_LENGTH)):
        for start in range(0, n_tokens, CHUNK_TOKENS):
            x, coefficients = sample_tokens(features, min(CHUNK_TOKENS, n_tokens - start), generator)
            index = offset + torch.arange(len(x))
            writers[split].add(x, torch.stack([index // SEQUENCE_LENGTH, index % SEQUENCE_LENGTH], 1).int())
            offset += len(x)
            if split == "train":
                train_norms.append(x.norm(dim=1))
            else:
                evals.append((x, coefficients))
    shards = {split: writer.close() for split, writer in writers.items()}
    meta = {
        "model": "synthetic", "layer": 0, "hook": "planted sparse features (sae_pipeline.synthetic)",
        "dtype": "float32", "d_model": spec.d_model, "n_tokens": spec.n_train_tokens + spec.n_eval_tokens,
        "n_train_tokens": spec.n_train_tokens, "n_eval_tokens": spec.n_eval_tokens,
        "train_shards": shards["train"], "eval_shards": shards["eval"],
        "eval_sequence_ids": list(range(first_eval_sequence, math.ceil(offset / SEQUENCE_LENGTH))),
        "locations": "tensor `locations` [n, 2] int32: (token index // 64, token index % 64)",
        "exclude_special_tokens": False, "n_nonfinite_tokens": 0,
        "norm_stats": norm_statistics(torch.cat(train_norms), spec.d_model),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return torch.cat([x for x, _ in evals]), torch.cat([c for _, c in evals])


# --- the benchmark: one SAE per architecture, scored against the truth ---------------------------------------

SPARSITY_CANDIDATES: tuple[tuple[str, ...], ...] = (("k",), ("l1_alpha",), ("l0_coeff", "target_l0"))
"""How a benchmark config sets an architecture's sparsity: the first of these field sets its SAEConfig accepts
(k = the planted L0; l1_alpha; l0_coeff with target_l0 = the planted L0). An architecture added to the registry
later gets the first set it validates with, or is reported as skipped with the reason."""


def sparsity_values(spec: SyntheticSpec, architecture: str) -> dict[str, float | int]:
    """The value of each field of SPARSITY_CANDIDATES for an architecture."""
    return {"k": spec.k, **SPARSITY_DEFAULTS, **SPARSITY_BY_ARCHITECTURE.get(architecture, {}),
            "target_l0": spec.planted_l0 / (spec.expansion_factor * spec.d_model)}


def benchmark_config(architecture: str, spec: SyntheticSpec) -> SAEConfig:
    """The config an architecture trains with: the spec's budget, the spec's lr or else the architecture's, the
    architecture's warmup up to a tenth of the steps, its sparsity from SPARSITY_CANDIDATES; ConfigError with
    each candidate's reason when none validates."""
    steps = max(1, spec.train_tokens // spec.batch_size)
    warmup = min(architecture_default("lr_warmup_steps", architecture), steps // 10)
    base = {"architecture": architecture, "expansion_factor": spec.expansion_factor, "batch_size": spec.batch_size,
            "train_tokens": spec.train_tokens, "seed": spec.seed, "log_every": max(1, steps // 20),
            "lr_warmup_steps": warmup, "dead_tokens": max(spec.batch_size, spec.train_tokens // 10),
            "checkpoint_every": steps}  # as long as the run: never checkpoints (the last step is not)
    if spec.lr is not None:
        base["lr"] = spec.lr
    values, reasons = sparsity_values(spec, architecture), []
    for fields in SPARSITY_CANDIDATES:
        try:
            cfg = parse_sae_config({**base, **{name: values[name] for name in fields}}, where=architecture)
            cfg.validate_for_model(spec.d_model)
            return cfg
        except ConfigError as error:
            reasons.append(str(error))
    raise ConfigError(f"architecture {architecture!r}: no benchmark config validates: " + " | ".join(reasons))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads. The benchmark's matmuls are tiny: threads gain nothing, and on a shared
    2-core machine threads contending for cores slow the training loop down several-fold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def latents_of(sae: SparseAutoencoder, x: Tensor, chunk: int = 4096) -> Tensor:
    """[n, d_sae] latent activations of raw inputs."""
    sae.eval()
    return torch.cat([sae.reconstruct(x[start:start + chunk])[1] for start in range(0, len(x), chunk)])


class BenchmarkResult(NamedTuple):
    """What `run_synthetic_benchmark` measured."""

    table: pl.DataFrame
    """One row per architecture: BENCHMARK_SCHEMA and `absorbs_least`."""
    measured_l0: float
    """Mean number of active planted features per held-out token."""
    train_seconds: float
    """Wall time of the lockstep training of every architecture."""


def run_synthetic_benchmark(spec: SyntheticSpec, architectures: Sequence[str], scratch: Path,
                            device: str = "cpu") -> BenchmarkResult:
    """Plant the world, write its store under `scratch`, train one SAE per architecture (in one lockstep group)
    and score each on the held-out tokens (`benchmark_markdown` explains the columns). An architecture without
    a valid config, or whose training fails, gets a row with its `status` and no scores. On a CPU it runs
    with one intra-op thread (`torch_threads`)."""
    with torch_threads(1) if torch.device(device).type == "cpu" else contextlib.nullcontext():
        return _run(spec, architectures, scratch, device)


def _run(spec: SyntheticSpec, architectures: Sequence[str], scratch: Path, device: str) -> BenchmarkResult:
    features = plant_features(spec)
    eval_x, eval_coefficients = write_planted_store(features, spec, scratch / "activations")
    store = ActivationStore(scratch / "activations")
    configs, rows = {}, {}
    for architecture in architectures:
        try:
            configs[architecture] = benchmark_config(architecture, spec)
        except ConfigError as error:
            rows[architecture] = {"architecture": architecture, "status": f"skipped: {error}"}
    results = train_group(list(configs.values()), store, device) if configs else []
    for (architecture, cfg), result in zip(configs.items(), results, strict=True):
        rows[architecture] = (_failed_row(architecture, result) if isinstance(result, Exception) else
                              _scored_row(cfg, result, store, features, eval_x, eval_coefficients))
    table = _with_least_absorption(pl.DataFrame([rows[a] for a in architectures], schema=BENCHMARK_SCHEMA),
                                   spec.planted_l0)
    seconds = next((r.wall_seconds for r in results if isinstance(r, TrainResult)), 0.0)
    return BenchmarkResult(table, (eval_coefficients > 0).sum(dim=1).double().mean().item(), seconds)


BENCHMARK_SCHEMA: dict[str, pl.DataType] = {
    "architecture": pl.String(), "status": pl.String(), "key": pl.String(), "l0": pl.Float64(),
    "fvu": pl.Float64(), "dead_fraction": pl.Float64(),
    **{name: pl.Int64() if name in ("absorbed_pairs", "split_features") else pl.Float64()
       for name in GroundTruthScores.__dataclass_fields__},
    "children_recovered_share": pl.Float64(),
}


def _failed_row(architecture: str, error: Exception) -> dict:
    return {"architecture": architecture, "status": f"failed: {type(error).__name__}: {error}"}


def _scored_row(cfg: SAEConfig, result: TrainResult, store: ActivationStore, features: PlantedFeatures,
                eval_x: Tensor, eval_coefficients: Tensor) -> dict:
    metrics, _ = evaluate_sae(result.sae, store)
    decoder = result.sae.W_dec.detach()
    scores = score_against_truth(features.directions, eval_coefficients, decoder, latents_of(result.sae, eval_x),
                                 features.pairs)
    children = features.children.flatten()
    _, children_share = recovery(features.directions[children], decoder) if len(children) else (0.0, math.nan)
    return {"architecture": cfg.architecture, "status": "ok", "key": cfg.partition_key(), "l0": metrics.l0,
            "fvu": metrics.fvu, "dead_fraction": metrics.dead_fraction, **scores.as_dict(),
            "children_recovered_share": children_share}


def _with_least_absorption(table: pl.DataFrame, planted_l0: float) -> pl.DataFrame:
    """Add `absorbs_least`: among the scored rows whose held-out L0 is within L0_BAND of the planted L0 (a dense
    SAE absorbs nothing, trivially) and whose MCC is at least MIN_COMPETING_MCC, those with the fewest absorbed
    pairs, ties broken by the absorption rate."""
    low, high = planted_l0 / L0_BAND, planted_l0 * L0_BAND
    scored = table.filter((pl.col("status") == "ok") & pl.col("l0").is_between(low, high)
                          & (pl.col("mcc") >= MIN_COMPETING_MCC))
    least: set[str] = set()
    if scored.height:
        best = scored.sort("absorbed_pairs", "absorption_rate").row(0, named=True)
        least = set(scored.filter((pl.col("absorbed_pairs") == best["absorbed_pairs"])
                                  & (pl.col("absorption_rate") == best["absorption_rate"]))
                    .get_column("architecture").to_list())
    return table.with_columns(pl.col("architecture").is_in(sorted(least)).alias("absorbs_least"))


SHOWN_COLUMNS: tuple[str, ...] = (
    "architecture", "l0", "fvu", "dead_fraction", "recovery", "recovered_share", "children_recovered_share", "mcc",
    "precision", "recall",
    "absorbed_pairs", "absorption_rate", "split_features", "shrinkage", "absorbs_least", "status")


def benchmark_markdown(table: pl.DataFrame, spec: SyntheticSpec, measured_l0: float | None = None) -> str:
    """The table, what its columns mean, and which architecture absorbs least."""
    least = table.filter(pl.col("absorbs_least")).get_column("architecture").to_list()
    n_pairs = spec.n_parents * spec.children_per_parent
    planted = f"{spec.planted_l0:g}" + (f" (measured on the held-out tokens: {measured_l0:.3g})"
                                        if measured_l0 is not None else "")
    lines = [
        f"Planted: {spec.n_features} features in d_model {spec.d_model}, L0 {planted}, frequencies capped at "
        f"{spec.max_frequency:g}, {spec.n_parents} parents "
        f"x {spec.children_per_parent} children ({n_pairs} pairs), {spec.n_correlated_groups} correlated groups "
        f"of {spec.correlated_group_size}; d_sae {spec.expansion_factor * spec.d_model}, {spec.train_tokens} "
        f"training tokens, batch {spec.batch_size}, "
        + (f"lr {spec.lr:g}" if spec.lr is not None else "each architecture's default lr") + f", seed {spec.seed}.",
        "",
        markdown_table(table.select([c for c in SHOWN_COLUMNS if c in table.columns])),
        "",
        "**Least absorption:** " + (", ".join(f"`{a}`" for a in least) if least else
                                    f"none (no scored architecture has an L0 within {L0_BAND:g}x the planted L0 "
                                    f"and an MCC of at least {MIN_COMPETING_MCC:g})"),
        "",
        f"**Absorption's ceiling:** the {n_pairs} children are {n_pairs / spec.n_features:.1%} of the features. An "
        "SAE that folds each parent into its children's latents (so no latent writes a child alone) recovers at "
        f"most {1 - n_pairs / spec.n_features:.1%} of them.",
        "",
        f"recovery: mean max decoder cosine per feature; recovered_share: features at cosine >= {RECOVERED_COSINE} "
        "(children_recovered_share: the same over the hierarchy's children); "
        "mcc: mean correlation of activation-matched pairs; precision/recall: the decoder-matched latent as a "
        f"detector of its feature; absorbed_pairs: of {n_pairs} (parent, child) pairs; split_features: features "
        "with two or more latents at cosine >= 0.8; shrinkage: matched latent's write / true coefficient "
        "(definitions: `sae_pipeline.ground_truth`).",
    ]
    return "\n".join(lines)


def benchmark_png(table: pl.DataFrame) -> bytes:
    """Recovered share, MCC and absorption rate per architecture, one bar panel each."""
    scored = table.filter(pl.col("status") == "ok")
    fig = Figure(figsize=(11, 3.2), dpi=80)
    axes = fig.subplots(1, 3)
    names = scored.get_column("architecture").to_list()
    for axis, column, title in zip(axes, ("recovered_share", "mcc", "absorption_rate"),
                                   (f"features recovered (cos >= {RECOVERED_COSINE})", "MCC", "absorption rate"),
                                   strict=True):
        axis.bar(names, scored.get_column(column).to_list(), color="tab:blue")
        axis.set_ylim(0, 1)
        axis.set_title(title, fontsize=9)
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    axes[0].axhline(TARGET_RECOVERED_SHARE, color="tab:red", linestyle="--", linewidth=1)
    return figure_png(fig)
