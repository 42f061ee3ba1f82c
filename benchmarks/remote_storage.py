"""Object-storage round trip of an activation-store-sized folder through `storage.Layout`.

Times, for a folder of `--shards` files of `--shard-mb` MiB: a local copy of it (the floor: moving the bytes on
this disk), `Layout.publish` to an S3 root (moto's S3 server on localhost, through s3fs, so no network cost is in
the figure), `Layout.pull` into an empty cache (a fresh pod), and a second pull (cache warm: one commit read).
Medians over `--repeats`. Needs the test extra (s3fs, moto[server]).

    .venv/bin/python benchmarks/remote_storage.py --shards 8 --shard-mb 32 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import s3fs
from moto.server import ThreadedMotoServer

from sae_pipeline.storage import Layout


def _seconds(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _write_shards(folder: Path, shards: int, shard_mb: int) -> None:
    folder.mkdir(parents=True)
    for index in range(shards):
        (folder / f"train_{index:05d}.safetensors").write_bytes(os.urandom(shard_mb << 20))
    (folder / "meta.json").write_text("{}")


def _publish(layout: Layout, source: Path) -> None:
    with layout.publish(layout.activations_dir) as folder:
        shutil.copytree(source, folder, dirs_exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    s3fs.S3FileSystem().mkdir("bench")
    times: dict[str, list[float]] = {"local copy": [], "publish to s3": [], "pull, empty cache": [],
                                     "pull, warm cache": []}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch) / "source"
            _write_shards(source, args.shards, args.shard_mb)
            for repeat in range(args.repeats):
                times["local copy"].append(_seconds(lambda r=repeat: shutil.copytree(source, Path(scratch) / f"c{r}")))
                writer = Layout.at("s3://bench/root", f"{scratch}/writer{repeat}")
                times["publish to s3"].append(_seconds(lambda w=writer: _publish(w, source)))
                reader = Layout.at("s3://bench/root", f"{scratch}/reader{repeat}")
                times["pull, empty cache"].append(_seconds(lambda r=reader: r.pull(r.activations_dir)))
                times["pull, warm cache"].append(_seconds(lambda r=reader: r.pull(r.activations_dir)))
    finally:
        server.stop()
    size_mb = args.shards * args.shard_mb
    floor = statistics.median(times["local copy"])
    print(f"{args.shards} shards x {args.shard_mb} MiB = {size_mb} MiB, median of {args.repeats}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:18s} {median:8.3f} s  {size_mb / median:8.1f} MiB/s  {median / floor:6.1f}x local copy")


if __name__ == "__main__":
    main()
