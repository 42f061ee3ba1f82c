"""`sae-pipeline register-sweep`: keys printed, partitions registered, invalid specs rejected by field."""

from __future__ import annotations

import concurrent.futures
import fcntl
from pathlib import Path

import dagster as dg
import pytest

from sae_pipeline import cli
from sae_pipeline.defs.partitions import key_ranges
from sae_pipeline.storage import Layout
from sae_pipeline.sweep_spec import load_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAE_PIPELINE_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path


def test_register_prints_keys_and_adds_partitions(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["register-sweep", str(REPO / "data/sweeps/default.yaml")]) == 0
    keys = capsys.readouterr().out.split()
    expected = [c.partition_key() for c in load_sweep(REPO / "data/sweeps/default.yaml").expand()]
    assert keys == expected and len(keys) >= 4
    with dg.DagsterInstance.from_config(str(home / "home")) as instance:
        assert set(instance.get_dynamic_partitions("sae_configs")) == set(keys)
    stored = sorted(p.stem for p in Layout(home / "data").configs_dir.glob("*.json"))
    assert stored == sorted(keys)


def test_dry_run_registers_nothing(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["register-sweep", "--dry-run", str(REPO / "data/sweeps/ci.yaml")]) == 0
    assert capsys.readouterr().out.strip()
    assert not (home / "data").exists()
    with dg.DagsterInstance.from_config(str(home / "home")) as instance:
        assert instance.get_dynamic_partitions("sae_configs") == []


@pytest.mark.parametrize(("text", "field"), [
    ("name: x\nbase: {architecture: topk}\n", "k"),
    ("name: x\nbase: {architecture: topk, k: 8, lr: -1}\n", "lr"),
    ("name: x\nbase: {architecture: relu, l1_alpha: 1.0, lerning_rate: 0.1}\n", "lerning_rate"),
    ("name: x\nbase: {architecture: topk, k: 5000}\n", "k"),  # k >= d_sae = 4 * 384
    ("name: x\ngrid: {k: []}\nbase: {architecture: topk}\n", "grid.k"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_invalid_spec_exits_nonzero_naming_field(home: Path, capsys: pytest.CaptureFixture, text: str,
                                                 field: str) -> None:
    spec = home / "bad.yaml"
    spec.write_text(text)
    assert cli.main(["register-sweep", str(spec)]) == 2
    assert field in capsys.readouterr().err
    assert not (home / "data").exists()


def test_a_fresh_instance_is_created_under_a_lock(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """Two first commands on a fresh DAGSTER_HOME must not create and migrate its databases at once."""
    real_get, locked = dg.DagsterInstance.get, []

    def get_and_probe_the_lock() -> dg.DagsterInstance:
        with open(home / "home" / cli.INSTANCE_LOCK, "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                locked.append(True)
            else:
                locked.append(False)
        return real_get()

    monkeypatch.setattr(dg.DagsterInstance, "get", staticmethod(get_and_probe_the_lock))
    assert cli.main(["register-sweep", str(REPO / "data/sweeps/ci.yaml")]) == 0
    assert locked == [True]


def test_first_commands_at_once_share_one_instance(home: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        instances = list(pool.map(lambda _: cli.open_instance(), range(4)))
    for instance in instances:
        instance.add_dynamic_partitions("sae_configs", ["a"])
    with dg.DagsterInstance.from_config(str(home / "home")) as instance:
        assert instance.get_dynamic_partitions("sae_configs") == ["a"]


def test_activations_are_extracted_under_a_lock_on_the_root(tmp_path: Path) -> None:
    """Two `run-sweep` on a fresh root: the second waits for the first's extraction, then finds the store."""
    layout, locked = Layout(tmp_path / "data"), []

    class Job:
        def execute_in_process(self, **kwargs):
            with open(layout.root / ".activations.lock", "a") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    locked.append(True)
            (layout.activations_dir / "meta.json").parent.mkdir(parents=True)
            (layout.activations_dir / "meta.json").write_text("{}")
            return type("Result", (), {"success": True})()

    defs = type("Defs", (), {"resolve_job_def": lambda self, name: Job()})()
    stop = type("Stop", (), {"execute": lambda self, job, instance, **kwargs: job.execute_in_process(**kwargs)})()
    assert cli.ensure_activations(defs, None, layout, False, stop)
    assert cli.ensure_activations(defs, None, layout, False, stop)  # found: not extracted again
    assert locked == [True]


def test_key_ranges_are_consecutive_in_partition_order_and_bounded() -> None:
    ordered = ["a", "b", "c", "d", "e", "f", "g"]
    assert key_ranges(ordered, {"a", "b", "d", "e", "f", "g"}, 3) == [["a", "b"], ["d", "e", "f"], ["g"]]
    assert key_ranges(ordered, set(), 3) == []
    assert key_ranges(ordered, {"g", "x"}, 8) == [["g"]]  # a key not registered is not in any range


def test_import_sae_refuses_a_folder_without_an_sae_before_any_work(home: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    (home / "empty").mkdir()
    assert cli.main(["import-sae", str(home / "empty"), "--name", "x"]) == 2
    assert "has no cfg.json" in capsys.readouterr().err
    assert not (home / "data" / "activations").exists()  # refused before activations were extracted
