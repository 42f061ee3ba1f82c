"""TopK defaults on the issue-13 workload: one run per named variant, held-out metrics per run.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/topk_defaults.py /work/runs/new/activations \
        --variant baseline --variant lr=0.002,lr_decay=cosine

The workload: `topk` k=32, d_sae 3072 (expansion 8 on d_model 384), batch 1024, 798,720 training tokens (780
steps), every other field at its default. A variant is `baseline` (nothing changed) or comma-separated
`field=value` pairs of `SAEConfig` fields over that workload (the values are parsed as the config would parse
YAML scalars). One JSON line per run: variant, held-out FVU, dead fraction, L0, seconds (load-dependent).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
import yaml

from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.store import ActivationStore
from sae_pipeline.training import train_sae

WORKLOAD = {"architecture": "topk", "k": 32, "expansion_factor": 8, "batch_size": 1024, "train_tokens": 798_720,
            "log_every": 100, "checkpoint_every": 10**9}


def parse_variant(text: str) -> dict:
    """`baseline` -> {}; `lr=0.002,adam_betas=[0.9,0.99]` -> {"lr": 0.002, "adam_betas": [0.9, 0.99]}."""
    if text == "baseline":
        return {}
    pairs = [item.split("=", 1) for item in re.split(r",(?![^\[]*\])", text)]  # commas inside [...] stay
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--variant {text!r}: expected field=value[,field=value...] or 'baseline'")
    return {name.strip(): yaml.safe_load(value) for name, value in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="activation store folder")
    parser.add_argument("--variant", action="append", default=[], help="`baseline` or field=value[,...]")
    args = parser.parse_args()
    store = ActivationStore(args.store)
    for text in args.variant or ["baseline"]:
        cfg = parse_sae_config({**WORKLOAD, **parse_variant(text)}, where=f"variant {text!r}")
        started = time.perf_counter()
        result = train_sae(cfg, store, device="cpu")
        metrics, _ = evaluate_sae(result.sae, store)
        print(json.dumps({"variant": text, "fvu": round(metrics.fvu, 4), "dead_fraction": metrics.dead_fraction,
                          "l0": round(metrics.l0, 2), "train_dead_last_row": result.metrics["dead_fraction"][-1],
                          "seconds": round(time.perf_counter() - started, 1),
                          "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
