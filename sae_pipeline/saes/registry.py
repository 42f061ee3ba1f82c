"""The architecture registry: name -> class, and building or loading an SAE by name.

Adding an architecture is its module plus one line in `_BUILT_IN` (or a `register` call at run time): the config's
rules, defaults and partition key, the trainer's penalty, the calibration loop and the checks all read the class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sae_pipeline.saes.base import SparseAutoencoder, load_state, read_cfg
from sae_pipeline.saes.batchtopk import BatchTopKSAE
from sae_pipeline.saes.gated import GatedSAE
from sae_pipeline.saes.jumprelu import JumpReLUSAE
from sae_pipeline.saes.matryoshka import MatryoshkaSAE
from sae_pipeline.saes.relu import ReluSAE
from sae_pipeline.saes.topk import TopKSAE

if TYPE_CHECKING:  # the architectures import with torch alone (sae_pipeline.bench on a GPU machine)
    from sae_pipeline.config import SAEConfig

_BUILT_IN: tuple[type[SparseAutoencoder], ...] = (ReluSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE,
                                                  MatryoshkaSAE)
ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {}
"""Every registered architecture by name, in registration order."""
DEFAULT_ARCHITECTURE = TopKSAE.architecture
_REQUIRED = ("architecture", "saelens_architecture", "sparsity_field", "key_fields")


def register(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """Add an architecture (usable as a class decorator); TypeError when it lacks a required class attribute,
    ValueError when its name is taken by another class."""
    missing = [name for name in _REQUIRED if not hasattr(cls, name)]
    if missing:
        raise TypeError(f"{cls.__name__}: an architecture sets {', '.join(missing)}")
    if cls.key_fields[:1] != (cls.sparsity_field,):
        raise TypeError(f"{cls.__name__}: key_fields must start with its sparsity_field {cls.sparsity_field!r}")
    taken = ARCHITECTURES.get(cls.architecture)
    if taken is not None and taken is not cls:
        raise ValueError(f"architecture {cls.architecture!r}: already registered as {taken.__name__}")
    ARCHITECTURES[cls.architecture] = cls
    return cls


for _cls in _BUILT_IN:
    register(_cls)


def architecture_class(name: str) -> type[SparseAutoencoder]:
    """The class registered as `name`; ValueError listing the registered names otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"architecture: {name!r} is not registered; allowed: {', '.join(ARCHITECTURES)}") from None


def sparsity_fields() -> list[str]:
    """The SAEConfig fields that set some registered architecture's sparsity (k, l1_alpha, l0_coeff, ...)."""
    return list(dict.fromkeys(cls.sparsity_field for cls in ARCHITECTURES.values()))


def exclusive_owners() -> dict[str, list[str]]:
    """Field -> the registered architectures that may set it away from its default (`exclusive_fields`, inherited)."""
    owners: dict[str, list[str]] = {}
    for name, cls in ARCHITECTURES.items():
        for field in dict.fromkeys(f for klass in cls.__mro__ for f in vars(klass).get("exclusive_fields", ())):
            owners.setdefault(field, []).append(name)
    return owners


def build_sae(cfg: SAEConfig, d_in: int) -> SparseAutoencoder:
    """A fresh (uninitialised) SAE for a config and model width."""
    cfg.validate_for_model(d_in)
    return architecture_class(cfg.architecture).from_config(cfg, d_in)


def load_sae(folder: str | Path) -> SparseAutoencoder:
    """Rebuild an SAE from cfg.json + sae_weights.safetensors alone."""
    cfg = read_cfg(Path(folder))
    cls = architecture_class(cfg["sae_pipeline_architecture"])
    normalize = "per_token" if cfg["normalize_activations"] == "constant_norm_rescale" else "none"
    sae = cls(cfg["d_in"], cfg["d_sae"], normalize, **cls.cfg_kwargs(cfg))
    return load_state(sae, Path(folder)).eval()
