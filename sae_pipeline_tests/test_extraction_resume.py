"""Resumable extraction: shards are committed as they are written, and a killed or interrupted extraction
resumes at the first missing shard with the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae_pipeline import activations as extraction
from sae_pipeline.activations import MANIFEST_FILE, extract_activations, read_manifest
from sae_pipeline.config import ActivationSpec
from sae_pipeline.corpus import read_corpus
from sae_pipeline.model import load_model, load_tokenizer
from sae_pipeline_tests.conftest import Pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = {"shard_tokens": 256, "batch_size": 2, "hooks": ["blocks.2.hook_resid_post", "blocks.1.hook_mlp_out"]}
"""Small shards and batches, two hooks (the second's store under hooks/): many commits on the tiny corpus."""

KILLED = """
import sys, time, torch
from pathlib import Path
from sae_pipeline import activations as extraction
from sae_pipeline.config import ActivationSpec
from sae_pipeline.corpus import read_corpus
from sae_pipeline.model import load_model, load_tokenizer
from sae_pipeline.storage import Layout
torch.set_num_threads(1)
root, folder, spec = sys.argv[1], Path(sys.argv[2]), ActivationSpec.model_validate_json(sys.argv[3])
forward = extraction.hook_activations
def slow(*args):  # slow enough that the kill lands mid-extraction on any machine
    time.sleep(0.05)
    return forward(*args)
extraction.hook_activations = slow
extraction.extract_activations(read_corpus(Layout(Path(root))), load_model(spec), load_tokenizer(spec), spec, folder,
                               spec.model, corpus_key="tiny")
"""


def _extract(pipeline: Pipeline, folder: Path, spec: ActivationSpec) -> list[dict]:
    return extract_activations(read_corpus(pipeline.layout), load_model(spec), load_tokenizer(spec), spec, folder,
                               spec.model, corpus_key="tiny")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != MANIFEST_FILE}


def _counting_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    forward = extraction.hook_activations

    def counted(*args):
        calls.append(1)
        return forward(*args)

    monkeypatch.setattr(extraction, "hook_activations", counted)
    return calls


