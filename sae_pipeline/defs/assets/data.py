"""The data assets: `corpus` (tokenised text) and `activations` (each hook's activation store, with their checks)."""

import shutil
from pathlib import Path

import dagster as dg

from sae_pipeline import quality
from sae_pipeline.activation_scan import scan_activations
from sae_pipeline.activations import extract_activations, link_store
from sae_pipeline.checks import ActivationEvidence, merge_store_outcomes, run_checks
from sae_pipeline.config import ActivationSpec, CorpusSpec
from sae_pipeline.corpus import CORPUS_COLUMNS, iter_documents, read_corpus, tokenize_corpus
from sae_pipeline.defs.assets.common import (
    CODE_VERSIONS,
    ActivationsConfig,
    CorpusConfig,
    column_schema,
    validate_run_activations_config,
)
from sae_pipeline.defs.checks import (
    ACTIVATIONS_CHECKS,
    check_result,
)
from sae_pipeline.defs.launch import validated_at_launch
from sae_pipeline.defs.resources import DeviceResource, ModelResource, QualityResource, StorageResource
from sae_pipeline.defs.stops import stops_without_retry
from sae_pipeline.lineage import corpus_fingerprint, file_fingerprint, lineage_record, write_lineage
from sae_pipeline.markdown import markdown_table
from sae_pipeline.model import load_model, load_tokenizer, validate_layer
from sae_pipeline.spec_errors import parse_spec
from sae_pipeline.storage import (
    CORPUS_FILE,
    write_parquet_atomic,
)
from sae_pipeline.store import META_FILE, ActivationStore, hook_store_dir


@dg.asset(group_name="data", kinds={"parquet"}, code_version=CODE_VERSIONS["corpus"],
          description="Tokenised text sequences from the configured corpus.")
def corpus(context: dg.AssetExecutionContext, config: CorpusConfig, storage: StorageResource,
           model: ModelResource) -> dg.MaterializeResult:
    with stops_without_retry(context, storage.layout):
        spec = parse_spec(CorpusSpec, config.model_dump(), where="corpus config")
        validate_run_activations_config(context, model)
        tokenizer = load_tokenizer(ActivationSpec(model=model.name, trust_remote_code=model.trust_remote_code))
        frame = tokenize_corpus(iter_documents(spec), tokenizer, spec)
        layout = storage.layout
        with layout.publish(layout.corpus_dir) as folder:
            write_parquet_atomic(frame, folder / CORPUS_FILE)
        n_tokens = int(frame["input_ids"].list.len().sum())
        context.log.info(f"corpus: {len(frame)} sequences, {n_tokens} tokens from {spec.source}")
        fingerprint = file_fingerprint(layout.pull(layout.corpus_dir, CORPUS_FILE) / CORPUS_FILE)
        return dg.MaterializeResult(data_version=dg.DataVersion(fingerprint), metadata={
            "source": spec.source, "n_sequences": len(frame), "n_tokens": n_tokens, "corpus_sha256": fingerprint,
            "path": dg.MetadataValue.path(layout.location(layout.corpus_dir, CORPUS_FILE)),
            "preview": dg.MetadataValue.md(markdown_table(frame.head(5).select("seq_id", "text"))),
            "dagster/column_schema": column_schema(frame, CORPUS_COLUMNS),
        })


corpus = validated_at_launch(corpus, CorpusConfig)


def store_checks(folder: Path, meta: dict, first: dict, thresholds: quality.QualityThresholds
                 ) -> list[quality.CheckOutcome]:
    """The `activations` checks of one hook's store, on what was written (not what its meta.json says)."""
    scan = scan_activations(ActivationStore(hook_store_dir(folder, meta["hook_name"], first["hook_name"])))
    return run_checks("activations", ActivationEvidence(scan, meta["n_excluded_outliers"]), thresholds)


@dg.asset(deps=[corpus], group_name="data", kinds={"pytorch", "safetensors"},
          check_specs=ACTIVATIONS_CHECKS, code_version=CODE_VERSIONS["activations"],
          description="Residual-stream activations at one layer, sharded safetensors with a held-out eval slice.")
def activations(context: dg.AssetExecutionContext, config: ActivationsConfig, storage: StorageResource,
                model: ModelResource, device: DeviceResource,
                quality_thresholds: QualityResource) -> dg.MaterializeResult:
    with stops_without_retry(context, storage.layout):
        spec = parse_spec(ActivationSpec, {"model": model.name, "trust_remote_code": model.trust_remote_code,
                                           **config.model_dump()}, where="activations config")
        thresholds = quality_thresholds.thresholds()
        validate_layer(spec)  # from the model's config alone: before any weights load or file write
        layout = storage.layout
        corpus_sha256 = corpus_fingerprint(layout.pull(layout.corpus_dir, CORPUS_FILE))
        lineage = lineage_record(corpus_sha256, spec.model, spec.hook_names())
        frame = read_corpus(layout)
        tokenizer, transformer = load_tokenizer(spec), load_model(spec).to(device.resolve())
        metas = extract_activations(frame, transformer, tokenizer, spec, layout.extraction_dir, spec.model,
                                    progress=context.log.info, corpus_key=corpus_sha256)
        with layout.publish(layout.activations_dir) as folder:
            link_store(layout.extraction_dir, folder)
            outcomes = merge_store_outcomes({meta["hook_name"]: store_checks(folder, meta, metas[0], thresholds)
                                             for meta in metas})
            quality.write_verdict(folder, outcomes)
            write_lineage(folder, lineage)
        shutil.rmtree(layout.extraction_dir)
        meta, hooks = metas[0], ", ".join(spec.hook_names())
        context.log.info(f"activations: {meta['n_tokens']} tokens x {meta['d_model']} at {hooks}")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(file_fingerprint(layout.pull(layout.activations_dir, META_FILE) / META_FILE)),
            metadata={"corpus_sha256": str(lineage["corpus_sha256"]),
                      "activations_dir": dg.MetadataValue.path(layout.location(layout.activations_dir)),
                      "n_tokens": meta["n_tokens"], "n_train_tokens": meta["n_train_tokens"],
                      "n_eval_tokens": meta["n_eval_tokens"], "d_model": meta["d_model"], "model": spec.model,
                      "layer": meta["layer"], "hook": hooks, "dtype": meta["dtype"],
                      "norm_stats": meta["norm_stats"]},
            check_results=[check_result(o) for o in outcomes],
        )


activations = validated_at_launch(activations, ActivationsConfig)
