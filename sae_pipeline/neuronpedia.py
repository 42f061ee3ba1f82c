"""Export one partition's features to Neuronpedia's bulk-import layout (no Dagster).

Neuronpedia's admin import (`apps/webapp/app/api/admin/import/route.ts` in hijohnnylin/neuronpedia) reads one
folder per source, `v1/<model id>/<source id>/` of its dataset bucket, the layout its exports and
`utils/neuronpedia-utils/convert-saedashboard-to-neuronpedia-export.py` write:

    release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl     one row each (SourceRelease, Model, SourceSet, Source)
    features/batch-<n>.jsonl.gz                                      one row per latent (table Neuron)
    activations/batch-<n>.jsonl.gz                                   one row per example context (table Activation)
    explanations/batch-<n>.jsonl.gz                                  one row per label, when there are labels

Rows are JSON objects keyed by the table's column names; batch n holds latents [n * FEATURES_PER_BATCH, ...).
The source id is `<layer>-<source set>`. What we map, and what we leave out:
- Neuron: `maxActApprox` = max activation on held-out tokens, `frac_nonzero` = firing frequency, the log10
  activation histogram as `freq_hist_data_bar_*` (bar values: activation at each bin's geometric centre), and
  `pos_*`/`neg_*` = the top/bottom logit effects when the model has an unembedding (`logit_effect`); nearest input
  embeddings (encoders) are cosine similarities, not logits, so they are not written there.
- Activation: the `top` and `quantile` examples (tokens and per-token activations of their window; the centre
  token is `qualifyingTokenIndex`; a quantile example's band is `binMin`/`binMax`). `random` (non-activating)
  examples have no place in Neuronpedia's activation list and are left out.
- Explanation: the label as `description`; the labeller and its detection score go in `notes` (Neuronpedia's
  explanation model and type are foreign keys to its own tables, so they are left null).
Ids are derived from the content (stable across exports: the import skips rows it already has).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import polars as pl

from sae_pipeline.features import EXAMPLES_FILE, FEATURES_FILE, FEATURES_META_FILE, HIST_LOG10_EDGES
from sae_pipeline.labelling import LABELS_FILE
from sae_pipeline.saes.base import CFG_FILE
from sae_pipeline.storage import Layout, read_json, write_bytes_atomic

FEATURES_PER_BATCH = 128
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
"""The user Neuronpedia's database seed creates (`apps/webapp/prisma/seed.ts`); rows need an existing creator."""
EXPORTED_KINDS = ("top", "quantile")


@dataclass(frozen=True)
class NeuronpediaSource:
    """Where the export lands in Neuronpedia: model, source set and layer, and who made it."""

    model_id: str
    """Neuronpedia model id (a slug: lowercase letters, digits, `-`, `.`)."""
    source_set: str
    """Source set name, without the layer (e.g. `sae-pipeline-topk-exp2-k8`)."""
    layer: int
    """Transformer block the SAE reads; the source id is `<layer>-<source set>`."""
    creator_id: str = DEFAULT_CREATOR_ID
    """Neuronpedia user id that owns the rows."""
    creator_name: str = "sae_pipeline"
    release: str = "sae-pipeline"
    """Release name the source set belongs to."""
    description: str = ""
    """Shown with the source set."""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    """ISO timestamp of every row (default: now)."""

    @property
    def source_id(self) -> str:
        return f"{self.layer}-{self.source_set}"


def slug(text: str) -> str:
    """A Neuronpedia id from free text: lowercase, runs of other characters as one `-`."""
    cleaned = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")
    if not cleaned:
        raise ValueError(f"{text!r} has no letter or digit to make a Neuronpedia id from")
    return cleaned


def _stable_id(*parts: object) -> str:
    return "c" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


def _finite(values: Iterable[float]) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError("a non-finite activation cannot be exported (Neuronpedia stores plain floats)")
    return out


def hist_bar_values() -> list[float]:
    """Activation at the geometric centre of each HIST_LOG10_EDGES bin (the x of `freq_hist_data_bar_values`)."""
    return [10 ** ((lo + hi) / 2) for lo, hi in pairwise(HIST_LOG10_EDGES)]


