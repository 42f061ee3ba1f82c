"""Extraction throughput at several hook sites (issue 23, item 8): tokens/s of one hook, of 4 hooks read in one
forward pass, and of the same 4 hooks read in 4 separate passes, on the embedded model and corpus, side by side
in one process (medians of `--repeats` runs each, interleaved, so drift on a shared machine hits all three).

    .venv/bin/python benchmarks/hook_extraction.py --sequences 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from sae_pipeline.activations import extract_activations
from sae_pipeline.bench import throughput_table
from sae_pipeline.config import ActivationSpec, CorpusSpec
from sae_pipeline.corpus import iter_documents, tokenize_corpus
from sae_pipeline.model import load_model, load_tokenizer

FOUR = ["blocks.1.hook_resid_post", "blocks.3.hook_attn_out", "blocks.3.hook_mlp_out", "blocks.5.hook_resid_post"]


def timed(corpus, model, tokenizer, hook_sets: list[list[str]]) -> float:
    """Seconds to extract `hook_sets`, one extraction (one pass) per set, into a scratch folder."""
    started = time.perf_counter()
    for hooks in hook_sets:
        spec = ActivationSpec(hooks=hooks)
        with tempfile.TemporaryDirectory() as scratch:
            extract_activations(corpus, model, tokenizer, spec, Path(scratch), spec.model)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = ActivationSpec()
    tokenizer, model = load_tokenizer(spec), load_model(spec)
    corpus = tokenize_corpus(iter_documents(CorpusSpec(max_sequences=args.sequences)), tokenizer,
                             CorpusSpec(max_sequences=args.sequences))
    tokens = int(corpus["input_ids"].list.len().sum())
    runs = {"1 hook (blocks.5.hook_resid_post)": [[FOUR[-1]]], "4 hooks, one pass": [FOUR],
            "4 hooks, 4 passes": [[hook] for hook in FOUR]}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, hook_sets in runs.items():
            times[name].append(timed(corpus, model, tokenizer, hook_sets))
    print(f"{tokens:,} tokens ({len(corpus)} sequences), torch threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.2f}; hooks {', '.join(FOUR)}")
    print(throughput_table("extraction", times, tokens, "4 hooks, 4 passes", "vs 4 passes"))

if __name__ == "__main__":
    main()
