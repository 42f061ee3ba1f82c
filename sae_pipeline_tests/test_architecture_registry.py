"""The architecture registry: an architecture registered at run time (its module's class and one `register` call,
no other file edited) validates, trains, passes its checks, saves, loads and reaches the sweep report; and the
built-in architectures' names stay inside `saes/`."""

from __future__ import annotations

import io
import shutil
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import torch
from torch import Tensor

from sae_pipeline.config import ConfigError, SAEConfig
from sae_pipeline.defs.assets import feature_labels, features, sae, sweep_analysis
from sae_pipeline.results import read_summary
from sae_pipeline.saes import ARCHITECTURES, ForwardOutput, SparseAutoencoder, load_sae, register
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.training import sparsity_coefficient
from sae_pipeline_tests.conftest import Pipeline, tiny_topk

PACKAGE = Path(__file__).resolve().parents[1] / "sae_pipeline"
SQRT_EPS = 1e-6


class LHalfSAE(SparseAutoencoder):
    """A ReLU SAE with an L1/2 penalty: l1_alpha * batch mean of the sum over latents of sqrt(z + eps)."""

    architecture = "lhalf"
    saelens_architecture = "standard"
    sparsity_field = "l1_alpha"
    key_fields = ("l1_alpha", "lr")
    config_defaults = {"lr": 1e-2}

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x))

    def forward(self, x: Tensor, sparsity_coeff: float | Tensor = 0.0, dead_mask: Tensor | None = None
                ) -> ForwardOutput:
        latents = self.encode(x)
        x_hat, half_norm = self.decode(latents), (latents + SQRT_EPS).sqrt().sum(dim=-1).mean()
        recon, sparsity = self.recon_loss(x_hat, x), sparsity_coeff * half_norm
        return ForwardOutput(x_hat, latents, recon + sparsity, recon, sparsity, torch.zeros((), device=x.device))


@pytest.fixture
def lhalf() -> Iterator[type[LHalfSAE]]:
    register(LHalfSAE)
    yield LHalfSAE
    ARCHITECTURES.pop(LHalfSAE.architecture)  # the other tests see the built-in registry


@pytest.fixture
def own_pipeline(pipeline: Pipeline, tmp_path: Path) -> Pipeline:
    """The session's corpus and activations copied into a fresh root with its own instance."""
    for name in ("corpus", "activations"):
        shutil.copytree(pipeline.root / name, tmp_path / name)
    return Pipeline(tmp_path, dg.DagsterInstance.ephemeral())


def _lhalf_config(**overrides: Any) -> SAEConfig:
    raw = {**tiny_topk().model_dump(exclude={"k", "lr", "lr_warmup_steps", "idle_latents_still"}),
           "architecture": "lhalf", "l1_alpha": 2.0, **overrides}
    return parse_sae_config(raw)


def test_a_registered_architecture_gets_its_rules_defaults_and_key(lhalf) -> None:
    cfg = _lhalf_config()
    assert (cfg.lr, cfg.lr_warmup_steps, cfg.idle_latents_still) == (1e-2, 50, False)  # its own, then the base's
    assert cfg.partition_key().startswith("lhalf_exp2_l1a2e+00_lr1e-02")
    assert sparsity_coefficient(cfg, step=10**6) == 2.0
    with pytest.raises(ConfigError, match="k: not used by architecture 'lhalf'; remove it"):
        _lhalf_config(k=4)
    with pytest.raises(ConfigError, match="l1_alpha: required for architecture 'lhalf'"):
        _lhalf_config(l1_alpha=None)
    with pytest.raises(ConfigError, match="resample_every: only for architecture 'relu', not 'lhalf'"):
        _lhalf_config(resample_every=5)
    with pytest.raises(ConfigError, match="kernel: 'sparse' exists for topk, batchtopk, matryoshka, not 'lhalf'"):
        _lhalf_config(kernel="sparse")


def test_an_unregistered_architecture_names_the_registered_ones(lhalf) -> None:
    with pytest.raises(ConfigError, match=r"architecture: .*'lquarter' is not registered; allowed: relu, topk, "
                                          r"batchtopk, jumprelu, gated, matryoshka, lhalf"):
        _lhalf_config(architecture="lquarter")


def test_register_refuses_an_incomplete_class_or_a_taken_name() -> None:
    class Nameless(SparseAutoencoder):
        saelens_architecture = "standard"

    with pytest.raises(TypeError, match="Nameless: an architecture sets architecture, sparsity_field, key_fields"):
        register(Nameless)

    class Impostor(LHalfSAE):
        architecture = "topk"

    with pytest.raises(ValueError, match="architecture 'topk': already registered as TopKSAE"):
        register(Impostor)
    assert ARCHITECTURES["topk"].__name__ == "TopKSAE"


def test_a_registered_architecture_trains_checks_saves_and_reports(lhalf, own_pipeline: Pipeline) -> None:
    key = own_pipeline.register(_lhalf_config())
    result = own_pipeline.materialize([sae, features, feature_labels], partition_key=key)
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert {"sae_not_collapsed", "sae_dead_fraction", "sae_fvu", "sae_l0_trend"} <= set(checks)
    assert checks["sae_l0_trend"].metadata["applicable"].value is False  # not L1-steered: not judged
    loaded = load_sae(own_pipeline.layout.sae_dir(key))
    assert type(loaded) is LHalfSAE and not loaded.training
    summary = read_summary(own_pipeline.layout, key)
    assert summary["config"]["architecture"] == "lhalf" and 0 < summary["metrics"]["fvu"] < 1
    assert own_pipeline.layout.labels_dir(key).exists()
    assert own_pipeline.materialize([sweep_analysis]).success
    report = (own_pipeline.root / "sweep_analysis" / "report.md").read_text()
    assert key in report


def _string_literals(path: Path) -> set[str]:
    """The values of a module's plain string literals (docstrings and f-strings are other tokens or prose)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {token.string[1:-1] for token in tokens if token.type == tokenize.STRING
            and token.string[:1] in "'\"" and not token.string.startswith(('"""', "'''"))}


def test_each_architecture_name_is_a_literal_in_at_most_two_modules_outside_saes() -> None:
    modules = [path for path in PACKAGE.rglob("*.py") if "saes" not in path.relative_to(PACKAGE).parts]
    literals = {path: _string_literals(path) for path in modules}
    for name in ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"):
        holders = sorted(str(path.relative_to(PACKAGE)) for path, found in literals.items() if name in found)
        assert len(holders) <= 2, (name, holders)
