"""The cost of the idle-latent hold (`idle_latents_still`, TopK's default since issue 13): our training step on
the bench's synthetic batch with the hold on and off, timed side by side in rotating order (bench's
`time_contestants`); prints one JSON line.

    PYTHONPATH=. .venv/bin/python benchmarks/hold_ab.py [--shape 384x3072:k32:b1024] [--rounds 9]
"""

import argparse
import contextlib
import json
import os

import torch

from sae_pipeline.bench import LR, Shape, _setup, machine, time_contestants
from sae_pipeline.saes.topk import TopKSAE
from sae_pipeline.step import make_optimizer, training_step, update_firing


def step_with(shape: Shape, hold: bool):
    setup = _setup(shape, torch.device("cpu"), 0.0, False)
    sae = TopKSAE(shape.d_in, shape.d_sae, k=shape.k, kernel="auto")
    sae.initialize(torch.Generator().manual_seed(0), b_dec=setup.x.mean(dim=0))
    optimizer = make_optimizer(sae, LR, setup.device)
    since_fired = torch.zeros(shape.d_sae, dtype=torch.long)

    def step() -> None:
        out = training_step(sae, sae, optimizer, setup.x, 0.0, None, 1.0, contextlib.nullcontext(), hold)
        with torch.no_grad():
            update_firing(since_fired, out, shape.batch)

    return step


parser = argparse.ArgumentParser()
parser.add_argument("--shape", default="384x3072:k32:b1024")
parser.add_argument("--rounds", type=int, default=9)
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()
shape = Shape.parse(args.shape)
load_before = os.getloadavg()[0]
medians = time_contestants({"hold": step_with(shape, True), "no hold": step_with(shape, False)},
                           torch.device("cpu"), args.rounds, args.steps, warmup=3)
print(json.dumps({"shape": str(shape), "machine": machine(), "threads": torch.get_num_threads(),
                  "ms_per_step": {name: round(1000 * value, 2) for name, value in medians.items()},
                  "hold_vs_no_hold": round(medians["hold"] / medians["no hold"], 3),
                  "load_before": load_before, "load_after": os.getloadavg()[0]}))
