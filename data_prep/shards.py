"""Tokenise documents into ``.bin/.idx`` shards, in parallel and deterministically.

Documents are grouped into chunks of about ``chunk_chars`` characters and
encoded by a pool of worker processes; results are consumed strictly in
submission order (with a bounded number in flight), so the output bytes do not
depend on the number of workers. Every document gets the EOS id appended. Temp files
that a killed run left next to the shards are removed when their process is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.sources import Document
from data_prep.tokenizer import Tokenizer
from megatron_mgt.data.indexed import IndexedDatasetWriter, choose_dtype

Item = tuple[str, Document]  # (split name, document)
DEFAULT_CHUNK_CHARS = 1 << 18
_IN_FLIGHT_PER_WORKER = 4


class ShardError(RuntimeError):
    """Tokenisation of a named document failed, or a split received no documents."""


class EmptySplitError(ShardError):
    """A split received no documents; `counts` has the documents each split did receive."""

    def __init__(self, message: str, counts: dict[str, int]) -> None:
        super().__init__(message)
        self.counts = counts


@dataclass(frozen=True)
class ShardStats:
    """What was written for one split; `seconds` is this split's share of the wall time
    (each chunk's time is shared among the splits in it by their characters)."""

    prefix: str
    documents: int
    tokens: int
    chars: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class _Failure:
    source: str
    message: str


_worker_state: dict[str, object] = {}


def _init_worker(model_file: str, dtype: str) -> None:
    _worker_state["tokenizer"] = Tokenizer(model_file)
    _worker_state["dtype"] = np.dtype(dtype)


def _encode_chunk(chunk: list[Item]) -> list[np.ndarray] | _Failure:
    """Token arrays (with EOS) for each document, or the first failure, named by source."""
    tokenizer: Tokenizer = _worker_state["tokenizer"]  # type: ignore[assignment]
    dtype: np.dtype = _worker_state["dtype"]  # type: ignore[assignment]
    out = []
    for _, doc in chunk:
        try:
            ids = tokenizer.encode(doc.text)
            ids.append(tokenizer.eos_id)
            out.append(np.asarray(ids, dtype=dtype))
        except Exception as err:  # reported to the parent with the document's source
            return _Failure(doc.source, f"{type(err).__name__}: {err}")
    return out


def _chunks(items: Iterable[Item], chunk_chars: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    size = 0
    for item in items:
        chunk.append(item)
        size += len(item[1].text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(
    chunks: Iterator[list[Item]], model_file: str, dtype: np.dtype, workers: int
) -> Iterator[tuple[list[Item], list[np.ndarray] | _Failure]]:
    """Yield (chunk, result) in input order, encoding in ``workers`` processes."""
    if workers == 1:
        _init_worker(model_file, dtype.str)
        for chunk in chunks:
            yield chunk, _encode_chunk(chunk)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(model_file, dtype.str)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_chunk, (chunk,))))
            if len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
                done_chunk, result = pending.popleft()
                yield done_chunk, result.get()
        while pending:
            done_chunk, result = pending.popleft()
            yield done_chunk, result.get()


def remove_stale_temps(prefix: str | os.PathLike) -> list[Path]:
    """Remove the temp files (``.NAME.bin|idx.PID.HEX.tmp``, data.indexed) of a writer of
    this shard whose process no longer exists on this host; returns them."""
    target = Path(prefix)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(bin|idx)\.(\d+)\.[0-9a-f]+\.tmp")
    removed = []
    for path in target.parent.glob(f".{target.name}.*.tmp"):
        match = pattern.fullmatch(path.name)
        if match and not _alive(int(match.group(2))):
            path.unlink(missing_ok=True)
            removed.append(path)
            print(f"mgt-prep: removed {path}, left by process {match.group(2)}, which is gone", file=sys.stderr)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def assign_splits(documents: Iterable[Document], valid_fraction: float) -> Iterator[Item]:
    """Route exactly ``floor(n * valid_fraction)`` of the first n documents, evenly spread, to 'valid'."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    for i, doc in enumerate(documents):
        is_valid = int((i + 1) * valid_fraction) > int(i * valid_fraction)
        yield ("valid" if is_valid else "train"), doc


def tokenize_to_shards(
    items: Iterable[Item],
    model_file: str | os.PathLike,
    out_prefixes: Mapping[str, str | os.PathLike],
    workers: int = 1,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    progress: bool = False,
) -> dict[str, ShardStats]:
    """Tokenise ``(split, document)`` items into one shard per split; all-or-nothing per call."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not out_prefixes:
        raise ValueError("out_prefixes must name at least one split")
    model_file = os.fspath(model_file)
    tokenizer = Tokenizer(model_file)
    try:
        dtype = choose_dtype(tokenizer.vocab_size)
    except ValueError as err:
        raise ShardError(f"tokenizer {model_file}: {err}") from err
    for prefix in out_prefixes.values():
        remove_stale_temps(prefix)
    counts = {split: {"documents": 0, "tokens": 0, "chars": 0, "seconds": 0.0} for split in out_prefixes}
    last = time.perf_counter()
    with ExitStack() as stack:
        writers = {split: stack.enter_context(IndexedDatasetWriter(prefix, dtype)) for split, prefix in out_prefixes.items()}
        bar = stack.enter_context(tqdm(unit="tok", unit_scale=True, desc="tokenize", disable=not progress))
        for chunk, result in _encoded_chunks(_chunks(items, chunk_chars), model_file, dtype, workers):
            if isinstance(result, _Failure):
                raise ShardError(f"tokenizing {result.source} failed: {result.message}")
            for (split, doc), tokens in zip(chunk, result, strict=True):
                if split not in writers:
                    raise ShardError(f"{doc.source}: unknown split {split!r}; expected one of {sorted(writers)}")
                writers[split].add_document(tokens)
                stats = counts[split]
                stats["documents"] += 1
                stats["tokens"] += tokens.size
                stats["chars"] += len(doc.text)
                bar.update(tokens.size)
            now, chunk_chars = time.perf_counter(), max(1, sum(len(doc.text) for _, doc in chunk))
            for split, doc in chunk:
                counts[split]["seconds"] += (now - last) * len(doc.text) / chunk_chars
            last = now
        documents = {split: stats["documents"] for split, stats in counts.items()}
        empty = [split for split, n in documents.items() if n == 0]
        if empty:
            raise EmptySplitError(f"no documents for split(s) {empty} (documents per split: {documents}); nothing written", documents)
        for writer in writers.values():
            writer.finalize()
    return {split: ShardStats(prefix=os.fspath(out_prefixes[split]), **counts[split]) for split in out_prefixes}
