"""Iterate text documents from files, globs, JSONL, parquet and Hugging Face datasets.

An input spec is one of:

* a text file or glob (``corpus/*.txt``, ``**`` allowed): one file is one
  document, or one document per blank-line separated paragraph with
  ``split="paragraph"``;
* a ``.jsonl`` file: one JSON object per line, text under ``text_key``;
* a ``.parquet`` file: text in column ``text_key``;
* a directory written by ``datasets.Dataset.save_to_disk`` (or a DatasetDict,
  whose ``hf_split`` is used);
* ``hf:NAME[:CONFIG[:SPLIT]]``: ``datasets.load_dataset(NAME, CONFIG, split=SPLIT)``
  (SPLIT defaults to ``train``; NAME may be a hub id or a local data directory).

A missing path, a glob matching nothing, a directory that is not a saved
dataset or a missing text column is an error. Bad documents (empty, binary,
invalid UTF-8, a line longer than ``max_line_chars``, a JSONL line that is not
an object with a string ``text_key``) are skipped and counted in a
:class:`SkipReport`, or raise :class:`DataSourceError` when ``strict``.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Literal

SplitMode = Literal["file", "paragraph"]
DEFAULT_MAX_LINE_CHARS = 100_000
_EXAMPLES_PER_REASON = 3
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_BATCH_ROWS = 1000


class DataSourceError(ValueError):
    """An input cannot be read; the message names the file, key or value at fault."""


@dataclass(frozen=True)
class Document:
    """One document's text and where it came from (for error messages)."""

    text: str
    source: str


@dataclass
class SkipReport:
    """Counts of skipped documents per reason, with a few example sources each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, source: str) -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(source)

    def format(self) -> str:
        if not self.total:
            return "skipped documents: none"
        lines = [f"skipped documents: {self.total}"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason}: {count} (e.g. {', '.join(self.examples[reason])})")
        return "\n".join(lines)


@dataclass(frozen=True)
class SourceOptions:
    """How to read inputs; see the module docstring."""

    text_key: str = "text"
    split: SplitMode = "file"
    max_line_chars: int = DEFAULT_MAX_LINE_CHARS
    strict: bool = False
    hf_split: str = "train"

    def __post_init__(self) -> None:
        if self.split not in ("file", "paragraph"):
            raise ValueError(f"split mode must be 'file' or 'paragraph', got {self.split!r}")
        if self.max_line_chars < 1:
            raise ValueError(f"max_line_chars must be >= 1, got {self.max_line_chars}")


class _Reader:
    """Shared skip/strict handling while iterating the inputs."""

    def __init__(self, options: SourceOptions, report: SkipReport) -> None:
        self.options = options
        self.report = report

    def skip(self, reason: str, source: str, detail: str) -> None:
        if self.options.strict:
            raise DataSourceError(f"{source}: {detail}")
        self.report.add(reason, source)

    def check_text(self, text: str, source: str) -> str | None:
        """The stripped text, or None (after recording a skip) if it is unusable."""
        text = text.strip()
        if not text:
            self.skip("empty", source, "document is empty")
            return None
        if "\x00" in text:
            self.skip("binary", source, "contains NUL bytes (binary data?)")
            return None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            self.skip("invalid_utf8", source, f"unencodable character at index {err.start}: {err.reason}")
            return None
        limit = self.options.max_line_chars
        if len(text) > limit:
            longest = max(len(line) for line in text.split("\n"))
            if longest > limit:
                self.skip("huge_line", source, f"has a {longest}-character line (max_line_chars={limit})")
                return None
        return text


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Resolve globs; every spec must exist or match at least one path."""
    if not inputs:
        raise DataSourceError("no inputs given")
    resolved: list[str] = []
    for spec in inputs:
        if spec.startswith("hf:"):
            resolved.append(spec)
        elif glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if not os.path.isdir(p))
            if not matches:
                raise DataSourceError(f"glob matched no files: {spec}")
            resolved.extend(matches)
        elif not os.path.exists(spec):
            raise DataSourceError(f"input not found: {spec}")
        else:
            resolved.append(spec)
    return resolved


def iter_documents(inputs: Sequence[str], options: SourceOptions | None = None, report: SkipReport | None = None) -> Iterator[Document]:
    """Documents from every input in order; skips go to ``report``.

    Paths and globs are checked on call, so a missing input fails before any work starts.
    """
    reader = _Reader(options or SourceOptions(), report if report is not None else SkipReport())
    return chain.from_iterable(_read_spec(spec, reader) for spec in expand_inputs(inputs))


