"""Variants on the ground-truth benchmark: a spec and per-variant config overrides, trained in one lockstep group.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synthetic_variants.py \
        --spec '{"train_tokens": 4096000}' \
        --variant 'topk={"architecture": "topk"}' \
        --variant 'topk_lr3={"architecture": "topk", "lr": 0.003}'

Each variant starts from the benchmark's config of its architecture (`benchmark_config`) and replaces the fields
it names; a field set to null goes back to the architecture's default. Prints, per variant, the benchmark's
scores and how many features of each role (parent, child, grouped, free) it recovers at cosine >= 0.9, which
separates absorption (children) from rare features missed (benchmarks/RESULTS.md, "Synthetic ground truth").
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from sae_pipeline.config import SAEConfig
from sae_pipeline.consistency import cosine_matrix
from sae_pipeline.ground_truth import RECOVERED_COSINE, score_against_truth
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.store import ActivationStore
from sae_pipeline.synthetic import (
    PlantedFeatures,
    SyntheticSpec,
    benchmark_config,
    latents_of,
    plant_features,
    torch_threads,
    write_planted_store,
)
from sae_pipeline.training import train_group


def variant_config(name: str, overrides: dict, spec: SyntheticSpec) -> SAEConfig:
    """The benchmark config of `overrides["architecture"]` with the other fields of `overrides` replaced."""
    fields = dict(overrides)
    values = benchmark_config(fields.pop("architecture"), spec).model_dump()
    values.update(fields)
    for field in [field for field, value in fields.items() if value is None]:
        del values[field]
    return parse_sae_config(values, where=name)


def roles(features: PlantedFeatures) -> dict[str, torch.Tensor]:
    """Boolean masks over the features: parents, children, members of a correlated group, free roots."""
    n_features = len(features.frequency)
    parent, child = torch.zeros(n_features, dtype=torch.bool), torch.zeros(n_features, dtype=torch.bool)
    parent[: len(features.children)] = True
    child[features.children.flatten()] = True
    grouped = features.group >= 0
    return {"parent": parent, "child": child, "grouped": grouped, "free": ~(parent | child | grouped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="{}", help="SyntheticSpec fields as JSON")
    parser.add_argument("--variant", action="append", required=True, help="NAME=JSON config overrides")
    args = parser.parse_args()
    spec = SyntheticSpec(**json.loads(args.spec))
    variants = dict(v.split("=", 1) for v in args.variant)
    cfgs = [variant_config(name, json.loads(text), spec) for name, text in variants.items()]
    features = plant_features(spec)
    masks = roles(features)
    with torch_threads(1), tempfile.TemporaryDirectory() as scratch:
        eval_x, eval_coefficients = write_planted_store(features, spec, Path(scratch) / "activations")
        results = train_group(cfgs, ActivationStore(Path(scratch) / "activations"), "cpu")
        for name, cfg, result in zip(variants, cfgs, results, strict=True):
            if isinstance(result, Exception):
                print(name, "failed:", result)
                continue
            decoder, latents = result.sae.W_dec.detach(), latents_of(result.sae, eval_x)
            scores = score_against_truth(features.directions, eval_coefficients, decoder, latents, features.pairs)
            best = cosine_matrix(features.directions, decoder).max(dim=1).values
            by_role = {role: f"{int((best[mask] >= RECOVERED_COSINE).sum())}/{int(mask.sum())}"
                       for role, mask in masks.items()}
            l0 = (latents > 0).sum(dim=1).double().mean().item()
            print(json.dumps({"variant": name, "lr": cfg.lr, "l0": round(l0, 3),
                              **{k: round(v, 4) for k, v in scores.as_dict().items()}, "recovered": by_role,
                              "seconds": round(result.wall_seconds, 1)}))


if __name__ == "__main__":
    main()
