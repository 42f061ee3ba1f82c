"""Config validation: errors name the field, partition keys are safe file names, sweeps expand as a grid."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from sae_pipeline.config import ConfigError, SAEConfig, validate_partition_key
from sae_pipeline.spec_errors import parse_sae_config, parse_spec
from sae_pipeline.sweep_spec import SweepSpec, load_sweep

SAFE_KEY = re.compile(r"^[A-Za-z0-9_.+-]+$")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"architecture": "topk"}, "k"),
        ({"architecture": "topk", "k": 8, "l1_alpha": 0.1}, "l1_alpha"),
        ({"architecture": "relu"}, "l1_alpha"),
        ({"architecture": "relu", "l1_alpha": 0.1, "k": 8}, "k"),
        ({"architecture": "topk", "k": 8, "lr": 0.0}, "lr"),
        ({"architecture": "topk", "k": 8, "lr": -1e-3}, "lr"),
        ({"architecture": "topk", "k": 8, "expansion_factor": 0}, "expansion_factor"),
        ({"architecture": "topk", "k": 8, "learning_rate": 1e-3}, "learning_rate"),
        ({"architecture": "relu", "l1_alpha": -0.5}, "l1_alpha"),
    ],
)
def test_invalid_config_error_names_the_field(raw, field):
    with pytest.raises(ConfigError) as info:
        parse_sae_config(raw, where="unit")
    message = str(info.value)
    assert message.startswith("unit: ")
    assert re.search(rf"\b{re.escape(field)}\b", message), message


def test_valid_configs_parse():
    topk = parse_sae_config({"architecture": "topk", "k": 8})
    relu = parse_sae_config({"architecture": "relu", "l1_alpha": 0.0})
    assert (topk.k, topk.l1_alpha) == (8, None)
    assert (relu.k, relu.l1_alpha) == (None, 0.0)


def test_config_is_frozen():
    cfg = SAEConfig(architecture="topk", k=8)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError subclass
        cfg.k = 9  # type: ignore[misc]


def test_validate_for_model_k_against_d_sae():
    cfg = SAEConfig(architecture="topk", k=64, expansion_factor=2)
    cfg.validate_for_model(33)  # d_sae 66 > 64
    with pytest.raises(ConfigError, match=r"^k: 64 must be < d_sae = 64"):
        cfg.validate_for_model(32)
    with pytest.raises(ConfigError, match=r"^k_aux: "):
        SAEConfig(architecture="topk", k=4, k_aux=64, expansion_factor=2).validate_for_model(32)


def test_partition_key_format_and_determinism():
    cfg = SAEConfig(architecture="topk", k=64, expansion_factor=32, lr=3e-4, aux_coeff=1 / 32)
    assert cfg.partition_key() == "topk_exp32_k64_lr3e-04_aux3e-02"
    # lr spelled in the key: the topk default (4e-3) is another config
    assert SAEConfig(architecture="topk", k=64, expansion_factor=32).partition_key() == \
        "topk_exp32_k64_lr4e-03_aux3e-02"
    relu = SAEConfig(architecture="relu", l1_alpha=5e-3, expansion_factor=8, lr=1e-3, seed=3, batch_size=512)
    assert re.fullmatch(r"relu_exp8_l1a5e-03_lr1e-03_h[0-9a-f]{6}", relu.partition_key()), relu.partition_key()
    assert relu.partition_key() == SAEConfig(**relu.model_dump()).partition_key()
    # non-default extras change the key, so two runs differing only in them never share files
    assert SAEConfig(architecture="topk", k=64, seed=1).partition_key() != \
        SAEConfig(architecture="topk", k=64, seed=2).partition_key()


@pytest.mark.parametrize(
    "cfg",
    [
        SAEConfig(architecture="topk", k=1, lr=1.0, aux_coeff=0.0, target_l0=0.05, train_tokens=12345),
        SAEConfig(architecture="relu", l1_alpha=1e-9, lr=1e-7, seed=5, batch_size=1),
        SAEConfig(architecture="relu", l1_alpha=123.0, expansion_factor=1024),
    ],
)
def test_partition_key_only_safe_characters(cfg):
    key = cfg.partition_key()
    assert SAFE_KEY.match(key), key
    assert ".." not in key and "/" not in key
    assert validate_partition_key(key) == key


@pytest.mark.parametrize("bad", ["../x", "a/b", "a..b", "a b", " ", "", "x" * 201, "a\\b", "a\nb"])
def test_validate_partition_key_rejects(bad):
    with pytest.raises(ConfigError, match="partition key"):
        validate_partition_key(bad)


@pytest.mark.parametrize("good", ["a", "topk_exp4_k8", "a.b", "a+b-c", "x" * 200])
def test_validate_partition_key_accepts(good):
    assert validate_partition_key(good) == good


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("lr", [3e-4, 3.4e-4, 2.6e-4]),
        ("l1_alpha", [1e-3, 1.4e-3]),
        ("aux_coeff", [1 / 32, 0.03]),
        ("normalize", ["dataset", "per_token", "none"]),
        ("l1_warmup_steps", [0, 100]),
        ("dead_tokens", [1000, 2000]),
    ],
)
def test_distinct_configs_get_distinct_keys(field, values):
    base = {"architecture": "relu", "l1_alpha": 1e-3} if field == "l1_alpha" or field == "l1_warmup_steps" \
        else {"architecture": "topk", "k": 8}
    spec = SweepSpec(name="distinct", base=base, grid={field: values})
    configs = spec.expand()
    assert [getattr(c, field) for c in configs] == values  # none silently dropped as a "duplicate"


def test_sweep_grid_is_cross_product():
    spec = SweepSpec(name="g", base={"architecture": "topk", "expansion_factor": 4},
                     grid={"k": [4, 8, 16], "lr": [1e-4, 3e-4], "seed": [0, 1]})
    configs = spec.expand()
    assert len(configs) == 3 * 2 * 2
    combos = {(c.k, c.lr, c.seed) for c in configs}
    assert combos == {(k, lr, s) for k in (4, 8, 16) for lr in (1e-4, 3e-4) for s in (0, 1)}
    assert all(c.expansion_factor == 4 and c.architecture == "topk" for c in configs)
    keys = [c.partition_key() for c in configs]
    assert len(set(keys)) == len(keys)
    assert [c.partition_key() for c in spec.expand()] == keys  # stable order


def test_sweep_deduplicates_repeated_points():
    spec = SweepSpec(name="d", base={"architecture": "topk"}, grid={"k": [8, 8, 16]},
                     points=[{"k": 16}, {"k": 32}])
    keys = [c.partition_key() for c in spec.expand()]
    assert keys == ["topk_exp4_k8_lr4e-03_aux3e-02", "topk_exp4_k16_lr4e-03_aux3e-02",
                    "topk_exp4_k32_lr4e-03_aux3e-02"]


def test_sweep_points_only_and_base_only():
    only_points = SweepSpec(name="p", points=[{"architecture": "relu", "l1_alpha": 1.0}])
    assert [c.architecture for c in only_points.expand()] == ["relu"]
    base_only = SweepSpec(name="b", base={"architecture": "topk", "k": 2})
    assert [c.k for c in base_only.expand()] == [2]


def test_sweep_bad_point_names_point_and_field():
    spec = SweepSpec(name="bad", base={"architecture": "topk"}, grid={"k": [4, None]})
    with pytest.raises(ConfigError, match=r"sweep 'bad' point 1: .*\bk\b"):
        spec.expand()


def test_sweep_unknown_field_named():
    with pytest.raises(ConfigError, match=r"grid\.kk: unknown SAEConfig field"):
        SweepSpec(name="u", base={"architecture": "topk", "k": 4}, grid={"kk": [1]}).expand()
    with pytest.raises(ConfigError, match=r"base\.l1: unknown SAEConfig field"):
        SweepSpec(name="u", base={"l1": 1.0}).expand()


def _write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_load_sweep_valid(tmp_path):
    path = _write(tmp_path, "name: s\nbase: {architecture: topk}\ngrid:\n  k: [4, 8]\n  lr: [0.001]\n")
    spec = load_sweep(path)
    assert [c.k for c in spec.expand()] == [4, 8]


def test_load_sweep_invalid_yaml(tmp_path):
    path = _write(tmp_path, "name: s\ngrid: {k: [4, 8\n")
    with pytest.raises(ConfigError, match=r"not valid YAML") as info:
        load_sweep(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_load_sweep_non_mapping(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="top level must be a mapping") as info:
        load_sweep(path)
    assert str(path) in str(info.value)


def test_load_sweep_empty_grid_list(tmp_path):
    path = _write(tmp_path, "name: s\nbase: {architecture: topk}\ngrid:\n  k: []\n")
    with pytest.raises(ConfigError, match=r"grid\.k: empty list"):
        load_sweep(path)


def test_load_sweep_empty_sweep(tmp_path):
    # With every grid list non-empty (checked above), a sweep cannot expand to zero configs: an empty grid and
    # no points fall back to the base alone. An empty sweep therefore fails on the base, naming the field.
    path = _write(tmp_path, "name: s\ngrid: {}\npoints: []\n")
    with pytest.raises(ConfigError, match=r"sweep 's' point 0: .*\bk: required for architecture 'topk'"):
        load_sweep(path)
    path = _write(tmp_path, "name: s\nbase: {architecture: relu, l1_alpha: 0.5}\ngrid: {}\npoints: []\n")
    assert [c.l1_alpha for c in load_sweep(path).expand()] == [0.5]


def test_load_sweep_missing_file_and_bad_field(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    path = _write(tmp_path, "name: s\nbase: {architecture: topk, k: 4}\ngridd: {k: [1]}\n")
    with pytest.raises(ConfigError, match=r"gridd") as info:
        load_sweep(path)
    assert str(path) in str(info.value)
    path = _write(tmp_path, "name: s\nbase: {architecture: topk, k: 4, lr: 0}\n")
    with pytest.raises(ConfigError, match=r"\blr\b"):
        load_sweep(path)


def test_key_hash_covers_only_the_fields_that_differ_from_defaults():
    """A field added later with a default must not change existing keys: only varied fields are hashed."""
    digest = hashlib.sha256(json.dumps({"log_every": 7}, sort_keys=True).encode()).hexdigest()[:6]
    key = SAEConfig(architecture="topk", k=8, log_every=7).partition_key()
    assert key == f"topk_exp4_k8_lr4e-03_aux3e-02_h{digest}"
    assert SAEConfig(architecture="topk", k=8).partition_key() == "topk_exp4_k8_lr4e-03_aux3e-02"


def test_sweep_size_is_bounded_before_expansion():
    with pytest.raises(ConfigError, match=r"sweep size: 10001 configs .* at most 10000"):
        parse_spec(SweepSpec, {"name": "big", "base": {"architecture": "topk", "k": 8},
                               "points": [{"seed": i} for i in range(10_001)]}, where="sweep")
    grid = {"lr": [1e-3] * 100, "seed": list(range(101))}  # 10,100 points, counted without a cross product
    with pytest.raises(ConfigError, match=r"grid lr 100 x seed 101 = 10100"):
        parse_spec(SweepSpec, {"name": "big", "base": {"architecture": "topk", "k": 8}, "grid": grid}, where="sweep")


def test_memory_estimate_bounds_batch_size():
    cfg = SAEConfig(architecture="topk", k=8, expansion_factor=4, batch_size=4096)
    cfg.validate_for_model(384, memory_bytes=cfg.training_bytes(384))  # exactly fits
    with pytest.raises(ConfigError, match=r"batch_size: 4096 .* allowed: 1 to \d+"):
        cfg.validate_for_model(384, memory_bytes=cfg.training_bytes(384) - 1)


# --- strict specs (issue 26): duplicate keys, no coercion, step counts bounded by the run ---------------------


@pytest.mark.parametrize(("text", "key", "first", "second"), [
    ("name: x\nbase:\n  architecture: topk\n  k: 16\n  k: 32\n", "k", 4, 5),
    ("name: x\nname: y\nbase: {architecture: topk, k: 16}\n", "name", 1, 2),
    ("name: x\npoints:\n  - {architecture: topk, k: 16, k: 32}\n", "k", 3, 3),
])
def test_a_duplicate_key_is_an_error_naming_both_lines(tmp_path, text, key, first, second):
    spec = tmp_path / "dup.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"duplicate key {key!r} (line {first} and line {second})")):
        load_sweep(spec)


@pytest.mark.parametrize(("raw", "field"), [
    ({"architecture": "topk", "k": "16"}, "k"),
    ({"architecture": "relu", "l1_alpha": "0.5"}, "l1_alpha"),
    ({"architecture": "topk", "k": 16, "log_every": 2.0}, "log_every"),
    ({"architecture": "topk", "k": 16, "allow_tf32": "yes"}, "allow_tf32"),
    ({"architecture": "topk", "k": 16, "adam_betas": ["0.9", 0.99]}, "adam_betas"),
    ({"architecture": 3, "k": 16}, "architecture"),
])
def test_types_are_strict_a_string_is_not_a_number(raw, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        parse_sae_config(raw)


def test_lists_still_give_tuples_and_ints_still_give_floats():
    cfg = parse_sae_config({"architecture": "matryoshka", "k": 8, "matryoshka_groups": [0.5, 0.5],
                            "adam_betas": [0.9, 0.99], "lr": 1})
    assert cfg.matryoshka_groups == (0.5, 0.5) and cfg.adam_betas == (0.9, 0.99) and cfg.lr == 1.0
    assert parse_sae_config(json.loads(json.dumps(cfg.model_dump(mode="json")))) == cfg  # stored configs reload


@pytest.mark.parametrize("field", ["lr_warmup_steps", "l1_warmup_steps", "log_every", "checkpoint_every"])
def test_a_step_count_longer_than_the_run_names_the_field_and_the_run_length(field):
    base = {"architecture": "relu", "l1_alpha": 1.0, "train_tokens": 20 * 1024, "batch_size": 1024}
    assert parse_sae_config({**base, field: 20}).total_steps() == 20  # as long as the run: allowed
    with pytest.raises(ConfigError, match=f"{field}: 21 steps is longer than the run's 20 steps"):
        parse_sae_config({**base, field: 21})


def test_defaults_longer_than_a_short_run_stay_valid():
    cfg = parse_sae_config({"architecture": "topk", "k": 8, "train_tokens": 10 * 1024})
    assert cfg.total_steps() == 10 and cfg.checkpoint_every > 10 and cfg.lr_warmup_steps > 10
