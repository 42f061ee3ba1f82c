"""Bad input is rejected before any compute or file write, with an error naming the field; corrupted inputs
give an error naming the file and overwrite nothing downstream; a failed or killed re-materialisation leaves
the previous outputs intact and readable. The data folder is hashed before and after every case."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
import torch

import sae_pipeline.defs.assets.reports as reports_module
import sae_pipeline.publish as publish_module
from sae_pipeline import cli
from sae_pipeline.defs.assets import activations, corpus, feature_labels, features, sae
from sae_pipeline.defs.resources import DeviceResource, QualityResource, StorageResource, TrackingResource
from sae_pipeline.saes import load_sae
from sae_pipeline.storage import atomic_dir
from sae_pipeline.training import CHECKPOINT_FILE
from sae_pipeline_tests.conftest import ALL_ASSETS, Pipeline
from sae_pipeline_tests.test_planted_faults import healthy

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tree_digest(root: Path) -> str:
    """sha256 over every path under `root` (folders included) and every file's bytes."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def error_text(result: dg.ExecuteInProcessResult) -> str:
    """Every error message of a failed run (step failures and resource-initialisation failures)."""
    messages = []
    for event in result.all_events:
        data = event.event_specific_data
        error = getattr(data, "error", None)
        while error is not None:
            messages.append(error.message)
            error = error.cause
    return "\n".join(messages)


# -------------------------------------------------------------------------------- sweep specs via the CLI

SWEEP_CASES = [
    ("unknown architecture", "base: {architecture: gated_v9, k: 8}", "architecture"),
    ("k >= d_sae", "base: {architecture: topk, expansion_factor: 1, k: 384}", "k"),
    ("k = 0", "base: {architecture: topk, k: 0}", "k"),
    ("k negative", "base: {architecture: topk, k: -4}", "k"),
    ("k missing for topk", "base: {architecture: topk}", "k"),
    ("k given to relu", "base: {architecture: relu, l1_alpha: 1.0, k: 8}", "k"),
    ("expansion factor 0", "base: {architecture: topk, k: 8, expansion_factor: 0}", "expansion_factor"),
    ("expansion factor not an integer", "base: {architecture: topk, k: 8, expansion_factor: 2.5}",
     "expansion_factor"),
    ("expansion factor a word", "base: {architecture: topk, k: 8, expansion_factor: big}", "expansion_factor"),
    ("lr zero", "base: {architecture: topk, k: 8, lr: 0}", "lr"),
    ("lr negative", "base: {architecture: topk, k: 8, lr: -0.001}", "lr"),
    ("l1 coefficient negative", "base: {architecture: relu, l1_alpha: -1.0}", "l1_alpha"),
    ("l1 coefficient missing for relu", "base: {architecture: relu}", "l1_alpha"),
    ("l1 coefficient given to topk", "base: {architecture: topk, k: 8, l1_alpha: 1.0}", "l1_alpha"),
    ("typo in base", "base: {architecture: topk, k: 8, learning_rate: 0.001}", "learning_rate"),
    ("typo in grid", "base: {architecture: topk, k: 8}\ngrid: {kk: [4, 8]}", "kk"),
    ("typo at top level", "base: {architecture: topk, k: 8}\ngrids: {k: [4]}", "grids"),
    ("grid expands to zero configs", "base: {architecture: topk, k: 8}\ngrid: {lr: []}", "grid.lr"),
    ("bad value inside a grid", "base: {architecture: topk}\ngrid: {k: [8, 0]}", "k"),
    ("target_l0 above 1", "base: {architecture: topk, k: 8, target_l0: 5}", "target_l0"),
    ("batch size 0", "base: {architecture: topk, k: 8, batch_size: 0}", "batch_size"),
    ("train_tokens not a number", "base: {architecture: topk, k: 8, train_tokens: lots}", "train_tokens"),
    ("lr decay fraction above 1", "base: {architecture: topk, k: 8, lr_decay_fraction: 2}", "lr_decay_fraction"),
    ("k_aux >= d_sae", "base: {architecture: topk, k: 8, expansion_factor: 1, k_aux: 384}", "k_aux"),
    ("normalize unknown", "base: {architecture: topk, k: 8, normalize: layer}", "normalize"),
    ("bad point", "base: {architecture: topk, k: 8}\npoints: [{k: 8, lr: 2.0}]", "lr"),
    *[(f"{field} infinite", f"base: {{architecture: {arch}, {sparsity}, {field}: .inf}}", field)
      for arch, sparsity, field in [
          ("relu", "lr: 0.001", "l1_alpha"), ("jumprelu", "lr: 0.001", "l0_coeff"),
          ("topk", "k: 8", "aux_coeff"), ("topk", "k: 8", "grad_clip"),
          ("jumprelu", "l0_coeff: 1.0", "jumprelu_bandwidth"),
          ("jumprelu", "l0_coeff: 1.0", "jumprelu_init_threshold")]],
    ("lr NaN", "base: {architecture: topk, k: 8, lr: .nan}", "lr"),
    ("seed 1e30", "base: {architecture: topk, k: 8, seed: 1.0e+30}", "seed"),
    ("seed negative", "base: {architecture: topk, k: 8, seed: -1}", "seed"),
    ("batch size 1e12", "base: {architecture: topk, k: 8, batch_size: 1000000000000}", "batch_size"),
    ("batch size beyond memory", "base: {architecture: topk, k: 8, expansion_factor: 1024, batch_size: 1048576}",
     "batch_size"),
    ("k true", "base: {architecture: topk, k: true}", "k"),
    ("batch size true", "base: {architecture: topk, k: 8, batch_size: true}", "batch_size"),
    ("6 x 40 grid", "base: {architecture: topk, k: 8}\ngrid: {" + ", ".join(
        f"{field}: [{', '.join(str(v) for v in range(1, 41))}]" for field in (
            "seed", "log_every", "checkpoint_every", "lr_warmup_steps", "l1_warmup_steps", "early_stop_window"))
     + "}", "sweep size"),
]
RAW_SWEEP_CASES = [
    ("not valid YAML", "name: [unclosed\nbase: {", "not valid YAML"),
    ("top level is a list", "- architecture: topk\n- k: 8\n", "top level"),
    ("empty file", "", "top level"),
    ("missing name", "base: {architecture: topk, k: 8}\n", "name: Field required"),
]