def neuron_row(latent: dict, source: NeuronpediaSource) -> dict:
    """One row of table Neuron from one row of features.parquet."""
    logits = latent["vocab_kind"] == "logit_effect"
    return {"modelId": source.model_id, "layer": source.source_id, "index": str(latent["latent_id"]),
            "sourceSetName": source.source_set, "creatorId": source.creator_id, "createdAt": source.created_at,
            "maxActApprox": float(latent["max_activation"]), "frac_nonzero": float(latent["frequency"]),
            "hasVector": False, "vector": [],
            "freq_hist_data_bar_heights": [float(c) for c in latent["hist_counts"]],
            "freq_hist_data_bar_values": hist_bar_values(),
            "pos_str": list(latent["top_vocab_tokens"]) if logits else [],
            "pos_values": _finite(latent["top_vocab_values"]) if logits else [],
            "neg_str": list(latent["bottom_vocab_tokens"]) if logits else [],
            "neg_values": _finite(latent["bottom_vocab_values"]) if logits else []}


def activation_row(example: dict, max_activation: float, n_bands: int, source: NeuronpediaSource) -> dict:
    """One row of table Activation from one `top` or `quantile` row of examples.parquet."""
    values = _finite(example["token_activations"])
    peak = max(values)
    quantile = example["kind"] == "quantile"
    width = max_activation / n_bands
    return {"id": _stable_id(source.model_id, source.source_id, example["latent_id"], example["kind"],
                             example["band"], example["rank"]),
            "modelId": source.model_id, "layer": source.source_id, "index": str(example["latent_id"]),
            "tokens": list(example["tokens"]), "values": values, "maxValue": peak,
            "maxValueTokenIndex": values.index(peak), "minValue": min(values),
            "qualifyingTokenIndex": int(example["center"]),
            "binMin": example["band"] * width if quantile else None,
            "binMax": (example["band"] + 1) * width if quantile else None,
            "dataSource": "sae_pipeline corpus", "dataIndex": f"{example['seq_id']}:{example['position']}",
            "creatorId": source.creator_id, "createdAt": source.created_at}


def explanation_row(label: dict, source: NeuronpediaSource) -> dict:
    """One row of table Explanation from one row of labels.parquet."""
    accuracy = label.get("detection_accuracy")
    scored = "" if accuracy is None else f"; detection accuracy {accuracy:.4g}"
    return {"id": _stable_id(source.model_id, source.source_id, label["latent_id"], label["labeller"]),
            "modelId": source.model_id, "layer": source.source_id, "index": str(label["latent_id"]),
            "description": label["label"], "authorId": source.creator_id,
            "notes": f"labeller {label['labeller']}{scored}", "createdAt": source.created_at}


def metadata_rows(source: NeuronpediaSource, sae_cfg: dict, corpus: dict) -> dict[str, dict]:
    """release.jsonl, model.jsonl, sourceset.jsonl and source.jsonl, one row each."""
    base = {"creatorId": source.creator_id, "createdAt": source.created_at}
    return {
        "release": {**base, "name": source.release, "description": source.description or source.release,
                    "creatorName": source.creator_name, "visibility": "PUBLIC", "urls": []},
        "model": {**base, "id": source.model_id, "displayName": source.model_id, "displayNameShort": source.model_id,
                  "dimension": sae_cfg["d_in"], "instruct": False, "layers": 0, "neuronsPerLayer": 0, "owner": "",
                  "visibility": "PUBLIC", "updatedAt": source.created_at},
        "sourceset": {**base, "modelId": source.model_id, "name": source.source_set,
                      "description": source.description or source.source_set, "creatorName": source.creator_name,
                      "releaseName": source.release, "visibility": "PUBLIC", "urls": []},
        "source": {**base, "id": source.source_id, "modelId": source.model_id, "setName": source.source_set,
                   "hasDashboards": True, "inferenceEnabled": False, "visibility": "PUBLIC",
                   "saelensConfig": sae_cfg, **corpus},
    }


def _jsonl(rows: Iterable[dict]) -> bytes:
    return b"".join(json.dumps(row, allow_nan=False, ensure_ascii=False).encode() + b"\n" for row in rows)


