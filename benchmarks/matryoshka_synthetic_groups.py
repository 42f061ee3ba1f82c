"""Matryoshka on the synthetic ground-truth world with three group splits (the benchmark's config otherwise).

    PYTHONPATH=. .venv/bin/python benchmarks/matryoshka_synthetic_groups.py
"""

import json
import tempfile
from pathlib import Path

import sae_pipeline.synthetic as synthetic
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.synthetic import SyntheticSpec, run_synthetic_benchmark

COLUMNS = ("l0", "fvu", "dead_fraction", "recovered_share", "children_recovered_share", "absorbed_pairs",
           "absorption_rate", "split_features")
original = synthetic.benchmark_config
for groups in [None, (0.25, 0.25, 0.5), (0.5, 0.5)]:
    def config(architecture, spec, groups=groups):
        cfg = original(architecture, spec)
        return parse_sae_config({**cfg.model_dump(), "matryoshka_groups": groups}) if groups else cfg
    synthetic.benchmark_config = config
    result = run_synthetic_benchmark(SyntheticSpec(), ["matryoshka"], Path(tempfile.mkdtemp()))
    row = result.table.row(0, named=True)
    print(json.dumps({"groups": groups, **{k: row[k] for k in COLUMNS}, "seconds": round(result.train_seconds, 1)}),
          flush=True)
