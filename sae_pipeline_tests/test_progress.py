"""Training progress lines: the window's L0 and FVU against an independent computation, the throttle and the
rate/ETA, and the lines a training group emits (their L0 equal to the log rows')."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from sae_pipeline import progress as progress_module
from sae_pipeline.config import SAEConfig
from sae_pipeline.progress import FitWindow, GroupProgress
from sae_pipeline.training import lockstep_batches, train_group
from sae_pipeline_tests.synthetic import planted_sparse_data, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_window_fvu_is_the_squared_error_over_the_spread_about_the_window_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 6, generator=generator) * 2 + 3 for _ in range(3)]
    recons = [x + 0.3 * torch.randn(x.shape, generator=generator) for x in batches]
    l0s = [4.0, 5.0, 9.0]
    window = FitWindow(6, torch.device("cpu"))
    for x, x_hat, l0 in zip(batches, recons, l0s, strict=True):
        window.add(x, (x_hat - x).pow(2).sum(dim=-1).mean(), torch.tensor(l0))
    xs, hats = np.concatenate([b.numpy() for b in batches]), np.concatenate([r.numpy() for r in recons])
    expected_fvu = ((hats - xs) ** 2).sum() / ((xs - xs.mean(axis=0)) ** 2).sum()
    l0, fvu = window.read()
    assert l0 == pytest.approx(np.mean(l0s)) and fvu == pytest.approx(expected_fvu, rel=1e-6)
    assert window.read() is None  # read starts a new window


def test_a_line_is_emitted_once_the_interval_has_passed_with_rate_and_time_left() -> None:
    now, lines = [0.0], []
    tracker = GroupProgress(lines.append, ["a", "b"], total_tokens=10_000, start_tokens=1_000, every=10.0,
                            clock=lambda: now[0])
    window = FitWindow(2, torch.device("cpu"))
    window.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor(0.5), torch.tensor(3.0))
    now[0] = 9.9
    tracker.maybe_emit(2_000, [window, None])
    assert lines == []
    now[0] = 10.0
    tracker.maybe_emit(4_000, [window, None])
    assert lines == ["training 4,000 / 10,000 tokens (40%), 300 tokens/s, about 20s left: a L0 3.0 FVU 1.000"]


def test_a_training_group_reports_each_configs_l0_as_its_log_rows_do(tmp_path, monkeypatch) -> None:
    data, _ = planted_sparse_data(4096, 16, 32, 3, seed=1)
    store = write_store(tmp_path / "store", data[:3584], data[3584:], shard_tokens=1024)
    monkeypatch.setattr(progress_module, "PROGRESS_SECONDS", 0.0)  # a line after every read-ahead of batches
    cfgs = [SAEConfig(architecture="topk", k=k, expansion_factor=2, batch_size=256, train_tokens=256 * 24,
                      log_every=1, lr_warmup_steps=0) for k in (2, 4)]
    ahead = lockstep_batches(256, 16, 2)
    lines: list[str] = []
    results = train_group(cfgs, store, "cpu", progress=lines.append)
    assert len(lines) == 24 // ahead and all("tokens/s" in line and "left" in line for line in lines)
    assert "training 6,144 / 6,144 tokens (100%)" in lines[-1]
    for cfg, result in zip(cfgs, results, strict=True):
        found = [re.search(rf"{re.escape(cfg.partition_key())} L0 ([0-9.]+) FVU ([0-9.]+)", line) for line in lines]
        logged = result.metrics["l0"].to_numpy()
        for window, match in enumerate(found):  # each line: the mean L0 of the steps since the last one
            assert match is not None and float(match.group(1)) == pytest.approx(
                logged[window * ahead:(window + 1) * ahead].mean(), abs=0.051)
            assert 0 < float(match.group(2)) < 2


def test_extraction_reports_the_tokens_read_of_the_corpus(pipeline, tmp_path, monkeypatch) -> None:
    from sae_pipeline.activations import extract_activations
    from sae_pipeline.config import ActivationSpec
    from sae_pipeline.corpus import read_corpus
    from sae_pipeline.model import load_model, load_tokenizer

    corpus = read_corpus(pipeline.layout)
    spec = ActivationSpec(shard_tokens=1024, batch_size=64)
    monkeypatch.setattr(progress_module, "PROGRESS_SECONDS", 0.0)
    lines: list[str] = []
    extract_activations(corpus, load_model(spec), load_tokenizer(spec), spec, tmp_path, spec.model,
                        progress=lines.append)
    total = int(corpus["input_ids"].list.len().sum())
    done = [int(re.match(r"extraction ([0-9,]+) / ", line).group(1).replace(",", "")) for line in lines]
    assert len(lines) >= 3 and done == sorted(done) and done[-1] == total
    assert lines[-1].startswith(f"extraction {total:,} / {total:,} tokens (100%)")


def test_features_report_the_eval_tokens_of_both_passes_and_change_nothing(pipeline, monkeypatch) -> None:
    from sae_pipeline.config import ActivationSpec
    from sae_pipeline.corpus import read_corpus
    from sae_pipeline.features import extract_features
    from sae_pipeline.model import load_tokenizer
    from sae_pipeline.saes.topk import TopKSAE
    from sae_pipeline.store import ActivationStore

    store = ActivationStore(pipeline.layout.activations_dir)
    sae = TopKSAE(store.d_model, 2 * store.d_model, k=8)
    sae.initialize(torch.Generator().manual_seed(0))
    corpus, tokenizer = read_corpus(pipeline.layout), load_tokenizer(ActivationSpec())
    quiet = extract_features(sae, store, corpus, tokenizer, top_n=3, chunk=256)
    monkeypatch.setattr(progress_module, "PROGRESS_SECONDS", 0.0)
    lines: list[str] = []
    shown = extract_features(sae, store, corpus, tokenizer, top_n=3, chunk=256, progress=lines.append)
    total = 2 * store.n_tokens("eval")
    done = [int(re.match(r"features ([0-9,]+) / ", line).group(1).replace(",", "")) for line in lines]
    assert len(lines) >= 4 and done == sorted(done) and done[-1] == total
    assert shown.latents.equals(quiet.latents) and shown.examples.equals(quiet.examples)