@pytest.fixture
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A storage root that already holds data (a registered config, a report), and a separate DAGSTER_HOME."""
    data = tmp_path / "data"
    (data / "configs").mkdir(parents=True)
    (data / "configs" / "topk_exp2_k8_lr1e-03_aux3e-02.json").write_text('{"architecture": "topk", "k": 8}\n')
    (data / "sweep_analysis").mkdir()
    (data / "sweep_analysis" / "report.md").write_text("# previous report\n")
    monkeypatch.setenv("SAE_PIPELINE_ROOT", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return data


@pytest.mark.parametrize(("text", "field"), [pytest.param(f"name: bad\n{body}\n", f"{field}:", id=name)
                                             for name, body, field in SWEEP_CASES]
                         + [pytest.param(text, field, id=name) for name, text, field in RAW_SWEEP_CASES])
def test_malformed_sweep_is_rejected_naming_the_field_and_writes_nothing(
        data_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture, text: str, field: str) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    before = tree_digest(data_home)
    assert cli.main(["register-sweep", str(spec)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and field in error, error
    assert tree_digest(data_home) == before
    with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as instance:
        assert instance.get_dynamic_partitions("sae_configs") == []


def test_missing_sweep_file_is_named(data_home: Path, capsys: pytest.CaptureFixture) -> None:
    before = tree_digest(data_home)
    assert cli.main(["register-sweep", str(data_home / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert tree_digest(data_home) == before


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
"""The billion-laughs shape: nine levels of nine aliases each (9^9 leaves once expanded)."""
HOSTILE_SPECS = [
    ("name escapes", "name: ../escape\nbase: {architecture: topk, k: 8}\n", "name:"),
    ("name with a slash", "name: a/b\nbase: {architecture: topk, k: 8}\n", "name:"),
    ("name with a space", "name: x y\nbase: {architecture: topk, k: 8}\n", "name:"),
    ("alias bomb", "name: bomb\nbase: {architecture: topk, k: 8}\n" + BOMB, "line 4: not valid YAML"),
    ("alias in base", "name: x\nk: &k 8\nbase: {architecture: topk, k: *k}\n", "line 3: not valid YAML"),
    ("oversized file", "name: big\nbase: {architecture: topk, k: 8}\n" + "#" * 300_000 + "\n", "bytes"),
    ("grid too large", "name: g\nbase: {architecture: topk}\ngrid: {k: [" + ",".join(map(str, range(1, 200)))
     + "], seed: [" + ",".join(map(str, range(100))) + "]}\n", "sweep size: 19900 configs"),
]


@pytest.mark.parametrize(("text", "field"), [pytest.param(t, f, id=n) for n, t, f in HOSTILE_SPECS])
def test_hostile_spec_is_rejected_within_a_second_naming_file_and_line(
        data_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture, text: str, field: str) -> None:
    spec = tmp_path / "hostile.yaml"
    spec.write_text(text)
    before = tree_digest(data_home)
    started = time.perf_counter()
    assert cli.main(["register-sweep", str(spec)]) == 2
    assert time.perf_counter() - started < 1.0
    error = capsys.readouterr().err
    assert error.startswith("error: ") and field in error and str(spec) in error, error
    assert tree_digest(data_home) == before


def test_sweep_files_sensor_reads_hostile_specs_with_the_same_bounds(tmp_path: Path) -> None:
    from sae_pipeline.registry import scan_sweeps

    folder = tmp_path / "sweeps"
    folder.mkdir()
    (folder / "bomb.yaml").write_text("name: bomb\nbase: {architecture: topk, k: 8}\n" + BOMB)
    (folder / "big.yaml").write_text("name: big\n" + "#" * 2_000_000 + "\n")
    started = time.perf_counter()
    found = {sweep.path.name: sweep for sweep in scan_sweeps(folder)}
    assert time.perf_counter() - started < 1.0
    assert found["bomb.yaml"].spec is None and "line 4" in found["bomb.yaml"].error
    assert found["big.yaml"].spec is None and "bytes" in found["big.yaml"].error


@pytest.mark.parametrize("name", ["my sweep.yaml", "a..b.yaml", "a;b.yaml"])
def test_spec_file_name_follows_the_key_rule(data_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            name: str) -> None:
    spec = tmp_path / name
    spec.write_text("name: fine\nbase: {architecture: topk, k: 8}\n")
    before = tree_digest(data_home)
    assert cli.main(["register-sweep", str(spec)]) == 2
    assert "file name" in capsys.readouterr().err
    assert tree_digest(data_home) == before


# ------------------------------------------------------------------- asset config and resources via Dagster


@pytest.fixture(scope="module")
def copy(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, str]:
    """A copy of the session store with one healthy partition (sae + features) materialised."""
    root = tmp_path_factory.mktemp("bad_input") / "root"
    shutil.copytree(pipeline.root, root, ignore=shutil.ignore_patterns("sae", "features", "feature_labels",
                                                                        "checkpoints", "sweep_analysis"))
    pipe = Pipeline(root, dg.DagsterInstance.ephemeral())
    key = pipe.register(healthy(seed=11))
    assert pipe.materialize([sae, features], partition_key=key).success
    return pipe, key


def _run(pipe: Pipeline, selection: list, key: str | None = None, run_config: dict | None = None,
         **resources) -> dg.ExecuteInProcessResult:
    return dg.materialize(ALL_ASSETS, selection=selection, instance=pipe.instance,
                          resources={**pipe.resources(), **resources}, partition_key=key,
                          run_config=run_config or {}, raise_on_error=False)


def _ops(asset: str, **config) -> dict:
    return {"ops": {asset: {"config": config}}}


DAGSTER_CASES = [
    ("context length 0", [corpus], _ops("corpus", context_length=0), {}, "context_length"),
    ("max_sequences 0", [corpus], _ops("corpus", max_sequences=0), {}, "max_sequences"),
    ("layer above the model", [activations], _ops("activations", layer=6), {}, "layer: 6 out of range"),
    ("layer negative", [activations], _ops("activations", layer=-1), {}, "layer"),
    ("bad layer with the corpus in the same run", [corpus, activations], _ops("activations", layer=9), {},
     "layer: 9 out of range"),
    ("eval fraction 1", [activations], _ops("activations", eval_fraction=1.0), {}, "eval_fraction"),
    ("shard too small", [activations], _ops("activations", shard_tokens=10), {}, "shard_tokens"),
    ("batch size 0", [activations], _ops("activations", batch_size=0), {}, "batch_size"),
    ("outlier ratio below 1", [activations], _ops("activations", exclude_norm_outliers=0.5), {},
     "exclude_norm_outliers"),
    ("unknown shard dtype", [activations], _ops("activations", dtype="float8"), {}, "dtype"),
    ("unknown threshold", [activations], {}, {"quality_thresholds": QualityResource(overrides={"fvu_eror": 1.0})},
     "fvu_eror"),
    ("threshold out of range", [activations], {},
     {"quality_thresholds": QualityResource(overrides={"dead_fraction_warn": 2.0})}, "dead_fraction_warn"),
    ("thresholds out of order", [activations], {},
     {"quality_thresholds": QualityResource(overrides={"fvu_warn": 3.0})}, "fvu_warn"),
    ("unknown device", [sae], {}, {"device": DeviceResource(device="tpu")}, "device"),
    ("unknown tracker", [sae], {}, {"tracking": TrackingResource(trackers="wandb,neptune")},
     "resources.tracking.config.trackers (SAE_PIPELINE_TRACKING): unknown tracker 'neptune'; allowed: wandb, mlflow"),
    ("unknown device for activations", [activations], {}, {"device": DeviceResource(device="tpu")}, "device: 'tpu'"),
    ("unknown device for the corpus and activations", [corpus, activations], {},
     {"device": DeviceResource(device="tpu")}, "device: 'tpu'"),
]


@pytest.mark.parametrize(("selection", "run_config", "resources", "field"),
                         [pytest.param(*case[1:], id=case[0]) for case in DAGSTER_CASES])
def test_bad_asset_config_or_resource_is_rejected_before_any_write(
        copy: tuple[Pipeline, str], selection: list, run_config: dict, resources: dict, field: str) -> None:
    pipe, key = copy
    before = tree_digest(pipe.root)
    try:
        result = _run(pipe, selection, key if selection == [sae] else None, run_config, **resources)
        assert not result.success
        text = error_text(result)
    except dg.DagsterInvalidConfigError as error:  # refused at launch, before the run started
        text = str(error)
    assert field in text, text
    assert tree_digest(pipe.root) == before


DOWNSTREAM_CASES = [
    ("features top_n 0", "features", {"top_n": 0}, "top_n"),
    ("features window -1", "features", {"window": -1}, "window"),
    ("features n_bands 0", "features", {"n_bands": 0}, "n_bands"),
    ("labeller bogus", "feature_labels", {"labeller": "bogus"}, "labeller"),
    ("max_latents -5", "feature_labels", {"max_latents": -5}, "max_latents"),
]


@pytest.mark.parametrize(("asset", "config", "field"), [pytest.param(*case[1:], id=case[0])
                                                        for case in DOWNSTREAM_CASES])
def test_bad_downstream_config_fails_before_training(copy: tuple[Pipeline, str], asset: str, config: dict,
                                                     field: str) -> None:
    pipe, key = copy
    before = tree_digest(pipe.root)
    result = _run(pipe, [sae, features, feature_labels], key, _ops(asset, **config))
    assert not result.success and f"{asset} config" in error_text(result) and field in error_text(result)
    assert not result.asset_materializations_for_node("sae")  # failed at the first step: nothing retrained
    assert tree_digest(pipe.root) == before


LAUNCH_CASES = [
    ("context length 1", "corpus", {"context_length": 1}, "context_length"),
    ("min words 0", "corpus", {"min_words": 0}, "min_words"),
    ("max sequences 0", "corpus", {"max_sequences": 0}, "max_sequences"),
    ("source empty", "corpus", {"source": ""}, "source: '' is empty"),
    ("source blank", "corpus", {"source": "  "}, "source: '  ' is empty"),
    ("source a missing file", "corpus", {"source": "./no/such/corpus.txt"}, "does not exist"),
    ("eval fraction 0", "activations", {"eval_fraction": 0.0}, "eval_fraction"),
    ("shard tokens 1", "activations", {"shard_tokens": 1}, "shard_tokens"),
    ("outlier ratio 1", "activations", {"exclude_norm_outliers": 1.0}, "exclude_norm_outliers"),
]


@pytest.mark.parametrize(("asset", "config", "field"), [pytest.param(*c[1:], id=c[0]) for c in LAUNCH_CASES])
def test_bad_run_config_is_refused_at_launch(copy: tuple[Pipeline, str], asset: str, config: dict,
                                            field: str) -> None:
    """Refused while the run config is resolved: no run, no step, nothing written, well under a second."""
    pipe, _ = copy
    before, runs = tree_digest(pipe.root), len(pipe.instance.get_runs())
    started = time.perf_counter()
    with pytest.raises(dg.DagsterInvalidConfigError) as refused:
        _run(pipe, [corpus, activations], run_config=_ops(asset, **config))
    assert time.perf_counter() - started < 1.0
    assert field in str(refused.value) and f"ops.{asset}.config" in str(refused.value), str(refused.value)
    assert len(pipe.instance.get_runs()) == runs
    assert tree_digest(pipe.root) == before


def test_dagster_job_execute_refuses_bad_run_config_before_any_step(tmp_path: Path) -> None:
    root, home = tmp_path / "root", tmp_path / "home"
    home.mkdir()
    run_config = tmp_path / "bad.yaml"
    run_config.write_text("ops:\n  corpus:\n    config:\n      context_length: 1\n")
    env = {**os.environ, "SAE_PIPELINE_ROOT": str(root), "DAGSTER_HOME": str(home)}
    done = subprocess.run([str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m",
                           "sae_pipeline.definitions", "-j", "prepare_activations", "-c", str(run_config)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "context_length" in done.stderr + done.stdout and "STEP_START" not in done.stderr + done.stdout
    assert not root.exists()


def test_empty_corpus_is_rejected(copy: tuple[Pipeline, str], tmp_path: Path) -> None:
    pipe, _ = copy
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    before = tree_digest(pipe.root)
    result = _run(pipe, [corpus], run_config=_ops("corpus", source=str(empty)))
    assert not result.success and "corpus.source" in error_text(result) and "no documents" in error_text(result)
    assert tree_digest(pipe.root) == before


@pytest.mark.parametrize(("key", "message"), [
    ("bad key!", "partition key"),
    ("..", "partition key"),
    ("topk_exp9_k1_never_registered", "not registered (no "),
    ("topk_exp9_k2_never_registered", "`sae-pipeline register-sweep <file>`"),
])
def test_bad_partition_key_is_rejected(copy: tuple[Pipeline, str], key: str, message: str) -> None:
    pipe, _ = copy
    pipe.instance.add_dynamic_partitions("sae_configs", [key])
    before = tree_digest(pipe.root)
    result = _run(pipe, [sae], key)
    assert not result.success and message in error_text(result)
    assert tree_digest(pipe.root) == before


@pytest.mark.parametrize(("stored", "field"), [
    ('{"architecture": "topk", "k": 8, "expansion_factr": 2}', "expansion_factr"),
    ('{"architecture": "topk", "k": 500, "expansion_factor": 1}', "k: 500 must be < d_sae = 384"),
    ('{"architecture": "topk", "k": 8, "expansion_factor": 1024, "batch_size": 1048576}',
     "batch_size: 1048576 x d_sae 393216 needs about"),
])
def test_bad_registered_config_is_rejected_before_training(copy: tuple[Pipeline, str], stored: str,
                                                           field: str) -> None:
    pipe, _ = copy
    key = "topk_hand_edited"
    (pipe.layout.configs_dir / f"{key}.json").write_text(stored)  # a hand-edited or stale registry entry
    pipe.instance.add_dynamic_partitions("sae_configs", [key])
    before = tree_digest(pipe.root)
    result = _run(pipe, [sae], key)
    assert not result.success and field in error_text(result), error_text(result)
    assert tree_digest(pipe.root) == before
    (pipe.layout.configs_dir / f"{key}.json").unlink()


# ------------------------------------------------------------------------------ corrupted inputs via Dagster


def _outputs_digest(pipe: Pipeline, key: str) -> tuple[str, str]:
    return tree_digest(pipe.layout.sae_dir(key)), tree_digest(pipe.layout.features_dir(key))


@pytest.mark.parametrize("fault", ["truncated shard", "missing shard", "meta disagrees", "meta not JSON"])
def test_corrupted_store_names_the_file_and_overwrites_nothing(copy: tuple[Pipeline, str], fault: str) -> None:
    pipe, key = copy
    folder = pipe.layout.activations_dir
    shard, meta = folder / "train_00001.safetensors", folder / "meta.json"
    saved = {path: path.read_bytes() for path in (shard, meta)}
    outputs = _outputs_digest(pipe, key)
    try:
        if fault == "truncated shard":
            shard.write_bytes(saved[shard][: len(saved[shard]) // 2])
        elif fault == "missing shard":
            shard.unlink()
        elif fault == "meta disagrees":
            meta.write_text(saved[meta].decode().replace('"n_tokens": 1024', '"n_tokens": 1000', 1))
            assert meta.read_bytes() != saved[meta]
        else:
            meta.write_text(saved[meta].decode()[:100])
        named = "meta.json" if fault == "meta not JSON" else "train_0000"
        for selection in ([sae], [features]):
            result = _run(pipe, selection, key)
            assert not result.success
            assert named in error_text(result) and str(folder) in error_text(result), error_text(result)
            assert _outputs_digest(pipe, key) == outputs
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


@pytest.mark.parametrize("fault", ["another config", "truncated"])
def test_bad_checkpoint_names_the_file_and_overwrites_nothing(copy: tuple[Pipeline, str], fault: str) -> None:
    pipe, key = copy
    path = pipe.layout.checkpoint_dir(key) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True)
    torch.save({"config": healthy(seed=99).model_dump_json(), "step": 10}, path)
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[:20])
    outputs = _outputs_digest(pipe, key)
    try:
        result = _run(pipe, [sae, features], key)
        assert not result.success
        assert str(path) in error_text(result), error_text(result)
        assert ("another config" if fault == "another config" else "unreadable") in error_text(result)
        assert _outputs_digest(pipe, key) == outputs
        assert not result.asset_materializations_for_node("features")
    finally:
        shutil.rmtree(path.parent)


# -------------------------------------------------------------------------------- atomic re-materialisation


def test_failure_mid_write_leaves_previous_outputs_intact(copy: tuple[Pipeline, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pipe, key = copy
    outputs = _outputs_digest(pipe, key)
    written = []

    def dies_mid_write(path: Path, data: bytes) -> None:  # cfg.json and weights are already in the new folder
        written.append(sorted(p.name for p in path.parent.iterdir()))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish_module, "write_bytes_atomic", dies_mid_write)
    result = _run(pipe, [sae], key)
    assert not result.success and "No space left" in error_text(result)
    assert "sae_weights.safetensors" in written[0]  # the failure really came after a partial write
    assert _outputs_digest(pipe, key) == outputs
    assert not [p for p in pipe.layout.sae_dir(key).parent.iterdir() if ".tmp-" in p.name]
    assert load_sae(pipe.layout.sae_dir(key)).d_sae == 384  # still readable


def test_killed_mid_write_leaves_previous_outputs_intact(tmp_path: Path) -> None:
    final = tmp_path / "sae" / "key"
    with atomic_dir(final) as folder:
        (folder / "weights.bin").write_bytes(b"previous")
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from sae_pipeline.storage import atomic_dir
        with atomic_dir(Path({str(final)!r})) as folder:
            (folder / "weights.bin").write_bytes(b"half of the new")
            print("writing", flush=True)
            time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert process.stdout.readline().strip() == b"writing"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert (final / "weights.bin").read_bytes() == b"previous"
    assert [p for p in final.parent.iterdir() if ".tmp-" in p.name]  # the kill left its half-written folder
    with atomic_dir(final) as folder:  # the next write cleans it up
        (folder / "weights.bin").write_bytes(b"new")
    assert (final / "weights.bin").read_bytes() == b"new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["key"]


def test_concurrent_writer_keeps_a_live_writers_folder(tmp_path: Path) -> None:
    """Two writers of one folder at once (two `run-sweep` on a fresh root): neither removes the other's
    temporary folder, and each swap leaves one complete folder."""
    final = tmp_path / "activations"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from sae_pipeline.storage import atomic_dir
        with atomic_dir(Path({str(final)!r})) as folder:
            (folder / "first.bin").write_bytes(b"first half")
            print("writing", flush=True)
            sys.stdin.readline()
            (folder / "second.bin").write_bytes(b"second half")
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert process.stdout.readline().strip() == b"writing"
        with atomic_dir(final) as folder:  # recovers `final` while the other writer is mid-write
            (folder / "other.bin").write_bytes(b"the other writer")
        assert (final / "other.bin").read_bytes() == b"the other writer"
        _, stderr = process.communicate(b"go\n", timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr.decode()
    assert sorted(p.name for p in final.iterdir()) == ["first.bin", "second.bin"]  # the last swap, whole
    assert sorted(p.name for p in final.parent.iterdir()) == ["activations"]


# ------------------------------------------------------------------- environment faults: one line, no traceback


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("where", "named"), [("/dev/zero", "not a regular file"), ("folder", "not a regular file")])
def test_register_sweep_on_a_device_or_folder_is_one_line(data_home: Path, tmp_path: Path, where: str, named: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    path = tmp_path if where == "folder" else Path(where)
    before = tree_digest(data_home)
    assert cli.main(["register-sweep", str(path)]) == 2
    assert named in _one_line_error(capsys)
    assert tree_digest(data_home) == before


@pytest.mark.parametrize(("model", "named"), [("no-such-org/no-such-model", "cannot be loaded"),
                                              ("/no/such/model/folder", "does not exist")])
def test_register_sweep_with_an_unloadable_model_is_one_line(data_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                             model: str, named: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("SAE_PIPELINE_MODEL", model)  # conftest sets HF_HUB_OFFLINE: a Hub name cannot resolve
    before = tree_digest(data_home)
    assert cli.main(["register-sweep", str(REPO / "data/sweeps/ci.yaml")]) == 2
    error = _one_line_error(capsys)
    assert f"model: {model!r}" in error and named in error, error
    assert tree_digest(data_home) == before


def test_unwritable_root_is_found_before_anything_runs(data_home: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture,
                                                       copy: tuple[Pipeline, str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the root's parent should be")
    monkeypatch.setenv("SAE_PIPELINE_ROOT", str(blocker / "data"))
    assert cli.main(["register-sweep", str(REPO / "data/sweeps/ci.yaml")]) == 2
    assert "storage root" in _one_line_error(capsys)
    pipe, key = copy
    result = _run(pipe, [sae], key, storage=StorageResource(root=str(blocker / "data")))
    assert not result.success and "not writable" in error_text(result), error_text(result)
    assert not result.asset_materializations_for_node("sae")


def test_failed_sweep_report_in_run_sweep_is_one_line(data_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    def report_fails(*args, **kwargs):
        raise RuntimeError("planted report failure")

    monkeypatch.setattr(cli, "register", lambda path, dry_run: [])
    monkeypatch.setattr(cli, "ensure_activations", lambda *args: True)
    monkeypatch.setattr(reports_module, "build_sweep_report", report_fails)
    assert cli.main(["run-sweep", str(REPO / "data/sweeps/ci.yaml")]) == 1
    err = capsys.readouterr().err
    assert "error: analyze_sweep failed: sweep_analysis: " in err and "planted report failure" in err, err
