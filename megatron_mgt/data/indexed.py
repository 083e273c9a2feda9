"""Megatron-compatible memory-mapped token store (``.bin`` tokens + ``.idx`` index).

Index layout (little endian, "MMIDIDX" version 1, as written by Megatron-LM):

    magic          9 bytes  b"MMIDIDX\\x00\\x00"
    version        <Q       1
    dtype code     <B       1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                            6 float64, 7 float32, 8 uint16
    sequence count <Q       N
    doc_idx count  <Q       D + 1 (length of the document index array)
    sizes          int32[N]     tokens per sequence
    pointers       int64[N]     byte offset of each sequence in the .bin
    doc_idx        int64[D + 1] first sequence of each document, then N

The ``.bin`` file is the plain concatenation of all sequences. This writer
stores one sequence per document.
"""

from __future__ import annotations

import os
import secrets
import shutil
import struct
from array import array
from pathlib import Path
from types import TracebackType

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")
_COPY_CHUNK_BYTES = 16 << 20
_MAX_SEQUENCE_TOKENS = np.iinfo(np.int32).max


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, malformed or inconsistent."""


def bin_path(path_prefix: str | os.PathLike) -> Path:
    """Path of the token file for ``path_prefix``."""
    return Path(f"{os.fspath(path_prefix)}.bin")


def idx_path(path_prefix: str | os.PathLike) -> Path:
    """Path of the index file for ``path_prefix``."""
    return Path(f"{os.fspath(path_prefix)}.idx")


def choose_dtype(vocab_size: int) -> np.dtype:
    """Smallest supported token dtype holding ids ``0 .. vocab_size - 1`` (uint16 or int32)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    max_id = vocab_size - 1
    if max_id <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_id <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise ValueError(f"vocab_size {vocab_size} is too large: max token id {max_id} does not fit in int32")


def _dtype_code(dtype: np.dtype | type) -> int:
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF_DTYPE:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"unsupported token dtype {dtype}; supported: {names}")
    return _CODE_OF_DTYPE[dtype]


def check_tokens_fit(tokens: np.ndarray, dtype: np.dtype) -> None:
    """Raise ``ValueError`` if any integer token id lies outside the range of ``dtype``."""
    if tokens.size == 0 or dtype.kind == "f":
        return
    info = np.iinfo(dtype)
    low, high = int(tokens.min()), int(tokens.max())
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise ValueError(f"token id {bad} does not fit in dtype {dtype} (range {info.min}..{info.max})")


def _temp_path(target: Path) -> Path:
    """A fresh hidden name next to ``target`` (created with the usual umask permissions)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


class IndexedDatasetWriter:
    """Writes a ``.bin/.idx`` pair atomically.

    Data goes to temporary files next to the target; ``finalize`` renames the
    ``.bin`` first and the ``.idx`` last (after removing any stale ``.idx``), so
    an interrupted run never leaves an index describing data that is not there.
    Used as a context manager, an exception discards the temporary files and
    leaves any previous dataset with the same prefix untouched.
    """

    def __init__(self, path_prefix: str | os.PathLike, dtype: np.dtype | type) -> None:
        self.path_prefix = os.fspath(path_prefix)
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        target = bin_path(self.path_prefix)
        if not target.parent.is_dir():
            raise FileNotFoundError(f"output directory does not exist: {target.parent}")
        self._bin_tmp = _temp_path(target)
        self._bin = open(self._bin_tmp, "xb")
        self._sizes = array("q")
        self._doc_idx = array("q", [0])
        self._num_tokens = 0
        self._closed = False

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document (a 1-D array of token ids) as a single sequence."""
        self._check_open()
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"a document must be a 1-D token array, got shape {tokens.shape}")
        if tokens.size == 0:
            raise ValueError("cannot add an empty document")
        if tokens.size > _MAX_SEQUENCE_TOKENS:
            raise ValueError(f"a document of {tokens.size} tokens exceeds the index format's int32 limit")
        if self.dtype.kind in "iu" and tokens.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers for dtype {self.dtype}, got {tokens.dtype}")
        check_tokens_fit(tokens, self.dtype)
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(tokens.size)
        self._num_tokens += tokens.size
        self._doc_idx.append(len(self._sizes))

    def add_dataset(self, dataset: IndexedDataset) -> None:
        """Append every sequence and document of an existing dataset (same dtype)."""
        self._check_open()
        if dataset.dtype != self.dtype:
            raise ValueError(f"cannot merge {dataset.path_prefix} (dtype {dataset.dtype}) into {self.path_prefix} (dtype {self.dtype})")
        offset = len(self._sizes)
        with open(bin_path(dataset.path_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, _COPY_CHUNK_BYTES)
        self._sizes.extend(dataset.sizes.astype(np.int64).tolist())
        self._num_tokens += dataset.num_tokens
        self._doc_idx.extend((dataset.doc_boundaries[1:] + offset).tolist())

    def finalize(self) -> None:
        """Write the index and atomically publish ``<prefix>.bin`` then ``<prefix>.idx``."""
        self._check_open()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int64)
        pointers = np.zeros(sizes.size, dtype=np.int64)
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        idx_target = idx_path(self.path_prefix)
        idx_tmp = _temp_path(idx_target)
        try:
            with open(idx_tmp, "xb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, self._code, sizes.size, len(self._doc_idx)))
                f.write(sizes.astype(np.int32).tobytes())
                f.write(pointers.tobytes())
                f.write(np.frombuffer(self._doc_idx, dtype=np.int64).tobytes())
                f.flush()
                os.fsync(f.fileno())
            idx_target.unlink(missing_ok=True)
            os.replace(self._bin_tmp, bin_path(self.path_prefix))
            os.replace(idx_tmp, idx_target)
        except BaseException:
            idx_tmp.unlink(missing_ok=True)
            self.discard()
            raise
        self._closed = True

    def discard(self) -> None:
        """Abandon the write and delete the temporary files."""
        if not self._bin.closed:
            self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"writer for {self.path_prefix} is already finalized or discarded")

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._closed:
            self.finalize()


