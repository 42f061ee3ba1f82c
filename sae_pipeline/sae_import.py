"""Importing an SAE trained elsewhere as a partition (`sae-pipeline import-sae`): read from the SAELens layout
(`cfg.json` + `sae_weights.safetensors`: standard/ReLU, TopK, JumpReLU, gated; our own folders included) or a
sparsify checkpoint folder (`cfg.json` + `sae.safetensors`, TopK), checked against the activation store, and
kept under `imports/<key>/` in our layout, so the `sae` step evaluates, checks and publishes it like a trained
one (nothing is trained) and `features`, `feature_labels` and the sweep report take it from there."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from sae_pipeline.config import ConfigError, validate_partition_key
from sae_pipeline.saes import SparseAutoencoder, load_sae
from sae_pipeline.saes.base import CFG_FILE, WEIGHTS_FILE, read_cfg
from sae_pipeline.saes.registry import architecture_class
from sae_pipeline.storage import Layout, write_json_atomic
from sae_pipeline.store import read_meta, store_of_hook

IMPORTED_PREFIX = "imported_"
"""Every imported partition's key starts with this."""
IMPORT_FILE = "import.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
"""SAELens's `architecture` -> ours."""
NORMALISATIONS = {"none": "none", None: "none", "constant_norm_rescale": "per_token"}
"""SAELens's `normalize_activations` values we can run -> our `normalize`."""


@dataclass(frozen=True)
class ImportRecord:
    """What an imported partition is: where it came from and what it is."""

    key: str
    source: str
    """The folder it was read from."""
    format: str
    """`sae_pipeline`, `saelens` or `sparsify`."""
    architecture: str
    d_in: int
    d_sae: int
    model: str | None
    """The model its cfg names (None when it names none)."""
    hook_name: str | None
    """The hook its cfg names (None when it names none)."""
    store_hook: str | None
    """The hook of the activation store it reads (None: the activations' first hook)."""
    sha256: str
    """Of the weights as imported (our layout): re-importing the same SAE under the same name is a no-op."""
    hyperparameters: dict[str, Any]
    """The report's hyperparameter columns: architecture, expansion_factor, and k for TopK."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def imported_key(name: str) -> str:
    """`imported_<name>`, the name's characters outside [A-Za-z0-9_.+-] replaced by `-`."""
    return validate_partition_key(IMPORTED_PREFIX + re.sub(r"[^A-Za-z0-9_.+-]", "-", name).strip("-."))


def is_imported(key: str) -> bool:
    return key.startswith(IMPORTED_PREFIX)


def _fold_decoder_bias(tensors: dict[str, Tensor], architecture: str) -> None:
    """An SAE with `apply_b_dec_to_input: false` encodes x, not x - b_dec: move b_dec @ W_enc into the encoder
    biases so ours, which subtracts b_dec, gives the same latents."""
    shift = tensors["b_dec"] @ tensors["W_enc"]
    if architecture == "gated":
        tensors["b_gate"] = tensors["b_gate"] + shift
        tensors["b_mag"] = tensors["b_mag"] + shift * tensors["r_mag"].exp()
    else:
        tensors["b_enc"] = tensors["b_enc"] + shift


