"""Local corpora are read as streams: a .txt a chunk at a time, a .jsonl a line at a time, a .parquet a batch of
rows at a time, giving exactly what reading them whole gives, and reading no further than the corpus needs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_pipeline import corpus as corpus_module
from sae_pipeline.config import ConfigError, CorpusSpec
from sae_pipeline.corpus import iter_documents


def iter_texts(spec: CorpusSpec):
    """The texts of the documents a spec reads, in order."""
    return (document.text for document in iter_documents(spec))


TEXT = "first paragraph here\n\nsecond one\n\n\nthird after three newlines\n\n   \n\nfourth\nwith a line break\n\n"


def test_a_txt_file_splits_into_the_paragraphs_a_whole_read_gives(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "doc.txt"
    path.write_text(TEXT * 5, encoding="utf-8")
    expected = [p for p in (TEXT * 5).split("\n\n") if p.strip()]
    for chunk in (1, 2, 3, 7, 1 << 20):  # separators land across every kind of chunk boundary
        monkeypatch.setattr(corpus_module, "READ_CHUNK", chunk)
        documents = list(corpus_module._local_texts(path, "text"))
        assert [d.text for d in documents] == expected, chunk
        assert {d.origin for d in documents} == {"doc.txt"}


def test_a_jsonl_file_is_read_a_line_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"document number {i} has words", "id": i} for i in range(40)] + [{"text": "", "id": 40}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n", encoding="utf-8")
    head = list(itertools.islice(iter_texts(CorpusSpec(source=str(path), min_words=1)), 3))
    assert head == [r["text"] for r in rows[:3]]  # the broken last line is never reached
    with pytest.raises(ConfigError, match=rf"source: {path}, line 42: not JSON"):
        list(iter_texts(CorpusSpec(source=str(path), min_words=1)))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"text_column: 'text' is not a column of .*other\.jsonl "
                                          r"\(line 1: \['body'\]\)"):
        list(iter_texts(CorpusSpec(source=str(other), min_words=1)))


def test_a_parquet_file_is_read_in_batches_of_its_text_column(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "docs.parquet"
    texts = [f"row {i} of the table" if i % 7 else None for i in range(100)]
    pq.write_table(pa.table({"body": texts, "n": list(range(100))}), path, row_group_size=16)
    monkeypatch.setattr(corpus_module, "BATCH_ROWS", 5)
    got = list(iter_texts(CorpusSpec(source=str(path), text_column="body", min_words=1)))
    assert got == [t for t in pl.read_parquet(path)["body"].to_list() if t]
    with pytest.raises(ConfigError, match=r"text_column: 'text' is not a column of .*docs\.parquet "
                                          r"\(\['body', 'n'\]\)"):
        list(iter_texts(CorpusSpec(source=str(path), min_words=1)))


def test_a_folder_reads_its_files_in_name_order_and_filters_short_documents(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "a jsonl document of six words"}) + "\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("a text file paragraph of seven words\n\ntoo short", encoding="utf-8")
    pq.write_table(pa.table({"text": ["a parquet row with six words"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("ignored: not a corpus file", encoding="utf-8")
    got = list(iter_texts(CorpusSpec(source=str(tmp_path), min_words=4)))
    assert got == ["a text file paragraph of seven words", "a jsonl document of six words",
                   "a parquet row with six words"]


def test_documents_keep_their_origin(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("one two three\n\nfour five six", encoding="utf-8")
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "seven eight nine"}) + "\n", encoding="utf-8")
    documents = list(corpus_module.iter_documents(CorpusSpec(source=str(tmp_path), min_words=1)))
    assert [(d.origin, d.text) for d in documents] == [("a.txt", "one two three"), ("a.txt", "four five six"),
                                                        ("sub/b.jsonl", "seven eight nine")]
    embedded = list(itertools.islice(corpus_module.stdlib_docstrings(min_words=8), 200))
    stdlib = Path(corpus_module.sysconfig.get_paths()["stdlib"])
    assert all((stdlib / d.origin).exists() or (stdlib / f"{d.origin}.py").exists() for d in embedded)
