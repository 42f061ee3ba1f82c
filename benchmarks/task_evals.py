"""What the real-task evaluations add to publishing one `sae` partition, on a finished default run: building the
task data of the store with its SAE-independent baselines (once per store: the model on the task prompts, the
letter probes, the dense ceiling), reading it back (once per `sae` run), then per SAE the held-out reconstruction
metrics (`evaluate_sae`, what publishing already did) beside the task evaluation (`TaskEvaluator.evaluate`), in
one process, medians over `--repeats` (the random-init floor, one per shape and run, is timed apart).

    .venv/bin/python benchmarks/task_evals.py --root data --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sae_pipeline.config import ActivationSpec
from sae_pipeline.corpus import read_corpus
from sae_pipeline.eval_tasks import TASKS_FILE, TaskData, TaskEvaluator, store_task_data
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.saes import load_sae
from sae_pipeline.storage import Layout
from sae_pipeline.store import ActivationStore


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="storage root of a finished run (`make run`)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layout = Layout(Path(args.root))
    store = ActivationStore(layout.activations_dir)
    spec = ActivationSpec(model=store.meta["model"])
    with tempfile.TemporaryDirectory() as cache:  # a cold build: the store's own cache is left as it is
        started = time.perf_counter()
        data = store_task_data(Path(cache), store.meta, read_corpus(layout), spec)
        build = time.perf_counter() - started
        read = statistics.median(seconds(lambda: TaskData.load(Path(cache) / TASKS_FILE)) for _ in range(args.repeats))
    evaluator = TaskEvaluator(data)
    print(f"torch threads {torch.get_num_threads()}; task data: {len(data.words)} words, {len(data.package_x)} "
          f"documents, {len(data.doctest_x)} doctest tokens, {len(evaluator.tasks)} probing tasks")
    print(f"build task data and baselines (once per store): {build:.2f} s; read them back (once per run): "
          f"{read:.3f} s")
    print("| partition | evaluate_sae (s) | task evaluation (s) | ratio | floor, first of its shape (s) |")
    print("|---|---|---|---|---|")
    for folder in sorted(p for p in layout.sae_dir("x").parent.iterdir() if (p / "cfg.json").exists()):
        sae = load_sae(folder)
        floor = seconds(lambda sae=sae: evaluator.floor(sae))
        held_out = statistics.median(seconds(lambda sae=sae: evaluate_sae(sae, store)) for _ in range(args.repeats))
        tasks = statistics.median(seconds(lambda sae=sae: evaluator.evaluate(sae)) for _ in range(args.repeats))
        print(f"| {folder.name} | {held_out:.2f} | {tasks:.2f} | {tasks / held_out:.2f} | {floor:.2f} |")


if __name__ == "__main__":
    main()
