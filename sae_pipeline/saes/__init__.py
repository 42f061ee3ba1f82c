"""SAE architectures behind one interface; adding one is adding a module and a registry entry (`registry.py`)."""

from sae_pipeline.saes.base import ForwardOutput, SparseAutoencoder
from sae_pipeline.saes.registry import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    architecture_class,
    build_sae,
    load_sae,
    register,
)

__all__ = ["ARCHITECTURES", "DEFAULT_ARCHITECTURE", "ForwardOutput", "SparseAutoencoder", "architecture_class",
           "build_sae", "load_sae", "register"]
