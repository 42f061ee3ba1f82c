"""The ground-truth benchmark as an asset and its own job: every registered architecture on planted features."""

import tempfile
from pathlib import Path

import dagster as dg
from pydantic import Field, model_validator

from sae_pipeline.config import ConfigError
from sae_pipeline.defs.resources import DeviceResource, StorageResource
from sae_pipeline.plots import png_markdown
from sae_pipeline.saes import ARCHITECTURES
from sae_pipeline.spec_errors import parse_spec
from sae_pipeline.storage import write_bytes_atomic, write_parquet_atomic
from sae_pipeline.synthetic import (
    TARGET_ARCHITECTURES,
    TARGET_RECOVERED_SHARE,
    SyntheticSpec,
    benchmark_markdown,
    benchmark_png,
    run_synthetic_benchmark,
)

TABLE_FILE = "benchmark.parquet"
PLOT_FILE = "benchmark.png"
REPORT_FILE = "report.md"
_DEFAULTS = SyntheticSpec()


class SyntheticBenchmarkConfig(dg.Config):
    """Sizes, budget and seed of the benchmark (SyntheticSpec documents and bounds each; the hierarchy and the
    correlated groups keep its defaults)."""

    d_model: int = Field(_DEFAULTS.d_model, description="Width of the synthetic activations")
    n_features: int = Field(_DEFAULTS.n_features, description="Planted feature directions")
    planted_l0: float = Field(_DEFAULTS.planted_l0, description="Expected active features per token (k of TopK)")
    n_train_tokens: int = Field(_DEFAULTS.n_train_tokens, description="Tokens in the train split")
    n_eval_tokens: int = Field(_DEFAULTS.n_eval_tokens, description="Held-out tokens every score uses")
    expansion_factor: int = Field(_DEFAULTS.expansion_factor, description="d_sae / d_model (d_sae >= n_features)")
    train_tokens: int = Field(_DEFAULTS.train_tokens, description="Training tokens per SAE")
    batch_size: int = Field(_DEFAULTS.batch_size, description="Tokens per training step")
    lr: float | None = Field(_DEFAULTS.lr, description="Adam learning rate of every architecture; "
                             "unset: each architecture's default")
    seed: int = Field(_DEFAULTS.seed, description="Seed of the planted world, its tokens and the SAEs")
    architectures: list[str] = Field(default=[], description="Architectures to train; empty: every registered one")

    @model_validator(mode="after")
    def _valid(self) -> "SyntheticBenchmarkConfig":
        self.spec()
        unknown = sorted(set(self.architectures) - set(ARCHITECTURES))
        if unknown:
            raise ConfigError(f"architectures: {unknown} not registered; allowed: {sorted(ARCHITECTURES)}")
        return self

    def spec(self) -> SyntheticSpec:
        return parse_spec(SyntheticSpec, self.model_dump(exclude={"architectures"}), where="synthetic_benchmark")


@dg.asset(group_name="synthetic", kinds={"parquet", "png"},
          description="Ground truth: each architecture trained on planted sparse features (Zipf frequencies, "
                      "correlated and hierarchical features) and scored on recovery, MCC, precision/recall, "
                      "absorption, splitting and shrinkage.")
def synthetic_benchmark(context: dg.AssetExecutionContext, config: SyntheticBenchmarkConfig,
                        storage: StorageResource, device: DeviceResource) -> dg.MaterializeResult:
    spec = config.spec()
    architectures = config.architectures or list(ARCHITECTURES)
    layout = storage.layout
    with tempfile.TemporaryDirectory(prefix="synthetic-") as scratch:
        result = run_synthetic_benchmark(spec, architectures, Path(scratch), device.resolve())
    report = benchmark_markdown(result.table, spec, result.measured_l0)
    png = benchmark_png(result.table)
    with layout.publish(layout.synthetic_dir) as folder:
        write_parquet_atomic(result.table, folder / TABLE_FILE)
        write_bytes_atomic(folder / PLOT_FILE, png)
        write_bytes_atomic(folder / REPORT_FILE, ("# Synthetic ground truth\n\n" + report + "\n").encode())
    scored = result.table.filter(result.table["status"] == "ok")
    context.log.info(f"synthetic_benchmark: {scored.height} of {len(architectures)} architectures scored in "
                     f"{result.train_seconds:.0f} s of training")
    recovered = dict(zip(scored["architecture"], scored["recovered_share"], strict=True))
    return dg.MaterializeResult(metadata={
        "table_path": dg.MetadataValue.path(layout.location(layout.synthetic_dir, TABLE_FILE)),
        "report_path": dg.MetadataValue.path(layout.location(layout.synthetic_dir, REPORT_FILE)),
        "benchmark": dg.MetadataValue.md(report),
        "plot": dg.MetadataValue.md(png_markdown(png, "synthetic benchmark")),
        "absorbs_least": result.table.filter("absorbs_least")["architecture"].to_list(),
        "recovered_share": recovered,
        "meets_target": {architecture: recovered[architecture] >= TARGET_RECOVERED_SHARE
                         for architecture in TARGET_ARCHITECTURES if architecture in recovered},
        "measured_planted_l0": result.measured_l0,
        "train_seconds": result.train_seconds,
    })


synthetic_job = dg.define_asset_job(
    "synthetic_benchmark_job", selection=[synthetic_benchmark],
    description="The ground-truth benchmark alone (CPU-sized: a few minutes on 2 cores).")