def _read_spec(spec: str, reader: _Reader) -> Iterator[Document]:
    if spec.startswith("hf:"):
        return _hf_hub(spec, reader)
    if os.path.isdir(spec):
        return _hf_disk(spec, reader)
    if spec.endswith(".jsonl"):
        return _jsonl(spec, reader)
    if spec.endswith(".parquet"):
        return _parquet(spec, reader)
    return _text_file(spec, reader)


def _text_file(path: str, reader: _Reader) -> Iterator[Document]:
    data = Path(path).read_bytes()
    if not data.strip():
        reader.skip("empty", path, "file is empty")
        return
    nul = data.find(b"\x00")
    if nul >= 0:
        reader.skip("binary", path, f"contains a NUL byte at offset {nul} (binary file?)")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        reader.skip("invalid_utf8", path, f"invalid UTF-8 at byte {err.start}: {err.reason}")
        return
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if reader.options.split == "file":
        pieces = [(text, path)]
    else:
        pieces = [(p, f"{path}:paragraph {i}") for i, p in enumerate(_PARAGRAPH_BREAK.split(text)) if p.strip()]
    for piece, source in pieces:
        checked = reader.check_text(piece, source)
        if checked is not None:
            yield Document(checked, source)


def _jsonl(path: str, reader: _Reader) -> Iterator[Document]:
    key = reader.options.text_key
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            source = f"{path}:{line_no}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError as err:
                reader.skip("invalid_utf8", source, f"invalid UTF-8: {err.reason}")
                continue
            except json.JSONDecodeError as err:
                reader.skip("invalid_json", source, f"invalid JSON: {err.msg}")
                continue
            if not isinstance(record, dict) or key not in record:
                reader.skip("missing_key", source, f"no text key {key!r} in this line")
                continue
            yield from _checked_value(record[key], source, reader)


def _checked_value(value: Any, source: str, reader: _Reader) -> Iterator[Document]:
    if value is None:
        reader.skip("empty", source, "text is null")
    elif not isinstance(value, str):
        reader.skip("not_text", source, f"text is a {type(value).__name__}, not a string")
    else:
        checked = reader.check_text(value, source)
        if checked is not None:
            yield Document(checked, source)


def _require_column(columns: Iterable[str], key: str, where: str) -> None:
    columns = list(columns)
    if key not in columns:
        raise DataSourceError(f"{where}: no text column {key!r}; available columns: {columns}")


def _parquet(path: str, reader: _Reader) -> Iterator[Document]:
    import pyarrow.parquet as pq

    key = reader.options.text_key
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:
        raise DataSourceError(f"{path}: cannot read parquet file: {err}") from err
    _require_column(parquet.schema_arrow.names, key, path)
    row = 0
    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[key]):
        for value in batch.column(0).to_pylist():
            yield from _checked_value(value, f"{path}:row {row}", reader)
            row += 1


def _rows(dataset: Any, where: str, reader: _Reader) -> Iterator[Document]:
    key = reader.options.text_key
    _require_column(dataset.column_names, key, where)
    row = 0
    for batch in dataset.select_columns([key]).iter(batch_size=_BATCH_ROWS):
        for value in batch[key]:
            yield from _checked_value(value, f"{where}:row {row}", reader)
            row += 1


def _pick_split(dataset: Any, split: str, where: str) -> Any:
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise DataSourceError(f"{where}: no split {split!r}; available splits: {list(dataset)}")
        return dataset[split]
    return dataset


def _hf_disk(path: str, reader: _Reader) -> Iterator[Document]:
    import datasets

    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any(os.path.isfile(os.path.join(path, m)) for m in markers):
        raise DataSourceError(f"{path} is a directory but not a dataset saved with save_to_disk; pass files or a glob like {path}/*.txt")
    dataset = _pick_split(datasets.load_from_disk(path), reader.options.hf_split, path)
    yield from _rows(dataset, path, reader)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """Split ``hf:NAME[:CONFIG[:SPLIT]]`` into (name, config or None, split)."""
    parts = spec.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3:
        raise DataSourceError(f"bad Hugging Face spec {spec!r}; expected hf:NAME[:CONFIG[:SPLIT]]")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split


def _hf_hub(spec: str, reader: _Reader) -> Iterator[Document]:
    import datasets

    name, config, split = parse_hf_spec(spec)
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        raise DataSourceError(f"{spec}: load_dataset({name!r}, {config!r}, split={split!r}) failed: {err}") from err
    yield from _rows(dataset, spec, reader)
