"""Matryoshka BatchTopK: the nested loss against an independent computation on both kernels, finite gradients,
learning planted directions on CPU, prefix widths and config validation, the saved file read back, and a
partition through the Dagster graph with the checks and reports of every architecture (SAELens loading it:
`test_interop.py`, with every architecture)."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pytest
import torch

from sae_pipeline.config import ConfigError, SAEConfig
from sae_pipeline.defs.assets import feature_labels, features, sae, sweep_analysis
from sae_pipeline.evaluation import EvalMetrics, evaluate_sae
from sae_pipeline.results import read_summary
from sae_pipeline.saes import build_sae, load_sae
from sae_pipeline.saes.matryoshka import MatryoshkaSAE
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.training import train_sae
from sae_pipeline_tests.conftest import tiny_topk
from sae_pipeline_tests.synthetic import (
    PLANTED_D,
    PLANTED_DIRECTIONS,
    PLANTED_K,
    PLANTED_RUN,
    planted_store,
    recovery_score,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTHS = [3, 8, 20, 48]


def _random_sae(kernel: str, seed: int = 0, d_in: int = 10, k: int = 4) -> MatryoshkaSAE:
    sae = MatryoshkaSAE(d_in, WIDTHS[-1], k=k, k_aux=5, widths=WIDTHS, kernel=kernel)
    generator = torch.Generator().manual_seed(seed)
    sae.initialize(generator, b_dec=0.1 * torch.randn(d_in, generator=generator))
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(WIDTHS[-1], generator=generator))
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=generator))
    return sae


def nested_loss_numpy(sae: MatryoshkaSAE, x: torch.Tensor) -> tuple[float, float]:
    """(mean over prefixes of the prefix's squared error, the full width's), in float64 numpy with a loop over
    prefixes: BatchTopK keeps the k * batch largest ReLU'd pre-activations of the batch."""
    W_enc, b_enc = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    W_dec, b_dec = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()
    xs = x.double().numpy()
    acts = np.maximum((xs - b_dec) @ W_enc + b_enc, 0.0)
    cutoff = np.sort(acts.ravel())[::-1][sae.k * len(xs) - 1]
    z = np.where(acts >= cutoff, acts, 0.0)
    losses = []
    for width in sae.widths:
        x_hat = z[:, :width] @ W_dec[:width] + b_dec
        losses.append(((x_hat - xs) ** 2).sum(axis=1).mean())
    return float(np.mean(losses)), float(losses[-1])


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_loss_is_the_mean_of_the_nested_prefix_losses(kernel):
    sae = _random_sae(kernel)
    x = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    expected_loss, expected_full = nested_loss_numpy(sae, x)
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert out.recon_loss.item() == pytest.approx(expected_full, rel=1e-5)
    assert out.loss.item() != pytest.approx(out.recon_loss.item(), rel=1e-3)  # the inner prefixes count
    assert out.l0().item() == pytest.approx(sae.k)


def test_dense_and_sparse_kernels_give_the_same_finite_gradients():
    x = torch.randn(16, 10, generator=torch.Generator().manual_seed(2))
    grads = {}
    for kernel in ("dense", "sparse"):
        sae = _random_sae(kernel, seed=3)
        dead = torch.zeros(WIDTHS[-1], dtype=torch.bool)
        dead[::3] = True  # AuxK on a third of the latents
        out = sae(x, dead_mask=dead)
        assert out.aux_loss.item() > 0
        out.loss.backward()
        grads[kernel] = {name: p.grad.clone() for name, p in sae.named_parameters()}
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads[kernel].values())
    for name, dense in grads["dense"].items():
        assert torch.allclose(grads["sparse"][name], dense, atol=1e-5), name


def test_an_inner_prefix_loss_reaches_only_its_own_latents():
    """The first prefix's error has no gradient into decoder rows outside it: the prefixes are nested."""
    sae = _random_sae("dense", seed=4)
    x = torch.randn(16, 10, generator=torch.Generator().manual_seed(5))
    out = sae(x)
    (first,) = sae.inner_reconstructions(out)[:1]
    sae.recon_loss(first, x).backward()
    assert sae.W_dec.grad[WIDTHS[0]:].abs().sum() == 0 and sae.W_dec.grad[:WIDTHS[0]].abs().sum() > 0


D, N_DIRS, K_ACTIVE, RUN = PLANTED_D, PLANTED_DIRECTIONS, PLANTED_K, PLANTED_RUN


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("planted"))


def test_matryoshka_learns_planted_directions_on_cpu(planted):
    store, directions = planted
    result = train_sae(SAEConfig(architecture="matryoshka", k=K_ACTIVE, matryoshka_groups=(0.25, 0.25, 0.5), **RUN),
                       store, device="cpu")
    metrics, _ = evaluate_sae(result.sae, store)
    score = recovery_score(result.sae.W_dec.detach(), directions)
    print(f"matryoshka recovery {score:.4f} l0 {metrics.l0:.3f} fvu {metrics.fvu:.4f}")
    assert result.sae.widths == [32, 64, 128]
    assert score > 0.9  # measured 0.94
    assert 0.85 * K_ACTIVE <= metrics.l0 <= 1.15 * K_ACTIVE  # the running threshold at inference (measured 2.90)
    assert metrics.fvu < 0.2  # measured 0.155
    losses = result.metrics["loss"].to_list()
    assert losses[-1] < 0.5 * losses[0]


