"""train_sae with and without the background reading thread, alternating, on an activation store.

    .venv/bin/python benchmarks/prefetch_ab.py data/activations
"""

import sys

import sae_pipeline.store as stores
import sae_pipeline.training as training
from sae_pipeline.config import SAEConfig

store = stores.ActivationStore(sys.argv[1])
configs = {"relu": SAEConfig(architecture="relu", l1_alpha=2.0, l1_warmup_steps=100, lr=1e-3, train_tokens=200_000,
                             dead_tokens=100_000, log_every=20),
           "topk": SAEConfig(architecture="topk", k=32, lr=1e-3, train_tokens=200_000, dead_tokens=100_000,
                             log_every=20)}
for repeat in range(2):
    for name, cfg in configs.items():
        for depth in (2, 0):  # thread, then in the caller's thread; the trainer's own choice is overridden
            training.Prefetcher = lambda sampler, forced=depth, **_: stores.Prefetcher(sampler, forced)
            result = training.train_sae(cfg, store, "cpu")
            print(repeat, name, "thread" if depth else "no thread", f"{result.wall_seconds:.2f} s", flush=True)