def _saelens_sae(folder: Path, cfg: dict[str, Any]) -> SparseAutoencoder:
    name = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    architecture = "topk" if name == "standard" and activation == "topk" else SAELENS_ARCHITECTURES.get(name)
    if architecture is None:
        raise ConfigError(f"{folder / CFG_FILE}: architecture {name!r} cannot be imported; allowed: "
                          f"{', '.join(SAELENS_ARCHITECTURES)}")
    for field, plain in (("reshape_activations", "none"), ("rescale_acts_by_decoder_norm", False)):
        if cfg.get(field, plain) != plain:
            raise ConfigError(f"{folder / CFG_FILE}: {field} {cfg[field]!r} cannot be imported; allowed: {plain!r}")
    normalisation = cfg.get("normalize_activations")
    if normalisation not in NORMALISATIONS:
        raise ConfigError(f"{folder / CFG_FILE}: normalize_activations {normalisation!r} cannot be imported; "
                          "allowed: none, constant_norm_rescale")
    tensors = {name: t.float() for name, t in load_file(str(folder / WEIGHTS_FILE)).items()}
    if cfg.get("apply_b_dec_to_input", True) is False:
        _fold_decoder_bias(tensors, architecture)
    cls = architecture_class(architecture)
    kwargs: dict[str, Any] = {}
    if architecture == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if not k:
            raise ConfigError(f"{folder / CFG_FILE}: a TopK SAE's cfg names no k (`k` or activation_fn_kwargs.k)")
        kwargs["k"] = int(k)
    sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), NORMALISATIONS[normalisation], **kwargs)
    sae.load_file_tensors(tensors)
    return sae.eval()


def _sparsify_sae(folder: Path, cfg: dict[str, Any]) -> SparseAutoencoder:
    for field in ("transcode", "skip_connection"):
        if cfg.get(field):
            raise ConfigError(f"{folder / CFG_FILE}: a sparsify checkpoint with {field}: true cannot be imported "
                              "(an SAE reconstructs its own input)")
    if cfg.get("activation", "topk") != "topk":
        raise ConfigError(f"{folder / CFG_FILE}: sparsify activation {cfg['activation']!r} cannot be imported; "
                          "allowed: 'topk'")
    tensors = load_file(str(folder / SPARSIFY_WEIGHTS))
    d_sae, d_in = tensors["encoder.weight"].shape
    sae = architecture_class("topk")(int(d_in), int(d_sae), k=int(cfg["k"]))
    sae.load_file_tensors({"W_enc": tensors["encoder.weight"].float().t().contiguous(),
                           "b_enc": tensors["encoder.bias"].float(), "W_dec": tensors["W_dec"].float(),
                           "b_dec": tensors["b_dec"].float()})
    return sae.eval()


def read_foreign_sae(folder: Path) -> tuple[SparseAutoencoder, str, dict[str, Any]]:
    """(the SAE, its format, its cfg.json) from a SAELens-layout folder or a sparsify checkpoint folder;
    ConfigError saying what the folder lacks otherwise. Weights are read with safetensors only."""
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file():
        raise ConfigError(f"import-sae: {folder} has no {CFG_FILE}; give a SAELens folder ({CFG_FILE} + "
                          f"{WEIGHTS_FILE}) or a sparsify checkpoint folder ({CFG_FILE} + {SPARSIFY_WEIGHTS})")
    cfg = read_cfg(folder)
    try:
        if "sae_pipeline_architecture" in cfg:
            return load_sae(folder), "sae_pipeline", cfg
        if (folder / WEIGHTS_FILE).is_file():
            return _saelens_sae(folder, cfg), "saelens", cfg
        if (folder / SPARSIFY_WEIGHTS).is_file():
            return _sparsify_sae(folder, cfg), "sparsify", cfg
    except (KeyError, RuntimeError, ValueError) as error:  # a tensor or field missing, a shape that disagrees
        raise ConfigError(f"import-sae: {folder}: the weights do not match its {CFG_FILE} "
                          f"({type(error).__name__}: {error})") from None
    raise ConfigError(f"import-sae: {folder} has {CFG_FILE} but neither {WEIGHTS_FILE} (SAELens) nor "
                      f"{SPARSIFY_WEIGHTS} (sparsify)")


