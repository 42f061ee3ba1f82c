"""JumpReLU trained to a target L0: one run per target on an activation store, held-out metrics per run.

    PYTHONPATH=. .venv/bin/python benchmarks/jumprelu_target.py data/activations 16 32 64

d_sae 3072 (expansion 8 on d_model 384), batch 1024, 798,720 training tokens (780 steps), l0_coeff 1 and every
other field at its default: the target is given, nothing is tuned.
"""

import json
import sys
import time

from sae_pipeline.config import SAEConfig
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.quality import not_collapsed
from sae_pipeline.store import ActivationStore
from sae_pipeline.training import train_sae

store = ActivationStore(sys.argv[1])
for active in (int(value) for value in sys.argv[2:]):
    d_sae = 8 * store.d_model
    cfg = SAEConfig(architecture="jumprelu", expansion_factor=8, l0_coeff=1.0, target_l0=active / d_sae,
                    batch_size=1024, train_tokens=798_720)
    started = time.perf_counter()
    result = train_sae(cfg, store, device="cpu")
    metrics, fire_counts = evaluate_sae(result.sae, store)
    busiest = float(fire_counts.max()) / metrics.n_tokens
    collapse = not_collapsed(result.metrics, d_sae)
    print(json.dumps({"target": active, "held_out_l0": round(metrics.l0, 2),
                      "off_target": round(metrics.l0 / active - 1, 4), "max_latent_frequency": round(busiest, 4),
                      "dense_fraction": metrics.dense_fraction, "frequent_fraction": metrics.frequent_fraction,
                      "dead_fraction": metrics.dead_fraction, "fvu": round(metrics.fvu, 4),
                      "relative_reconstruction_bias": round(metrics.relative_reconstruction_bias, 4),
                      "train_l0_rows": [round(v, 1) for v in result.metrics["l0"].to_list()[:4]],
                      "train_l0_last_row": round(result.metrics["l0"][-1], 2), "not_collapsed": collapse.passed,
                      "seconds": round(time.perf_counter() - started, 1)}), flush=True)
