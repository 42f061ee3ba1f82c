"""A training run killed with SIGKILL resumes from its checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sae_pipeline.config import SAEConfig
from sae_pipeline.store import ActivationStore
from sae_pipeline.training import CHECKPOINT_FILE, train_sae
from sae_pipeline_tests.synthetic import planted_sparse_data, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {"architecture": "topk", "expansion_factor": 4, "k": 3, "lr": 3e-3, "batch_size": 128,
          "train_tokens": 128 * 300, "log_every": 5, "checkpoint_every": 40, "dead_tokens": 128 * 50}

# The child trains with a pause per logged row so the parent can kill it mid-run; the pause changes nothing
# the run computes.
CHILD = textwrap.dedent("""
    import sys, time, torch
    from sae_pipeline.store import ActivationStore
    from sae_pipeline.config import SAEConfig
    from sae_pipeline.training import train_sae
    torch.set_num_threads(1)
    store, ckpt, cfg = ActivationStore(sys.argv[1]), sys.argv[2], SAEConfig.model_validate_json(sys.argv[3])
    train_sae(cfg, store, "cpu", checkpoint_dir=__import__("pathlib").Path(ckpt), log=lambda row: time.sleep(0.05))
    print("finished")
""")


@pytest.fixture
def store(tmp_path: Path) -> ActivationStore:
    data, _ = planted_sparse_data(n=6000, d=16, n_dirs=32, k_active=3, seed=1)
    return write_store(tmp_path / "store", data[:5000], data[5000:], shard_tokens=1500)


def _kill_after_first_checkpoint(store: ActivationStore, checkpoint_dir: Path, cfg: SAEConfig) -> int:
    """Start the child, SIGKILL it once a checkpoint exists; return the checkpointed step."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(store.folder), str(checkpoint_dir),
                              cfg.model_dump_json()], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (checkpoint_dir / CHECKPOINT_FILE).exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint written within 120 s"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert b"finished" not in child.stdout.read()
    return int(torch.load(checkpoint_dir / CHECKPOINT_FILE, weights_only=True)["step"])


def test_sigkill_then_resume_matches_uninterrupted_run(store: ActivationStore, tmp_path: Path) -> None:
    cfg = SAEConfig(**CONFIG)
    killed_at = _kill_after_first_checkpoint(store, tmp_path / "ckpt", cfg)
    total_steps = cfg.train_tokens // cfg.batch_size
    assert 0 < killed_at < total_steps

    resumed = train_sae(cfg, store, "cpu", checkpoint_dir=tmp_path / "ckpt")
    reference = train_sae(cfg, store, "cpu")
    assert resumed.resumed_from_step == killed_at
    assert resumed.metrics["step"].to_list() == reference.metrics["step"].to_list()
    for column in ("loss", "mse", "l0", "dead_fraction", "lr"):
        got, want = resumed.metrics[column].to_list(), reference.metrics[column].to_list()
        assert got == pytest.approx(want, abs=1e-4, rel=1e-4), column
    for name, tensor in reference.sae.state_dict().items():
        assert torch.allclose(resumed.sae.state_dict()[name], tensor, atol=1e-4), name
