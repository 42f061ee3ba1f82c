"""Time the TopK training step of whichever sae_pipeline is importable, the way its train_sae loop ran it before
issue 11 (dense path, the dead mask passed every step, unfused Adam): checks the bench's "before #11" row.

    PYTHONPATH=<worktree of b0d903a> .venv/bin/python benchmarks/previous_step.py "previous commit"
    .venv/bin/python benchmarks/previous_step.py "this commit, kernel dense"
"""

import statistics
import sys
import time

import torch

from sae_pipeline.saes.topk import TopKSAE

generator = torch.Generator().manual_seed(0)
mixing = torch.randn(384, 384, generator=generator) / 384**0.5
x = torch.randn(1024, 384, generator=generator) @ mixing + 0.5  # as the bench's activations
dense = {"kernel": "dense"} if "kernel" in TopKSAE.__init__.__code__.co_varnames else {}
sae = TopKSAE(384, 3072, k=32, **dense)
sae.initialize(torch.Generator().manual_seed(0), b_dec=x.mean(0))
optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.9, 0.999))
since_fired = torch.zeros(3072, dtype=torch.long)
dead = since_fired >= 10**7  # passed every step, no latent dead


def step() -> None:
    out = sae(x, 0.0, dead)
    out.loss.backward()
    sae.remove_gradient_parallel_to_decoder()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit()
    sae.after_step(out)
    with torch.no_grad():
        since_fired.add_(1024).masked_fill_((out.latents > 0).any(dim=0), 0)
        (out.latents > 0).sum(dim=-1).float().mean()


for _ in range(3):
    step()
times = []
for _ in range(7):
    started = time.perf_counter()
    for _ in range(5):
        step()
    times.append((time.perf_counter() - started) / 5)
print(f"{sys.argv[1] if len(sys.argv) > 1 else 'step'}: {statistics.median(times) * 1000:.1f} ms/step")
