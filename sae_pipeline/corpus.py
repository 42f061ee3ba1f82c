"""Text sources and tokenisation into fixed-length sequences.

The embedded default is real English prose that every Python installation ships: the docstrings of the
standard library, read at run time with `ast` (nothing third-party is committed to the repository). Any
`datasets` name or local text/jsonl/parquet files work when configured.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import polars as pl

from sae_pipeline.config import EMBEDDED_CORPUS, ConfigError, CorpusSpec
from sae_pipeline.storage import CORPUS_FILE, Layout

_STDLIB_SKIP = ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo")


@dataclass(frozen=True)
class Document:
    """One source document and where it comes from."""

    origin: str
    """The standard-library package (embedded corpus), the file (local source) or the dataset it was read from."""
    text: str


def stdlib_docstring_sources(public_only: bool = False) -> Iterator[Document]:
    """Every docstring of the installed standard library, whole, in a stable (sorted) order, its origin the
    top-level package or module it belongs to (`email`, `json`, `textwrap`); `public_only`: not those of
    modules whose name starts with `_`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if any(part in _STDLIB_SKIP for part in parts) or (public_only and parts[0].startswith("_")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        origin = parts[0].removesuffix(".py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield Document(origin, doc)


def stdlib_docstrings(min_words: int) -> Iterator[Document]:
    """The prose paragraphs of the standard library's docstrings (`stdlib_docstring_sources`), one each."""
    for source in stdlib_docstring_sources():
        yield from (Document(source.origin, text) for text in _prose_paragraphs(source.text, min_words))


def _prose_paragraphs(doc: str, min_words: int) -> Iterator[str]:
    """Keep paragraphs that read as prose: enough words, mostly letters (drops code samples and tables)."""
    for paragraph in doc.split("\n\n"):
        text = " ".join(paragraph.split())
        if len(text.split()) < min_words or text.startswith(">>>"):
            continue
        letters = sum(ch.isalpha() or ch.isspace() for ch in text)
        if letters / len(text) >= 0.85:
            yield text


READ_CHUNK = 1 << 20
"""Characters of a .txt file read at a time."""
BATCH_ROWS = 4096
"""Rows of a .parquet file read at a time."""


def _txt_paragraphs(file: Path) -> Iterator[str]:
    """The file's blank-line-separated paragraphs (those not only whitespace), read a chunk at a time: exactly
    `text.split("\n\n")` of the whole text, a separator spanning two chunks included."""
    carry = ""
    with open(file, encoding="utf-8") as handle:
        while chunk := handle.read(READ_CHUNK):
            *done, carry = (carry + chunk).split("\n\n")
            yield from (paragraph for paragraph in done if paragraph.strip())
    if carry.strip():
        yield carry


def _jsonl_texts(file: Path, text_column: str) -> Iterator[str]:
    """`text_column` of each JSON line, a line at a time."""
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"source: {file}, line {number}: not JSON ({error})") from None
            if not isinstance(row, dict) or text_column not in row:
                keys = list(row) if isinstance(row, dict) else type(row).__name__
                raise ConfigError(f"text_column: {text_column!r} is not a column of {file} (line {number}: {keys})")
            if row[text_column]:
                yield row[text_column]


def _parquet_texts(file: Path, text_column: str) -> Iterator[str]:
    """`text_column` of each row, BATCH_ROWS rows at a time (only that column is read)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(file)
    if text_column not in table.schema_arrow.names:
        raise ConfigError(f"text_column: {text_column!r} is not a column of {file} ({table.schema_arrow.names})")
    for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=[text_column]):
        yield from (text for text in batch.column(0).to_pylist() if text)


def _local_texts(path: Path, text_column: str) -> Iterator[Document]:
    """The documents of a local file or of every file in a folder (sorted), each read as a stream: memory does
    not grow with the corpus, and reading stops once the corpus has its `max_sequences`. A document's origin is
    its file, relative to the folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    readers = {".txt": _txt_paragraphs, ".jsonl": partial(_jsonl_texts, text_column=text_column),
               ".parquet": partial(_parquet_texts, text_column=text_column)}
    for file in files:
        reader = readers.get(file.suffix.lower())
        if reader is not None:
            origin = str(file.relative_to(path)) if path.is_dir() else file.name
            yield from (Document(origin, text) for text in reader(file))


def _dataset_texts(spec: CorpusSpec) -> Iterator[str]:
    import datasets  # imported lazily: only a configured Hub/local dataset needs it

    data = datasets.load_dataset(spec.source, split=spec.split, streaming=True)
    for row in data:
        if spec.text_column not in row:
            raise ConfigError(f"text_column: {spec.text_column!r} not in dataset {spec.source!r} ({list(row)})")
        if row[spec.text_column]:
            yield row[spec.text_column]


LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def check_source(source: str) -> None:
    """Refuse a source that cannot be what the user meant: empty (it would read the working folder) or a local
    path that does not exist; a `datasets` name (`owner/name`) is only resolved when read."""
    if not source.strip():
        raise ConfigError(f"source: {source!r} is empty; give {EMBEDDED_CORPUS}, a datasets name, or a local "
                          f"{'/'.join(LOCAL_SUFFIXES)} file or folder")
    if source == EMBEDDED_CORPUS:
        return
    looks_local = source.startswith(("/", ".", "~")) or source.lower().endswith(LOCAL_SUFFIXES)
    if looks_local and not Path(source).expanduser().exists():
        raise ConfigError(f"source: {source!r} is a local path that does not exist")


def iter_documents(spec: CorpusSpec) -> Iterator[Document]:
    """Documents of the configured source, each with its origin."""
    check_source(spec.source)
    if spec.source == EMBEDDED_CORPUS:
        paragraphs = list(stdlib_docstrings(spec.min_words))
        random.Random(0).shuffle(paragraphs)  # mix modules; fixed seed keeps the corpus reproducible
        return iter(paragraphs)
    local = Path(spec.source).expanduser()
    if local.exists():
        return (d for d in _local_texts(local, spec.text_column) if len(d.text.split()) >= spec.min_words)
    return (Document(spec.source, t) for t in _dataset_texts(spec) if len(t.split()) >= spec.min_words)


CORPUS_COLUMNS: dict[str, str] = {
    "seq_id": "sequence id, 0-based in corpus order (the activation store's locations point here)",
    "text": "the source document the sequence was tokenised from (truncated to context_length tokens)",
    "input_ids": "token ids, special tokens included",
    "origin": "where the document comes from: its standard-library package (embedded corpus), file or dataset",
}
"""What each column of corpus.parquet holds."""


def tokenize_corpus(documents: Iterable[Document], tokenizer, spec: CorpusSpec) -> pl.DataFrame:
    """Pack documents into sequences of at most `context_length` tokens (special tokens included).

    Each document is truncated to one sequence, so a sequence is one coherent passage: its contexts read
    naturally in the feature dashboard. Returns one row per sequence: CORPUS_COLUMNS.
    """
    rows: list[dict] = []
    for document in documents:
        ids = tokenizer(document.text, truncation=True, max_length=spec.context_length)["input_ids"]
        rows.append({"seq_id": len(rows), "text": document.text, "input_ids": ids, "origin": document.origin})
        if len(rows) >= spec.max_sequences:
            break
    if not rows:
        raise ConfigError(f"corpus.source: {spec.source!r} yielded no documents with >= {spec.min_words} words")
    return pl.DataFrame(rows, schema={"seq_id": pl.Int64, "text": pl.String, "input_ids": pl.List(pl.Int32),
                                      "origin": pl.String})


def read_corpus(layout: Layout) -> pl.DataFrame:
    """The `corpus` asset's table (pulled from object storage first when the root is remote)."""
    return pl.read_parquet(layout.pull(layout.corpus_dir) / CORPUS_FILE)