class IndexedDataset:
    """Read-only, memory-mapped view of a ``.bin/.idx`` pair; item ``i`` is sequence ``i``."""

    def __init__(self, path_prefix: str | os.PathLike) -> None:
        self.path_prefix = os.fspath(path_prefix)
        index_file, data_file = idx_path(self.path_prefix), bin_path(self.path_prefix)
        for path in (index_file, data_file):
            if not path.is_file():
                raise FileNotFoundError(f"indexed dataset file not found: {path}")
        self.dtype, self.sizes, self.pointers, self.doc_boundaries = _read_index(index_file)
        expected = int(self.sizes.sum()) * self.dtype.itemsize
        actual = data_file.stat().st_size
        if actual != expected:
            state = "truncated" if actual < expected else "larger than its index"
            raise IndexedDatasetError(f"{data_file} is {state}: {actual} bytes on disk, index {index_file} describes {expected} bytes")
        self.num_tokens = expected // self.dtype.itemsize
        if self.num_tokens:
            self.tokens: np.ndarray = np.memmap(data_file, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.empty(0, dtype=self.dtype)

    @property
    def num_documents(self) -> int:
        return len(self.doc_boundaries) - 1

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"sequence index {i} out of range for {self.path_prefix} with {n} sequences")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.sizes[i])])


def _read_index(path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Parse and validate an index file; returns (dtype, sizes, pointers, doc_boundaries)."""
    file_size = path.stat().st_size
    if file_size < _HEADER.size:
        raise IndexedDatasetError(f"{path}: index is truncated ({file_size} bytes, header needs {_HEADER.size})")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    magic, version, code, n_seq, n_doc_idx = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise IndexedDatasetError(f"{path}: bad magic {magic!r}, expected {MAGIC!r} (not an MMIDIDX index)")
    if version != VERSION:
        raise IndexedDatasetError(f"{path}: unsupported index version {version}, expected {VERSION}")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{path}: unknown dtype code {code}, known codes {sorted(DTYPE_CODES)}")
    expected = _HEADER.size + 12 * n_seq + 8 * n_doc_idx
    if file_size != expected:
        raise IndexedDatasetError(
            f"{path}: index is {file_size} bytes but its header ({n_seq} sequences, {n_doc_idx} document boundaries) requires {expected}"
        )
    dtype = DTYPE_CODES[code]
    offset = _HEADER.size
    sizes = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=offset)
    pointers = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=offset + 4 * n_seq)
    doc_idx = np.frombuffer(raw, dtype=np.int64, count=n_doc_idx, offset=offset + 12 * n_seq)
    if n_doc_idx < 1 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
        raise IndexedDatasetError(f"{path}: document index must rise monotonically from 0 to {n_seq}")
    if np.any(sizes < 0):
        raise IndexedDatasetError(f"{path}: negative sequence size at sequence {int(np.argmax(sizes < 0))}")
    contiguous = np.zeros(n_seq, dtype=np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=contiguous[1:])
    if not np.array_equal(pointers, contiguous):
        bad = int(np.argmax(pointers != contiguous))
        raise IndexedDatasetError(
            f"{path}: sequence {bad} pointer {int(pointers[bad])} does not follow the previous sequences "
            f"(expected {int(contiguous[bad])}); only contiguous .bin layouts are supported"
        )
    return dtype, sizes, pointers, doc_idx


def merge_datasets(prefixes: list[str | os.PathLike], out_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate datasets (same dtype, in the given order) into ``out_prefix``."""
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    out = os.path.abspath(os.fspath(out_prefix))
    if any(os.path.abspath(os.fspath(p)) == out for p in prefixes):
        raise ValueError(f"output prefix {out_prefix} is also an input; choose a new output prefix")
    datasets = [IndexedDataset(p) for p in prefixes]
    with IndexedDatasetWriter(out_prefix, datasets[0].dtype) as writer:
        for dataset in datasets:
            writer.add_dataset(dataset)
    return IndexedDataset(out_prefix)
