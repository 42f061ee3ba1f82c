"""BatchTopK and Matryoshka BatchTopK side by side on an activation store: held-out metrics, and the held-out FVU
of each Matryoshka prefix (the first n latents alone, at the saved inference thresholds) for both.

    PYTHONPATH=. .venv/bin/python benchmarks/matryoshka_prefixes.py data/activations 32

d_sae 3072 (expansion 8 on d_model 384), batch 1024, 798,720 training tokens, default groups
(prefixes 96, 192, 384, 768, 1536, 3072).
"""

import json
import sys
import time

import torch

from sae_pipeline.config import SAEConfig
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.saes.matryoshka import MatryoshkaSAE
from sae_pipeline.store import ActivationStore
from sae_pipeline.training import train_sae


@torch.no_grad()
def prefix_fvus(sae, store: ActivationStore, widths: list[int]) -> list[float]:
    """Held-out FVU (against the per-dimension mean) of the reconstruction from the first `width` latents."""
    sse, sum_x, sum_x2, n = torch.zeros(len(widths), dtype=torch.float64), 0.0, 0.0, 0
    for x in store.iter_split("eval", 4096):
        _, latents = sae.reconstruct(x)
        for i, width in enumerate(widths):
            x_hat = latents[:, :width] @ sae.W_dec[:width] + sae.b_dec
            sse[i] += (x_hat - x).double().pow(2).sum()
        sum_x, sum_x2, n = sum_x + x.double().sum(dim=0), sum_x2 + x.double().pow(2).sum(dim=0), n + len(x)
    return (sse / (sum_x2 - sum_x.pow(2) / n).sum()).tolist()


store = ActivationStore(sys.argv[1])
k = int(sys.argv[2])
for architecture in ("batchtopk", "matryoshka"):
    cfg = SAEConfig(architecture=architecture, k=k, expansion_factor=8, batch_size=1024, train_tokens=798_720)
    widths = MatryoshkaSAE.prefix_widths(SAEConfig(architecture="matryoshka", k=k, expansion_factor=8),
                                          store.d_model)
    started = time.perf_counter()
    result = train_sae(cfg, store, device="cpu")
    metrics, _ = evaluate_sae(result.sae, store)
    print(json.dumps({"architecture": architecture, "k": k, "l0": round(metrics.l0, 2), "fvu": round(metrics.fvu, 4),
                      "dead_fraction": metrics.dead_fraction, "dense_fraction": metrics.dense_fraction,
                      "relative_reconstruction_bias": round(metrics.relative_reconstruction_bias, 4),
                      "decoder_max_cosine_mean": round(metrics.decoder_max_cosine_mean, 4),
                      "prefix_fvu": dict(zip(widths, [round(v, 4) for v in prefix_fvus(result.sae, store, widths)],
                                             strict=True)),
                      "seconds": round(time.perf_counter() - started, 1)}), flush=True)