def _batches(frame: pl.DataFrame, d_sae: int) -> Iterator[tuple[int, pl.DataFrame]]:
    """(batch number, the rows of its latents) for every batch of FEATURES_PER_BATCH latents."""
    for batch in range(math.ceil(d_sae / FEATURES_PER_BATCH)):
        low = batch * FEATURES_PER_BATCH
        yield batch, frame.filter(pl.col("latent_id").is_between(low, low + FEATURES_PER_BATCH - 1))


def write_export(latents: pl.DataFrame, examples: pl.DataFrame, labels: pl.DataFrame | None, n_bands: int,
                 sae_cfg: dict, corpus: dict, source: NeuronpediaSource, out_dir: Path) -> Path:
    """Write the source folder under `out_dir` (each file atomically); returns `<out_dir>/<model>/<source id>`."""
    folder = Path(out_dir) / source.model_id / source.source_id
    for name, row in metadata_rows(source, sae_cfg, corpus).items():
        write_bytes_atomic(folder / f"{name}.jsonl", _jsonl([row]))
    peaks = dict(zip(latents["latent_id"].to_list(), latents["max_activation"].to_list(), strict=True))
    shown = examples.filter(pl.col("kind").is_in(EXPORTED_KINDS)).sort("latent_id", "kind", "band", "rank")
    tables = {"features": latents.sort("latent_id"), "activations": shown,
              **({"explanations": labels.sort("latent_id")} if labels is not None else {})}
    rows_of = {"features": lambda row: neuron_row(row, source),
               "activations": lambda row: activation_row(row, peaks[row["latent_id"]], n_bands, source),
               "explanations": lambda row: explanation_row(row, source)}
    for table, frame in tables.items():
        for batch, part in _batches(frame, latents.height):
            rows = [rows_of[table](row) for row in part.iter_rows(named=True)]
            if rows:
                write_bytes_atomic(folder / table / f"batch-{batch}.jsonl.gz",
                                   gzip.compress(_jsonl(rows), compresslevel=5, mtime=0))
    return folder


def hook_of(cfg: dict) -> str:
    """The hook an SAE reads, from its cfg.json (one saved before hooks were named: its layer's block output)."""
    return cfg.get("hook_name") or f"blocks.{cfg['metadata']['layer']}.hook_resid_post"


def export_partition(layout: Layout, key: str, out_dir: Path, model_id: str | None = None,
                     source_set: str | None = None, creator_id: str = DEFAULT_CREATOR_ID) -> Path:
    """Export partition `key` (its features, and its labels when it has current ones) from the storage root.

    Defaults: the model id is the slug of the model the SAE was trained on, the source set
    `sae-pipeline-<slug of the key>`, the layer the SAE's cfg.json names."""
    features_dir = layout.pull(layout.features_dir(key), FEATURES_FILE, EXAMPLES_FILE, FEATURES_META_FILE)
    if not (features_dir / FEATURES_FILE).exists():
        raise FileNotFoundError(f"partition {key}: no {layout.location(layout.features_dir(key), FEATURES_FILE)}; "
                                "materialise `features` for it first")
    cfg = read_json(layout.pull(layout.sae_dir(key), CFG_FILE) / CFG_FILE)
    meta = read_json(features_dir / FEATURES_META_FILE)
    labels_path = layout.pull(layout.labels_dir(key), LABELS_FILE) / LABELS_FILE
    source = NeuronpediaSource(model_id=model_id or slug(cfg["metadata"]["model"]),
                               source_set=source_set or f"sae-pipeline-{slug(key)}",
                               layer=int(cfg["metadata"]["layer"]), creator_id=creator_id,
                               description=f"sae_pipeline partition {key} ({cfg['sae_pipeline_architecture']}, "
                                           f"d_sae {cfg['d_sae']}, at {hook_of(cfg)})")
    return write_export(pl.read_parquet(features_dir / FEATURES_FILE), pl.read_parquet(features_dir / EXAMPLES_FILE),
                        pl.read_parquet(labels_path) if labels_path.exists() else None, int(meta["n_bands"]),
                        cfg, {"dataset": "sae_pipeline corpus", "notes": f"partition {key}"}, source, out_dir)
