"""Seed-to-seed spread of held-out FVU for `scale.py`'s group of 4 (the noise floor a dtype change is judged by).

    .venv/bin/python benchmarks/seed_spread.py --out /tmp/seed_store --seeds 1 2

Builds a 1M-token float32 store in --out (kept, reused when present), trains the group once per seed and prints
each seed's held-out FVU per config as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from scale import GROUP, build_store  # noqa: E402

from sae_pipeline.config import SAEConfig  # noqa: E402
from sae_pipeline.evaluation import evaluate_sae  # noqa: E402
from sae_pipeline.store import ActivationStore  # noqa: E402
from sae_pipeline.training import train_group  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="store folder (built when it has no meta.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if not (args.out / "meta.json").exists():
        build_store(args.out, 1_000_000, "float32")
    store = ActivationStore(args.out)
    for seed in args.seeds:
        cfgs = [SAEConfig(**point, batch_size=1024, lr=1e-3, train_tokens=store.n_tokens("train"),
                          dead_tokens=1_000_000, log_every=100, checkpoint_every=10**9, seed=seed) for point in GROUP]
        results = train_group(cfgs, store, "cpu")
        print(json.dumps({"seed": seed, **{c.partition_key(): round(evaluate_sae(r.sae, store)[0].fvu, 5)
                                           for c, r in zip(cfgs, results, strict=True)}}), flush=True)


if __name__ == "__main__":
    main()
