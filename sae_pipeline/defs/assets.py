"""The asset graph: corpus -> activations -> sae [per config] -> features -> feature_labels; sweep_analysis.

Assets pass paths, not tensors: each writes its files under the storage root (atomically) and the next one
reads them, so no IO manager ever loads every partition into memory.
"""

import shutil

import dagster as dg
import polars as pl
from pydantic import Field

from sae_pipeline import quality
from sae_pipeline.activations import ActivationStore, check_layer, extract_activations, load_model, load_tokenizer
from sae_pipeline.analysis import build_sweep_report, last_window_mean
from sae_pipeline.config import EMBEDDED_CORPUS, ActivationSpec, CorpusSpec
from sae_pipeline.corpus import iter_texts, tokenize_corpus
from sae_pipeline.defs.checks import ACTIVATIONS_CHECKS, FEATURES_CHECKS, SAE_CHECKS, check_result
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.defs.resources import DeviceResource, ModelResource, StorageResource
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.features import compute_features, features_summary, top_features_markdown, write_features
from sae_pipeline.labelling import label_features, labels_markdown, write_labels
from sae_pipeline.markdown import markdown_table
from sae_pipeline.plots import png_markdown, training_curves_png
from sae_pipeline.saes import load_sae
from sae_pipeline.storage import atomic_dir, write_bytes_atomic, write_json_atomic, write_parquet_atomic
from sae_pipeline.sweeps import collect_runs, load_config
from sae_pipeline.training import train_sae

FEATURES_FILE = "features.parquet"
LABELS_FILE = "labels.parquet"


class CorpusConfig(dg.Config):
    """Which text to tokenise (see CorpusSpec for the rules each field is validated against)."""

    source: str = Field(EMBEDDED_CORPUS, description="embedded:stdlib-docstrings, a datasets name, or local files")
    text_column: str = Field("text", description="Text column of a datasets/jsonl/parquet source")
    split: str = Field("train", description="Split of a datasets source")
    context_length: int = Field(128, description="Tokens per sequence, special tokens included")
    max_sequences: int = Field(4096, description="Sequences kept")
    min_words: int = Field(8, description="Shorter documents are skipped")


class ActivationsConfig(dg.Config):
    """Which layer to read and how to store it (see ActivationSpec)."""

    layer: int = Field(3, description="Transformer block whose output is recorded (0-based)")
    batch_size: int = Field(32, description="Sequences per forward pass")
    shard_tokens: int = Field(65536, description="Tokens per safetensors shard")
    eval_fraction: float = Field(0.1, description="Share of sequences held out for evaluation")
    exclude_special_tokens: bool = Field(True, description="Drop [CLS]/[SEP]/BOS tokens")
    seed: int = Field(0, description="Seed of the train/eval split")


@dg.asset(group_name="data", kinds={"parquet"}, description="Tokenised text sequences from the configured corpus.")
def corpus(context: dg.AssetExecutionContext, config: CorpusConfig, storage: StorageResource,
           model: ModelResource) -> dg.MaterializeResult:
    spec = CorpusSpec(**config.model_dump())
    tokenizer = load_tokenizer(ActivationSpec(model=model.name, trust_remote_code=model.trust_remote_code))
    frame = tokenize_corpus(iter_texts(spec), tokenizer, spec)
    path = storage.layout.corpus_path
    write_parquet_atomic(frame, path)
    n_tokens = int(frame["input_ids"].list.len().sum())
    context.log.info(f"corpus: {len(frame)} sequences, {n_tokens} tokens from {spec.source}")
    return dg.MaterializeResult(metadata={
        "source": spec.source, "n_sequences": len(frame), "n_tokens": n_tokens,
        "path": dg.MetadataValue.path(str(path)),
        "preview": dg.MetadataValue.md(markdown_table(frame.head(5).select("seq_id", "text"))),
    })


@dg.asset(deps=[corpus], group_name="data", kinds={"pytorch", "safetensors"},
          check_specs=ACTIVATIONS_CHECKS,
          description="Residual-stream activations at one layer, sharded safetensors with a held-out eval slice.")
def activations(context: dg.AssetExecutionContext, config: ActivationsConfig, storage: StorageResource,
                model: ModelResource) -> dg.MaterializeResult:
    spec = ActivationSpec(model=model.name, trust_remote_code=model.trust_remote_code, **config.model_dump())
    layout = storage.layout
    frame = pl.read_parquet(layout.corpus_path)
    tokenizer, transformer = load_tokenizer(spec), load_model(spec)
    check_layer(transformer, spec.layer)
    with atomic_dir(layout.activations_dir) as folder:
        meta = extract_activations(frame, transformer, tokenizer, spec, folder, spec.model)
    context.log.info(f"activations: {meta['n_tokens']} tokens x {meta['d_model']} at layer {spec.layer}")
    return dg.MaterializeResult(
        metadata={"activations_dir": dg.MetadataValue.path(str(layout.activations_dir)),
                  "n_tokens": meta["n_tokens"], "n_train_tokens": meta["n_train_tokens"],
                  "n_eval_tokens": meta["n_eval_tokens"], "d_model": meta["d_model"], "model": spec.model,
                  "layer": spec.layer, "norm_stats": meta["norm_stats"]},
        check_results=[check_result(quality.activations_finite(meta))],
    )


@dg.asset(partitions_def=sae_configs, deps=[activations], pool="gpu", group_name="sae", kinds={"pytorch"},
          check_specs=SAE_CHECKS, description="One SAE per config partition, in the SAELens file layout.")
