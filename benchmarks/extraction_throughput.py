"""Extraction against its limit (issue 24, item 4): tokens/s of `extract_activations` (capture, select, write
shards and manifest, norm statistics) against a bare `model(...)` forward stopped after the same block, on the
same batches (the split's sequences longest first, `batch_size` at a time), side by side in one process:
medians of `--repeats` interleaved rounds.

    .venv/bin/python benchmarks/extraction_throughput.py --sequences 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from sae_pipeline.activations import extract_activations, split_sequences
from sae_pipeline.bench import throughput_table
from sae_pipeline.config import ActivationSpec, CorpusSpec
from sae_pipeline.corpus import iter_documents, tokenize_corpus
from sae_pipeline.model import load_model, load_tokenizer, pad_batch, transformer_blocks


class _Stop(Exception):
    pass


def _raise(*_args) -> None:
    raise _Stop


def bare_forward(corpus: pl.DataFrame, model: torch.nn.Module, pad_id: int, spec: ActivationSpec) -> float:
    """Seconds of the forward passes alone, stopped after block `spec.layer`, over the same batches as the
    extraction (train split, then eval, each longest first)."""
    eval_ids = list(split_sequences(len(corpus), spec.eval_fraction, spec.seed))
    splits = [corpus.filter(pl.col("seq_id").is_in(eval_ids) == is_eval)
              .sort(pl.col("input_ids").list.len(), descending=True, maintain_order=True) for is_eval in (False, True)]
    handle = transformer_blocks(model)[spec.layer].register_forward_hook(_raise)
    started = time.perf_counter()
    try:
        with torch.no_grad():
            for rows in splits:
                for start in range(0, len(rows), spec.batch_size):
                    input_ids, mask = pad_batch(rows["input_ids"].slice(start, spec.batch_size).to_list(), pad_id)
                    with contextlib.suppress(_Stop):
                        model(input_ids=input_ids, attention_mask=mask)
    finally:
        handle.remove()
    return time.perf_counter() - started


def extraction(corpus: pl.DataFrame, model: torch.nn.Module, tokenizer, spec: ActivationSpec) -> float:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        extract_activations(corpus, model, tokenizer, spec, Path(scratch), spec.model)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec, corpus_spec = ActivationSpec(), CorpusSpec(max_sequences=args.sequences)
    tokenizer, model = load_tokenizer(spec), load_model(spec)
    corpus = tokenize_corpus(iter_documents(corpus_spec), tokenizer, corpus_spec)
    tokens = int(corpus["input_ids"].list.len().sum())
    times: dict[str, list[float]] = {"bare forward": [], "extract_activations": []}
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        times["bare forward"].append(bare_forward(corpus, model, tokenizer.pad_token_id, spec))
        times["extract_activations"].append(extraction(corpus, model, tokenizer, spec))
    print(f"{tokens:,} tokens ({len(corpus)} sequences), {spec.hook_names()[0]}, batch {spec.batch_size}, torch "
          f"threads {torch.get_num_threads()}, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(throughput_table("pass", times, tokens, "bare forward", "of the bare forward"))

if __name__ == "__main__":
    main()
