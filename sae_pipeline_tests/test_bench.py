"""`python -m sae_pipeline.bench`: runs on a tiny shape, reports absent peers as absent, appends to a results
file, alternates contestants, and imports with torch alone. (What it measures is in benchmarks/RESULTS.md.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sae_pipeline import bench
from sae_pipeline_tests.synthetic import planted_sparse_data, write_store

TINY = ["--shape", "16x64:k4:b32", "--rounds", "2", "--steps", "1", "--warmup", "1", "--no-memory"]


def test_bench_runs_and_appends_a_dated_table(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n")
    assert bench.main([*TINY, "--device", "cpu", "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Measured results\n")  # appended, not overwritten
    assert "python -m sae_pipeline.bench --shape 16x64:k4:b32" in text and "load average" in text
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| 16x64 k4 B32")}
    floor_ms = float(rows[bench.FLOOR].split(" | ")[2])
    assert floor_ms > 0 and rows[bench.FLOOR].rstrip(" |").endswith("1.00x")
    for ours in ("sae_pipeline sparse", "sae_pipeline dense (reference)"):
        ms = float(rows[ours].split(" | ")[2])
        assert ms > 0
        over_floor = float(rows[ours].rstrip(" |").rsplit(" | ", 1)[1].removesuffix("x"))
        # the ms shown are rounded to 0.1: the ratio lies within what they allow
        assert (ms - 0.05) / (floor_ms + 0.05) - 0.01 <= over_floor <= (ms + 0.05) / max(floor_ms - 0.05, 1e-3)
    for peer, package in (("sparsify", "eai-sparsify"), ("SAELens", "sae-lens")):
        installed = bench._available(package) is not None
        assert (f"not installed (pip install {package})" in rows[peer]) is not installed
    assert "16x64 k4 B32" in capsys.readouterr().out


def test_no_append_writes_nothing(tmp_path):
    results = tmp_path / "RESULTS.md"
    bench.main([*TINY, "--device", "cpu", "--results", str(results), "--no-append"])
    assert not results.exists()


@pytest.mark.parametrize("text", ["384x3072", "384x3072:k0:b1024", "axb:k1:b1", "8x8:k8:b4"])
def test_bad_shape_is_refused_with_the_format(text):
    with pytest.raises(SystemExit, match="--shape"):
        bench.Shape.parse(text)


def test_shape_round_trips():
    shape = bench.Shape.parse("384x3072:k32:b1024")
    assert (shape.d_in, shape.d_sae, shape.k, shape.batch) == (384, 3072, 32, 1024)
    assert bench.Shape.parse(bench._shape_arg(shape)) == shape


def test_contestants_alternate_in_rotating_order():
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = bench.time_contestants(steps, torch.device("cpu"), rounds=3, per_round=2, warmup=1)
    assert set(medians) == {"a", "b", "c"} and all(m >= 0 for m in medians.values())
    timed = calls[3:]  # after one warm-up call each
    assert timed == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]


def test_bench_imports_with_torch_alone():
    """The GPU machine may have only torch: the bench, the step and the SAEs must not need the rest."""
    blocked = ["dagster", "pydantic", "polars", "pyarrow", "yaml", "safetensors", "transformers", "datasets",
               "great_expectations", "fsspec", "upath", "matplotlib"]
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "import sae_pipeline.bench as b\n"
            "b.main(['--shape', '8x32:k2:b16', '--rounds', '1', '--steps', '1', '--warmup', '0', '--no-memory',"
            " '--no-append', '--device', 'cpu'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| 8x32 k2 B16 | sae_pipeline sparse |" in done.stdout


def test_train_sae_loop_is_timed_on_a_real_store(tmp_path):
    data, _ = planted_sparse_data(3_000, 16, 32, 2, seed=0)
    write_store(tmp_path / "acts", data[:2_500], data[2_500:], shard_tokens=500)
    args = bench.parse_args(["--store", str(tmp_path / "acts"), "--loop-tokens", "1000", "--loop-repeats", "2",
                             "--device", "cpu"])
    rows = bench.bench_loop(tmp_path / "acts", bench.Shape.parse("16x64:k4:b100"), args)
    assert [row["contestant"].split(",")[1].split("(")[0].strip() for row in rows] == ["sparse kernel",
                                                                                        "dense kernel"]
    assert all(row["tokens_s"] > 0 and "median of 2 runs" in row["note"] for row in rows)
    assert "16x64 k4 B100, 1,000 tokens" in rows[0]["contestant"]


def test_cpu_memory_is_measured_in_a_child_process_per_contestant():
    args = bench.parse_args(["--shape", "64x512:k8:b256", "--warmup", "2", "--device", "cpu"])
    peak = bench._peak_rss_child("sae_pipeline dense (reference)", bench.Shape.parse("64x512:k8:b256"), args)
    # at least the SAE's weights, their gradients and Adam's two moments: 4 x 2 x 64 x 512 floats = 1 MiB
    assert peak is not None and peak >= 1.0