@pytest.fixture(scope="module")
def reference(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """An uninterrupted extraction of the tiny corpus with SPEC, and its number of batches (forward passes)."""
    folder, forward, calls = tmp_path_factory.mktemp("uninterrupted"), extraction.hook_activations, []

    def counted(*args):
        calls.append(1)
        return forward(*args)

    extraction.hook_activations = counted
    try:
        _extract(pipeline, folder, ActivationSpec(**SPEC))
    finally:
        extraction.hook_activations = forward
    return folder, len(calls)


def test_a_sigkilled_extraction_resumes_at_the_first_missing_shard_with_identical_bytes(
        pipeline: Pipeline, reference: tuple[Path, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, folder = ActivationSpec(**SPEC), tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", KILLED, str(pipeline.root), str(folder), spec.model_dump_json()],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:  # until the manifest has committed a few train shards of each hook
        manifest = read_manifest(folder)
        if manifest and all(len(splits["train"]) >= 3 for splits in manifest["stores"].values()):
            break
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    committed = read_manifest(folder)
    assert "train" not in committed["splits_done"] and not (folder / "meta.json").exists()
    n_committed = len(committed["stores"][SPEC["hooks"][0]]["train"])

    forwards = _counting_forwards(monkeypatch)
    metas = _extract(pipeline, folder, spec)
    expected, n_batches = reference
    assert _files(folder) == _files(expected)  # every shard and meta.json, both hooks: byte for byte
    assert [meta["hook_name"] for meta in metas] == SPEC["hooks"]
    # it resumed: the batches whose tokens were all in committed shards (at most batch_size x 48 tokens each, the
    # corpus's context length) were not run again
    assert n_batches - len(forwards) >= n_committed * SPEC["shard_tokens"] // (SPEC["batch_size"] * 48) - 1


def test_an_interrupted_extraction_keeps_its_shards_and_the_rerun_skips_them(
        pipeline: Pipeline, reference: tuple[Path, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, folder = ActivationSpec(**SPEC), tmp_path / "interrupted"
    forward, calls = extraction.hook_activations, []

    def interrupted(*args):  # Ctrl-C after 60 batches: past the train split's first shards
        calls.append(1)
        if len(calls) > 60:
            raise KeyboardInterrupt
        return forward(*args)

    monkeypatch.setattr(extraction, "hook_activations", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _extract(pipeline, folder, spec)
    kept = read_manifest(folder)["stores"]
    assert all(len(splits["train"]) >= 1 for splits in kept.values())
    assert not (folder / "meta.json").exists()  # not a store until it is finished

    monkeypatch.setattr(extraction, "hook_activations", forward)
    forwards = _counting_forwards(monkeypatch)
    _extract(pipeline, folder, spec)
    expected, n_batches = reference
    assert _files(folder) == _files(expected)
    assert len(forwards) < n_batches - 40


def test_a_finished_extraction_is_not_run_again_and_other_settings_start_again(
        pipeline: Pipeline, reference: tuple[Path, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "store"
    _extract(pipeline, folder, ActivationSpec(**SPEC))
    forwards = _counting_forwards(monkeypatch)
    _extract(pipeline, folder, ActivationSpec(**SPEC))
    assert forwards == []  # finished: the rerun only reads the shards back
    assert _files(folder) == _files(reference[0])

    other = ActivationSpec(**{**SPEC, "shard_tokens": 512})
    _extract(pipeline, folder, other)
    assert len(forwards) > 0  # another key: extracted again, and no shard of the first run is left
    meta = json.loads((folder / "meta.json").read_text())
    assert {shard["n_tokens"] for shard in meta["train_shards"][:-1]} == {512}
    listed = {shard["file"] for shard in meta["train_shards"] + meta["eval_shards"]}
    assert {path.name for path in folder.glob("*.safetensors")} == listed


def test_norms_are_stored_before_the_cast_and_give_the_norm_statistics(pipeline: Pipeline, tmp_path: Path) -> None:
    from sae_pipeline.activations import norm_statistics
    from sae_pipeline.store import ActivationStore, read_norms

    spec = ActivationSpec(shard_tokens=1024, dtype="float16")
    (meta,) = _extract(pipeline, tmp_path, spec)
    reference = ActivationStore(pipeline.layout.activations_dir)  # the session's float32 store, same corpus
    norms = torch.cat([read_norms(tmp_path, shard) for shard in meta["train_shards"]])
    exact = torch.cat([acts.norm(dim=-1) for acts in reference.iter_split("train")])
    assert torch.equal(norms, exact)  # from the float32 rows, not the float16 ones written
    assert meta["norm_stats"] == norm_statistics(exact, meta["d_model"])


def test_outliers_are_dropped_from_new_shards_and_only_those_stay(pipeline: Pipeline, tmp_path: Path) -> None:
    from sae_pipeline.store import ActivationStore

    spec = ActivationSpec(shard_tokens=1024, exclude_norm_outliers=1.05)
    (meta,) = _extract(pipeline, tmp_path, spec)
    reference = ActivationStore(pipeline.layout.activations_dir)
    train = torch.cat(list(reference.iter_split("train")))
    limit = 1.05 * train.norm(dim=-1).median().item()
    expected = {split: torch.cat([acts[~(acts.norm(dim=-1) > limit)] for acts in reference.iter_split(split)])
                for split in ("train", "eval")}
    assert meta["n_excluded_outliers"] == sum(int((acts.norm(dim=-1) > limit).sum())
                                              for split in ("train", "eval") for acts in reference.iter_split(split))
    assert meta["n_excluded_outliers"] > 0
    store = ActivationStore(tmp_path)
    for split in ("train", "eval"):
        assert torch.equal(torch.cat(list(store.iter_split(split))), expected[split])
    listed = {shard["file"] for shard in meta["train_shards"] + meta["eval_shards"]}
    assert all(name.endswith("-kept.safetensors") for name in listed)
    assert {path.name for path in tmp_path.glob("*.safetensors")} == listed


def test_a_corpus_of_special_tokens_only_is_refused_naming_why(tmp_path: Path) -> None:
    import polars as pl

    from sae_pipeline.config import ConfigError

    spec = ActivationSpec()
    tokenizer = load_tokenizer(spec)
    ids = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    corpus = pl.DataFrame({"seq_id": list(range(4)), "text": [""] * 4, "input_ids": [ids] * 4},
                          schema={"seq_id": pl.Int64, "text": pl.String, "input_ids": pl.List(pl.Int32)})
    with pytest.raises(ConfigError, match="no tokens left after excluding padding/special tokens"):
        extract_activations(corpus, load_model(spec), tokenizer, spec, tmp_path, spec.model)
