"""How a step ends when it is stopped or fails for good: not retried, saying what is kept for the rerun.

A stop (Ctrl-C or SIGTERM to `sae-pipeline run-sweep`, a run terminated from the UI) ends the step as a
`Failure` that is not retried, whose message names what the step leaves behind (`kept_after_stop`): a checkpoint
for `sae`, the labels obtained for `feature_labels`, and for the steps that publish their folder whole at the end
(corpus, activations, features, the reports), nothing of their own, while everything the earlier steps made
stays. The CLI prints the same words in its one-line stop message.
"""

from __future__ import annotations

import signal
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import dagster as dg

from sae_pipeline.activations import read_manifest
from sae_pipeline.config import ConfigError
from sae_pipeline.labelling import PROGRESS_FILE, LLMError
from sae_pipeline.storage import Layout, read_json
from sae_pipeline.training import checkpoint_step

LABELS_RETRY_POLICY = dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL)
"""`feature_labels` is retried 30 s, 90 s, then 210 s after an attempt failed on an LLM endpoint that stayed
unavailable past its own per-request retries; each attempt resumes from the labels the previous ones kept.
Failures that a retry cannot fix (a refusal, a bad config, an HTTP 4xx, the step's deadline, a stop) raise
`Failure(allow_retries=False)`."""

PUBLISHED_WHOLE = {"corpus": "the corpus", "features": "the features table",
                   "sweep_analysis": "the sweep report", "calibration": "the calibration report"}
"""Steps whose output folder is swapped in whole when they finish: a stop leaves the previous one, if any."""


class Stopped(Exception):  # noqa: N818 (a request, not an error)
    """The user asked the process to stop (SIGINT/SIGTERM); `exit_code` is 128 + the signal number.

    `step` and `keys` name the step that was running and its partitions (None between runs); `kept` says what
    that step left for the rerun (`kept_after_stop`)."""

    def __init__(self, signum: int, step: str | None = None, keys: Sequence[str] = (), kept: str = "") -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.step, self.keys, self.kept = signum, step, list(keys), kept

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def where(self) -> str:
        """'during features (partition K)', or 'between runs'."""
        if self.step is None:
            return "between runs"
        return f"during {self.step}" + (f" ({partitions_phrase(self.keys)})" if self.keys else "")

    def line(self, command: str) -> str:
        """The one line the CLI prints: which step stopped, what was kept and the command that resumes."""
        kept = self.kept or "kept: every finished run"
        return f"{self} {self.where()}; {kept}; run `{command}` to resume"


def partitions_phrase(keys: Sequence[str]) -> str:
    return f"partition {keys[0]}" if len(keys) == 1 else f"partitions {', '.join(keys)}"


def kept_after_stop(step: str, keys: Sequence[str], layout: Layout, published: Collection[str] = ()) -> str:
    """What a stop during `step` (over partitions `keys`) leaves for the rerun, read from disk when the stop
    arrives; `published`: the partitions this run already published (a ranged run publishes each as it
    finishes)."""
    if step == "sae":
        return "kept: " + "; ".join(_training_state(layout, key, key in published) for key in keys)
    if step == "feature_labels":
        return "kept: " + "; ".join(f"{key} labelled and published" if key in published else
                                    _labels_state(layout, key) for key in keys)
    if step == "activations":
        return f"kept: {_extraction_state(layout)}"
    what = PUBLISHED_WHOLE.get(step, f"the output of {step}")
    done = f"; published by this run: {', '.join(k for k in keys if k in published)}" if published else ""
    return (f"kept: what the earlier steps made ({what} is written only when complete: nothing partial, and a "
            f"previous one is unchanged){done}")


def _training_state(layout: Layout, key: str, published: bool) -> str:
    if published:
        return f"{key} trained and published"
    step = checkpoint_step(layout.checkpoint_dir(key))
    return f"{key} checkpoint at step {step}" if step else f"{key} no checkpoint yet (it restarts)"


def _extraction_state(layout: Layout) -> str:
    manifest = read_manifest(layout.extraction_dir)
    n_shards = 0 if manifest is None else sum(len(shards) for splits in manifest["stores"].values()
                                              for shards in splits.values())
    return (f"{n_shards} shard(s) of the extraction committed in {layout.extraction_dir} (the rerun resumes after "
            "them; the activation store is published only when complete, and a previous one is unchanged)")


def _labels_state(layout: Layout, key: str) -> str:
    path = layout.labels_progress_dir(key) / PROGRESS_FILE
    n_labels = len(read_json(path)["labels"]) if path.exists() else 0
    return f"{n_labels} label(s) of {key} obtained so far" if n_labels else f"no label of {key} yet"


def published_in_run(instance: dg.DagsterInstance, asset: str, keys: Sequence[str], run_id: str) -> list[str]:
    """The partitions of `keys` whose latest materialisation of `asset` is from run `run_id` (labels withdrawn
    by the run do not count)."""
    published = []
    for key in keys:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1).records
        status = records[0].asset_materialization.metadata.get("status") if records else None
        if records and records[0].run_id == run_id and getattr(status, "value", status) != "withdrawn":
            published.append(key)
    return published


def step_partitions(context: dg.AssetExecutionContext) -> list[str]:
    """The partition keys of the running step: one, a range's, or none for an unpartitioned asset."""
    return list(context.partition_keys) if context.has_partition_key or context.has_partition_key_range else []


@contextmanager
def stops_without_retry(context: dg.AssetExecutionContext, layout: Layout) -> Iterator[None]:
    """A stop ends the step as a failure that is not retried, saying what is kept: under a RetryPolicy Dagster
    turns an interrupt into a retry, and would rerun a step it was told to stop."""
    try:
        yield
    except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError, Stopped):
        step, keys = context.op_def.name, step_partitions(context)
        kept = kept_after_stop(step, keys, layout, published_in_run(context.instance, step, keys, context.run_id))
        where = f" for {partitions_phrase(keys)}" if keys else ""
        raise dg.Failure(description=f"{step}{where} was stopped (interrupt or termination); not retried; {kept}",
                         allow_retries=False) from None


@contextmanager
def not_retried(step: str) -> Iterator[None]:
    """A bad config or an LLM error that is not transient fails the step at once: no retry would change it."""
    try:
        yield
    except (ConfigError, LLMError) as error:
        if isinstance(error, LLMError) and error.transient:
            raise
        raise dg.Failure(description=f"{step}: {error}", allow_retries=False) from None

