"""Tokenise documents into ``.bin/.idx`` shards, in parallel and deterministically.

Documents are grouped into chunks of about ``chunk_chars`` characters and
encoded by a pool of worker processes; results are consumed strictly in
submission order (with a bounded number in flight), so the output bytes do not
depend on the number of workers. Every document gets the EOS id appended.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ShardStats:
    """What was written for one split."""

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
    counts = {split: {"documents": 0, "tokens": 0, "chars": 0} for split in out_prefixes}
    start = time.perf_counter()
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
        empty = [split for split, stats in counts.items() if stats["documents"] == 0]
        if empty:
            raise ShardError(f"no documents for split(s) {empty}; nothing written")
        for writer in writers.values():
            writer.finalize()
    seconds = time.perf_counter() - start
    return {split: ShardStats(prefix=os.fspath(out_prefixes[split]), seconds=seconds, **counts[split]) for split in out_prefixes}
