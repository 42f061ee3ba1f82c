"""Anthropic-style resampling: dead latents move toward badly reconstructed inputs, Adam state is reset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_pipeline import training
from sae_pipeline.config import SAEConfig
from sae_pipeline.resampling import ENCODER_SCALE, resample_dead_latents
from sae_pipeline.saes.relu import ReluSAE
from sae_pipeline.training import train_sae
from sae_pipeline_tests.synthetic import planted_sparse_data, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained_step(sae: ReluSAE, x: torch.Tensor) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae(x, 0.1).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def test_dead_latents_take_the_worst_reconstructed_direction() -> None:
    torch.manual_seed(0)
    sae = ReluSAE(8, 16)
    sae.initialize(torch.Generator().manual_seed(0))
    x = torch.randn(64, 8) * 0.1
    optimizer = _trained_step(sae, x)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    moments = {name: optimizer.state[p]["exp_avg"].clone() for name, p in sae.named_parameters()}
    inputs = torch.randn(200, 8) * 0.01
    worst = [17, 42, 99]  # reconstructed far worse than the rest: they carry almost all the probability
    for row, axis in zip(worst, (2, 4, 6), strict=True):
        inputs[row, axis] = 50.0
    offsets = inputs[worst] - sae.b_dec.detach()
    expected = offsets / offsets.norm(dim=-1, keepdim=True)
    live_norm = before["W_enc"][:, ~dead].norm(dim=0).mean()

    assert resample_dead_latents(sae, optimizer, dead, inputs, torch.Generator().manual_seed(1)) == 3
    new_rows = sae.W_dec[[2, 5, 11]].detach()
    matches = (new_rows @ expected.t()).max(dim=1).values  # each new row is one of the worst directions
    assert torch.allclose(matches, torch.ones(3), atol=1e-5)
    assert torch.linalg.matrix_rank(new_rows) == 3  # sampled without replacement: three different inputs
    for i in (2, 5, 11):
        assert torch.allclose(sae.W_enc[:, i], sae.W_dec[i] * live_norm * ENCODER_SCALE, atol=1e-5)
        assert sae.b_enc[i] == 0
        assert optimizer.state[sae.W_dec]["exp_avg"][i].abs().sum() == 0
        assert optimizer.state[sae.W_enc]["exp_avg_sq"][:, i].abs().sum() == 0
    live = ~dead
    assert torch.equal(sae.W_dec[live], before["W_dec"][live])
    assert torch.equal(sae.W_enc[:, live], before["W_enc"][:, live])
    assert torch.equal(optimizer.state[sae.W_dec]["exp_avg"][live], moments["W_dec"][live])
    assert optimizer.state[sae.W_dec]["exp_avg"][live].abs().sum() > 0


def test_nothing_to_resample_changes_nothing() -> None:
    sae = ReluSAE(4, 8)
    sae.initialize(torch.Generator().manual_seed(0))
    optimizer = _trained_step(sae, torch.randn(16, 4))
    before = sae.W_dec.detach().clone()
    assert resample_dead_latents(sae, optimizer, torch.zeros(8, dtype=torch.bool), torch.randn(32, 4),
                                 torch.Generator()) == 0
    assert torch.equal(sae.W_dec, before)


def test_training_resamples_on_its_interval_and_not_during_decay(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = planted_sparse_data(n=6000, d=16, n_dirs=32, k_active=3, seed=3)
    store = write_store(tmp_path / "store", data[:5000], data[5000:], shard_tokens=2000)
    calls: list[int] = []

    def spy(sae, optimizer, dead, inputs, generator):
        calls.append(int(dead.sum()))
        return training.resample_dead_latents.__wrapped__(sae, optimizer, dead, inputs, generator)

    spy.__wrapped__ = training.resample_dead_latents
    monkeypatch.setattr(training, "resample_dead_latents", spy)
    cfg = SAEConfig(architecture="relu", expansion_factor=8, l1_alpha=1.0, lr=3e-2, batch_size=64,
                    train_tokens=64 * 200, resample_every=25, lr_decay_fraction=0.3, normalize="none")
    train_sae(cfg, store, "cpu")
    decay_start = 200 - int(200 * 0.3)
    assert len(calls) == len([s for s in range(25, 201, 25) if s < decay_start])  # steps 25..125
    assert [training.resample_due(cfg, s, 200) for s in (25, 50, 140, 150, 175, 200)] == [
        True, True, False, False, False, False]
    assert max(calls) > 0  # the strong penalty and lr leave latents dead over an interval, and they are resampled