def test_prefix_widths_from_group_fractions():
    cfg = SAEConfig(architecture="matryoshka", k=8, expansion_factor=8)
    assert MatryoshkaSAE.prefix_widths(cfg, 384) == [96, 192, 384, 768, 1536, 3072]  # the default groups
    thirds = SAEConfig(architecture="matryoshka", k=8, expansion_factor=1, matryoshka_groups=(1 / 3, 1 / 3, 1 / 3))
    assert MatryoshkaSAE.prefix_widths(thirds, 10) == [3, 7, 10]
    assert build_sae(thirds, 10).widths == [3, 7, 10]
    assert thirds.partition_key().startswith("matryoshka_exp1_k8_lr4e-03_aux3e-02_h")
    assert SAEConfig(architecture="matryoshka", k=8).partition_key() == "matryoshka_exp4_k8_lr4e-03_aux3e-02"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"architecture": "matryoshka"}, "k: required"),
        ({"architecture": "matryoshka", "k": 4, "matryoshka_groups": [0.5, 0.6]}, "sum to 1.1"),
        ({"architecture": "matryoshka", "k": 4, "matryoshka_groups": [1.0]}, "matryoshka_groups"),
        ({"architecture": "matryoshka", "k": 4, "matryoshka_groups": [0.5]}, "allowed: 2 to 64"),
        ({"architecture": "matryoshka", "k": 4, "matryoshka_groups": [-0.5, 1.5]}, "matryoshka_groups.0"),
        ({"architecture": "batchtopk", "k": 4, "matryoshka_groups": [0.5, 0.5]}, "only for architecture"),
    ],
)
def test_config_errors_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_sae_config(raw)


def test_a_group_rounded_to_no_latent_is_refused_before_training():
    cfg = SAEConfig(architecture="matryoshka", k=2, expansion_factor=1, matryoshka_groups=(0.01, 0.99))
    with pytest.raises(ConfigError, match="matryoshka_groups: .* every group needs at least one latent"):
        cfg.validate_for_model(16)


def _saved(tmp_path, seed: int = 6) -> tuple[SAEConfig, MatryoshkaSAE]:
    cfg = SAEConfig(architecture="matryoshka", k=3, expansion_factor=4, matryoshka_groups=(0.25, 0.75))
    sae = build_sae(cfg, 8)
    generator = torch.Generator().manual_seed(seed)
    sae.initialize(generator, b_dec=torch.randn(8, generator=generator))
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(32, generator=generator))
        sae.threshold.fill_(0.4)
    sae.eval().save(tmp_path, {"key": cfg.partition_key()})
    return cfg, sae


def test_save_load_round_trip_keeps_the_prefixes(tmp_path):
    _, sae = _saved(tmp_path)
    cfg_json = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg_json["architecture"] == "jumprelu" and cfg_json["sae_pipeline_architecture"] == "matryoshka"
    assert cfg_json["matryoshka_widths"] == [8, 32] and cfg_json["k"] == 3
    loaded = load_sae(tmp_path)
    assert isinstance(loaded, MatryoshkaSAE) and loaded.widths == [8, 32] and not loaded.training
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(7)) * 3
    with torch.no_grad():
        expected, expected_latents = sae.reconstruct(x)
        got, got_latents = loaded.reconstruct(x)
    assert torch.allclose(got, expected, atol=1e-6) and torch.equal(got_latents, expected_latents)
    assert (expected_latents == 0).any() and (expected_latents > 0).any()


def test_matryoshka_partition_through_dagster_passes_the_checks_and_reports(pipeline):
    """The same graph as every architecture: `sae` (its checks), `features`, `feature_labels`, `sweep_analysis`."""
    key = pipeline.register(tiny_topk(architecture="matryoshka", matryoshka_groups=(0.25, 0.25, 0.5)))
    assert key.startswith("matryoshka_exp2_k8_")
    result = pipeline.materialize([sae, features, feature_labels], partition_key=key)
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert {"sae_not_collapsed", "sae_dead_fraction", "sae_fvu"} <= set(checks)
    blocking = [name for name, e in checks.items() if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR]
    assert not blocking, blocking
    loaded = load_sae(pipeline.layout.sae_dir(key))
    assert isinstance(loaded, MatryoshkaSAE) and loaded.widths == [192, 384, 768]
    metrics = read_summary(pipeline.layout, key)["metrics"]
    assert set(metrics) == set(EvalMetrics.__dataclass_fields__) and 0 < metrics["fvu"] < 1
    assert pipeline.layout.labels_dir(key).exists()
    assert pipeline.materialize([sweep_analysis]).success