def sae(context: dg.AssetExecutionContext, storage: StorageResource, device: DeviceResource) -> dg.MaterializeResult:
    key, layout = context.partition_key, storage.layout
    cfg = load_config(layout, key)
    store = ActivationStore(layout.activations_dir)
    cfg.validate_for_model(store.d_model)
    result = train_sae(cfg, store, device.resolve(), layout.checkpoint_dir(key),
                       log=lambda row: context.log.debug(f"step {row['step']}: {row}"))
    metrics, _ = evaluate_sae(result.sae, store, device.resolve())
    outcomes = [quality.finite_weights(result.sae.state_dict()),
                quality.not_collapsed(result.metrics, result.sae.d_sae),
                quality.dead_fraction(metrics.dead_fraction)]
    curves = training_curves_png(result.metrics, key)
    summary = {"key": key, "config": cfg.model_dump(mode="json"), "metrics": metrics.as_dict(),
               "final_loss": last_window_mean(result.metrics, "loss"), "train_tokens": result.train_tokens,
               "wall_seconds": result.wall_seconds, "resumed_from_step": result.resumed_from_step}
    with atomic_dir(layout.sae_dir(key)) as folder:
        result.sae.save(folder, metadata={"partition_key": key, "model": store.meta["model"],
                                          "layer": store.meta["layer"], "hook": store.meta["hook"],
                                          "dataset_scaling_factor_folded": result.scaling_factor,
                                          "sae_pipeline_config": cfg.model_dump(mode="json")})
        write_parquet_atomic(result.metrics, folder / "metrics.parquet")
        write_json_atomic(folder / "summary.json", summary)
        write_bytes_atomic(folder / "training_curves.png", curves)
        quality.write_verdict(folder, outcomes)
    shutil.rmtree(layout.checkpoint_dir(key), ignore_errors=True)
    return dg.MaterializeResult(
        metadata={"l0": metrics.l0, "l0_fraction": metrics.l0_fraction, "dead_fraction": metrics.dead_fraction,
                  "dense_fraction": metrics.dense_fraction, "fvu": metrics.fvu,
                  "explained_variance": metrics.explained_variance, "mse": metrics.mse,
                  "train_tokens": result.train_tokens, "wall_seconds": result.wall_seconds,
                  "weights_dir": dg.MetadataValue.path(str(layout.sae_dir(key))),
                  "training_curves": dg.MetadataValue.md(png_markdown(curves, f"training curves {key}"))},
        check_results=[check_result(o) for o in outcomes],
    )


@dg.asset(partitions_def=sae_configs, deps=[sae, corpus], pool="gpu", group_name="sae", kinds={"parquet"},
          check_specs=FEATURES_CHECKS,
          description="Per-latent statistics and top activating contexts on held-out tokens.")
def features(context: dg.AssetExecutionContext, storage: StorageResource, device: DeviceResource,
             model: ModelResource) -> dg.MaterializeResult:
    key, layout = context.partition_key, storage.layout
    autoencoder = load_sae(layout.sae_dir(key))
    store = ActivationStore(layout.activations_dir)
    tokenizer = load_tokenizer(ActivationSpec(model=model.name, trust_remote_code=model.trust_remote_code))
    frame = compute_features(autoencoder, store, pl.read_parquet(layout.corpus_path), tokenizer,
                             device=device.resolve())
    outcome = quality.features_not_near_zero(frame)
    with atomic_dir(layout.features_dir(key)) as folder:
        write_features(frame, folder / FEATURES_FILE)
        quality.write_verdict(folder, [outcome])
    summary = features_summary(frame)
    return dg.MaterializeResult(
        metadata={"features_path": dg.MetadataValue.path(str(layout.features_dir(key) / FEATURES_FILE)),
                  "n_live": summary["n_live"], "n_dead": summary["n_dead"],
                  "n_near_zero": summary["n_near_zero"],
                  "top_latents": dg.MetadataValue.md(top_features_markdown(frame))},
        check_results=[check_result(outcome)],
    )


@dg.asset(partitions_def=sae_configs, deps=[features], group_name="sae", kinds={"parquet"},
          description="A label per live latent; refuses partitions whose blocking checks failed.")
def feature_labels(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    key, layout = context.partition_key, storage.layout
    reasons = quality.blocking_failures(layout.sae_dir(key)) + quality.blocking_failures(layout.features_dir(key))
    if reasons:
        raise dg.Failure(description=f"Refusing to label partition {key}: blocking quality checks failed: "
                         + "; ".join(reasons), metadata={"reasons": "\n".join(reasons)}, allow_retries=False)
    labels = label_features(pl.read_parquet(layout.features_dir(key) / FEATURES_FILE))
    with atomic_dir(layout.labels_dir(key)) as folder:
        write_labels(labels, folder / LABELS_FILE)
    return dg.MaterializeResult(metadata={
        "labels_path": dg.MetadataValue.path(str(layout.labels_dir(key) / LABELS_FILE)),
        "n_labelled": len(labels),
        "labeller": labels["labeller"][0] if len(labels) else "none",
        "best_labelled": dg.MetadataValue.md(labels_markdown(labels)),
    })


@dg.asset(deps=[sae, features], group_name="analysis", kinds={"markdown"},
          description="The sweep report (seed 004's form) over every finished config partition.")
def sweep_analysis(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    layout = storage.layout
    keys = context.instance.get_dynamic_partitions(sae_configs.name)
    runs, missing = collect_runs(layout, keys)
    report = build_sweep_report(runs, layout.analysis_dir, sweep_name="sae_configs", missing=missing)
    return dg.MaterializeResult(metadata={
        "report_path": dg.MetadataValue.path(str(report.report_path)),
        "table_path": dg.MetadataValue.path(str(report.table_path)),
        "n_configs": report.n_configs, "n_missing": len(missing),
        "best_balanced": report.best_balanced or "none",
        "top_configs": dg.MetadataValue.md(report.top_markdown),
    })