def named_model_and_hook(cfg: dict[str, Any]) -> tuple[str | None, str | None]:
    """The model and hook a cfg.json names: top level (older SAELens, ours) or under `metadata` (SAELens 6)."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return (cfg.get("model_name") or metadata.get("model_name") or metadata.get("model"),
            cfg.get("hook_name") or metadata.get("hook_name"))


def check_against_store(sae: SparseAutoencoder, cfg: dict[str, Any], meta: dict[str, Any]) -> None:
    """Refuse an SAE that does not read the store's activations: its d_in against the store's width, and the
    model and hook its cfg names against the store's; the message names both."""
    if sae.d_in != int(meta["d_model"]):
        raise ConfigError(f"import-sae: the SAE reads d_in = {sae.d_in}, the activation store holds d_model = "
                          f"{meta['d_model']} ({meta['model']}, {meta.get('hook_name')})")
    model, hook = named_model_and_hook(cfg)
    if model is not None and model != meta["model"]:
        raise ConfigError(f"import-sae: the SAE was trained on model {model!r}, the activation store is of "
                          f"{meta['model']!r}")
    if hook is not None and meta.get("hook_name") is not None and hook != meta["hook_name"]:
        raise ConfigError(f"import-sae: the SAE reads hook {hook!r}, the activation store is at "
                          f"{meta['hook_name']!r}")


def imports_dir(layout: Layout, key: str) -> Path:
    return layout.root / "imports" / validate_partition_key(key)


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()


def store_for(activations: Path, cfg: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(the hook of the store an SAE reads, None for the folder's first; that store's meta.json): the store of
    the hook its cfg names when the activations hold one, else the first store (which `check_against_store`
    then refuses if the cfg names another hook)."""
    meta = read_meta(activations)
    hooks = meta.get("hooks") or [meta.get("hook_name")]
    _, hook = named_model_and_hook(cfg)
    chosen = hook if hook in hooks else None
    return chosen, read_meta(store_of_hook(activations, chosen))


def import_sae(layout: Layout, folder: Path, name: str | None, activations: Path) -> ImportRecord:
    """Read an SAE, check it against the store it reads in `activations` (`store_for`) and keep it as
    partition `imported_<name>` (default: the folder's name). Importing the same weights under the same name
    again returns the record already there; other weights under a taken name are refused."""
    folder = Path(folder).expanduser().resolve()
    key = imported_key(name or folder.name)
    sae, fmt, cfg = read_foreign_sae(folder)
    store_hook, meta = store_for(activations, cfg)
    check_against_store(sae, cfg, meta)
    model, hook = named_model_and_hook(cfg)
    existing = imported_record(layout, key)
    with layout.publish(imports_dir(layout, key)) as staged:
        sae.save(staged, metadata={"partition_key": key, "model": meta["model"], "hook_name": meta.get("hook_name"),
                                   "imported_from": str(folder), "import_format": fmt})
        record = ImportRecord(key, str(folder), fmt, sae.architecture, sae.d_in, sae.d_sae, model, hook,
                              store_hook, _digest(staged),
                              {"architecture": sae.architecture, "expansion_factor": sae.d_sae / sae.d_in,
                               **({"k": sae.k} if hasattr(sae, "k") else {})})
        if existing is not None and existing.sha256 != record.sha256:
            raise ConfigError(f"import-sae: {key} is already imported from {existing.source} with other "
                              "weights; give another --name")
        write_json_atomic(staged / IMPORT_FILE, record.as_dict())
    return record


def imported_record(layout: Layout, key: str) -> ImportRecord | None:
    """The record of an imported partition; None for a key that was not imported."""
    if not is_imported(key):
        return None
    path = layout.pull(imports_dir(layout, key), IMPORT_FILE) / IMPORT_FILE
    return ImportRecord(**json.loads(path.read_text())) if path.exists() else None


def load_imported(layout: Layout, key: str) -> SparseAutoencoder:
    """The SAE an imported partition keeps (our layout, safetensors)."""
    return load_sae(layout.pull(imports_dir(layout, key), CFG_FILE, WEIGHTS_FILE))


def partition_hook(layout: Layout, key: str) -> str | None:
    """The hook whose store a partition reads (None: the activations' first): an imported SAE's from its
    record, a trained one's from its registered config."""
    from sae_pipeline.registry import load_config

    record = imported_record(layout, key)
    return record.store_hook if record is not None else load_config(layout, key).hook
