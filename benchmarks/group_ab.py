"""Grouped against one-at-a-time training of a sweep's configs on the same store, alternating, in one process.

    .venv/bin/python benchmarks/group_ab.py --store data/activations --sweep data/sweeps/default.yaml \
        --train-tokens 100000 --rounds 3

Each round times `train_group(configs)` (one pass, every batch read once) and `train_sae(config)` for each
config in turn (one pass each), in alternating order; prints the medians, their ratio and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from sae_pipeline.store import ActivationStore
from sae_pipeline.sweep_spec import load_sweep
from sae_pipeline.training import train_group, train_sae


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="an activation store folder")
    parser.add_argument("--sweep", default="data/sweeps/default.yaml")
    parser.add_argument("--train-tokens", type=int, default=100_000, help="per config")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    store = ActivationStore(args.store)
    cfgs = [cfg.model_copy(update={"train_tokens": args.train_tokens, "checkpoint_every": 10**9})
            for cfg in load_sweep(args.sweep).expand()]
    contestants = {"group": lambda: train_group(cfgs, store, "cpu"),
                   "one at a time": lambda: [train_sae(cfg, store, "cpu") for cfg in cfgs]}
    times: dict[str, list[float]] = {name: [] for name in contestants}
    load_before = os.getloadavg()
    for round_index in range(args.rounds):
        order = list(contestants) if round_index % 2 == 0 else list(reversed(contestants))
        for name in order:
            times[name].append(timed(contestants[name]))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({"configs": len(cfgs), "train_tokens_each": args.train_tokens, "torch_threads":
                      torch.get_num_threads(), "seconds": times, "median": medians,
                      "one_at_a_time_over_group": medians["one at a time"] / medians["group"],
                      "load_before": load_before, "load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
