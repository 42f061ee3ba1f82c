"""Training at scale: build an activation store of N tokens from the embedded model and corpus, then train a group
of configs on it in one pass; report wall time, tokens/s, peak RSS and disk use.

    .venv/bin/python benchmarks/scale.py --tokens 1000000 --dtype float16 --out /tmp/scale_1m
    .venv/bin/python benchmarks/scale.py --tokens 10000000 --out /tmp/scale_10m

The embedded corpus (the standard library's docstrings, about 140k tokens at 128 per sequence) is repeated to
reach N tokens: repeats are the same text at new sequence ids, so the store grows without new documents (said
in the output). Extraction runs in this process and training in a child process (`--train-only` on the same
folder), so each phase's peak RSS (VmHWM from /proc) is its own: a training peak measured after extraction in
one process would include what extraction left behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import torch

from sae_pipeline.activations import extract_activations
from sae_pipeline.bench import reset_peak_rss, rss_mib
from sae_pipeline.config import ActivationSpec, CorpusSpec, SAEConfig
from sae_pipeline.corpus import iter_documents, tokenize_corpus
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.model import load_model, load_tokenizer
from sae_pipeline.store import ActivationStore
from sae_pipeline.training import plan_groups, train_group

GROUP = [{"architecture": "topk", "k": 16}, {"architecture": "topk", "k": 32},
         {"architecture": "topk", "k": 32, "expansion_factor": 8}, {"architecture": "batchtopk", "k": 32}]


def repeated_corpus(tokens: int) -> tuple[pl.DataFrame, int]:
    """The embedded corpus repeated (new sequence ids) until it holds at least `tokens` tokens; and the repeats."""
    spec, tokenizer = CorpusSpec(max_sequences=100_000), load_tokenizer(ActivationSpec())
    corpus = tokenize_corpus(iter_documents(spec), tokenizer, spec)
    special = list(tokenizer.all_special_ids)  # not stored (exclude_special_tokens)
    per_copy = int(corpus["input_ids"].explode().is_in(special).not_().sum())
    copies = -(-tokens // per_copy)
    frames = [corpus.with_columns(pl.col("seq_id") + i * len(corpus)) for i in range(copies)]
    return pl.concat(frames), copies


def build_store(folder: Path, tokens: int, dtype: str) -> dict:
    corpus, copies = repeated_corpus(tokens)
    spec = ActivationSpec(dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    extract_activations(corpus, load_model(spec), load_tokenizer(spec), spec, folder, spec.model)
    store = ActivationStore(folder)
    disk = sum(f.stat().st_size for f in folder.iterdir())
    return {"corpus_copies": copies, "store_tokens": store.meta["n_tokens"], "dtype": dtype,
                   "disk_mib": disk / 2**20, "extract_seconds": time.perf_counter() - started,
                   "extract_peak_rss_mib": rss_mib()}


def train(store: ActivationStore, train_tokens: int) -> dict:
    steps = max(1, train_tokens // 1024)  # one checkpoint, at the end: none is timed mid-run
    cfgs = [SAEConfig(**point, batch_size=1024, lr=1e-3, train_tokens=train_tokens, dead_tokens=1_000_000,
                      log_every=100, checkpoint_every=steps) for point in GROUP]
    groups = plan_groups(cfgs, store.d_model)
    reset_peak_rss()
    started = time.perf_counter()
    results = [r for group in groups for r in train_group([cfgs[i] for i in group], store, "auto")]
    wall = time.perf_counter() - started
    peak = rss_mib()
    failed = [str(r) for r in results if isinstance(r, Exception)]
    trained = sum(r.train_tokens for r in results if not isinstance(r, Exception))
    order = [i for group in groups for i in group]
    fvu = {cfgs[i].partition_key(): round(evaluate_sae(r.sae, store)[0].fvu, 5)
           for i, r in zip(order, results, strict=True) if not isinstance(r, Exception)}
    return {"configs": len(cfgs), "groups": len(groups), "train_tokens_each": train_tokens, "train_seconds": wall,
            "tokens_per_second_all_configs": trained / wall, "stream_tokens_per_second": train_tokens / wall,
            "train_peak_rss_mib": peak, "held_out_fvu": fvu, "failed": failed}


def train_in_child(folder: Path, train_tokens: int | None) -> dict:
    """`--train-only` on `folder` in a fresh process: its peak RSS is training's alone."""
    command = [sys.executable, __file__, "--train-only", "--out", str(folder)]
    if train_tokens:
        command += ["--train-tokens", str(train_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="activation tokens in the store")
    parser.add_argument("--train-tokens", type=int, help="training tokens per config (default: the store's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", type=Path, required=True, help="folder for the store (replaced)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--train-only", action="store_true", help="train on the store already in --out")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.train_only:
        store = ActivationStore(args.out)
        report = {**train(store, args.train_tokens or store.n_tokens("train")),
                  "torch_threads": torch.get_num_threads()}
        print(json.dumps(report))
        return
    shutil.rmtree(args.out, ignore_errors=True)
    built = build_store(args.out, args.tokens, args.dtype)
    print(json.dumps(built), flush=True)  # kept even if training fails
    print(json.dumps({**built, **train_in_child(args.out, args.train_tokens)}, indent=2))
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
