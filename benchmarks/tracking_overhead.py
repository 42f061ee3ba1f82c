"""What tracking adds to one partition's training: open its run, log `--rows` training rows, end it with the
held-out metrics and verdicts, for each tracker alone, in one process (medians over `--repeats`, trackers
interleaved). W&B runs offline; MLflow on its default SQLite database and on a file store.

    .venv/bin/python benchmarks/tracking_overhead.py --rows 20 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from sae_pipeline.tracking import RunEnd, RunInfo, Tracking
from sae_pipeline.training import METRIC_COLUMNS

SETUPS = {
    "wandb (offline)": ("wandb", {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}),
    "mlflow (SQLite, the default)": ("mlflow", {}),
    "mlflow (file store)": ("mlflow", {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_TRACKING_URI": "file"}),
}


def one_partition(tracker: str, env: dict[str, str], folder: Path, rows: int, index: int) -> tuple[float, float]:
    """Seconds to open + end the run, and per logged row."""
    saved = {name: os.environ.get(name) for name in ("WANDB_MODE", "WANDB_SILENT", "WANDB_DIR",
                                                     "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_TRACKING_URI")}
    os.environ.update({k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"})
    if env.get("MLFLOW_TRACKING_URI") == "file":
        os.environ["MLFLOW_TRACKING_URI"] = (folder / "mlruns").as_uri()
    try:
        session = Tracking([tracker], lambda line: print("warning:", line), folder)
        config = {"architecture": "topk", "k": 32, "expansion_factor": 4, "lr": 4e-3}
        started = time.perf_counter()
        run = session.start(RunInfo(f"key{index}", "bench", config))
        opened = time.perf_counter()
        for step in range(1, rows + 1):
            run.log({column: float(step) for column in METRIC_COLUMNS})
        logged = time.perf_counter()
        run.end(RunEnd("finished", {"fvu": 0.1, "l0": 32.0}, {"sae_fvu": "pass"}, "/tmp/weights"))
        ended = time.perf_counter()
        return (opened - started) + (ended - logged), (logged - opened) / rows
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats + 1):  # the first round warms imports up and is dropped
            for name, (tracker, env) in SETUPS.items():
                folder = Path(scratch) / name.split()[0] / name.split("(")[1].split()[0]
                measured = one_partition(tracker, env, folder, args.rows, repeat)
                if repeat:
                    times[name].append(measured)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print("| tracker | open + end, s (median) | per logged row, ms (median) |")
    print("|---|---|---|")
    for name, measured in times.items():
        print(f"| {name} | {statistics.median(m[0] for m in measured):.2f} | "
              f"{1000 * statistics.median(m[1] for m in measured):.1f} |")


if __name__ == "__main__":
    main()
