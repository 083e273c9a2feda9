"""Tests for the MMIDIDX ``.bin/.idx`` token store."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_mgt.data.indexed import (
    MAGIC,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    choose_dtype,
    merge_datasets,
)


def _write(prefix: Path, docs: list[np.ndarray], dtype: np.dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)


def _random_docs(seed: int, high: int, n: int = 20) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(1, 200))) for _ in range(n)]


@pytest.mark.parametrize(("dtype", "high"), [(np.uint16, 65536), (np.int32, 2**31 - 1)])
def test_round_trip(tmp_path: Path, dtype: type, high: int) -> None:
    docs = _random_docs(0, high)
    docs[0][0] = high - 1  # the largest representable id survives
    _write(tmp_path / "ds", docs, np.dtype(dtype))
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(docs) == ds.num_documents
    assert ds.num_tokens == sum(len(d) for d in docs)
    np.testing.assert_array_equal(ds.sizes, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.doc_boundaries, np.arange(len(docs) + 1))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    with pytest.raises(IndexError, match="out of range"):
        ds[len(docs)]


def test_index_layout_is_megatron_mmidx(tmp_path: Path) -> None:
    _write(tmp_path / "ds", [np.array([5, 6, 7]), np.array([8])], np.dtype(np.uint16))
    raw = (tmp_path / "ds.idx").read_bytes()
    magic, version, code, n_seq, n_doc_idx = struct.unpack_from("<9sQBQQ", raw)
    assert (magic, version, code, n_seq, n_doc_idx) == (MAGIC, 1, 8, 2, 3)
    body = raw[34:]
    assert np.frombuffer(body[:8], np.int32).tolist() == [3, 1]
    assert np.frombuffer(body[8:24], np.int64).tolist() == [0, 6]  # byte pointers
    assert np.frombuffer(body[24:], np.int64).tolist() == [0, 1, 2]
    assert (tmp_path / "ds.bin").read_bytes() == np.array([5, 6, 7, 8], np.uint16).tobytes()


def test_choose_dtype_boundaries() -> None:
    assert choose_dtype(65536) == np.uint16  # max id 65535 fits
    assert choose_dtype(65537) == np.int32
    assert choose_dtype(32000) == np.uint16
    with pytest.raises(ValueError, match="vocab_size"):
        choose_dtype(0)
    with pytest.raises(ValueError, match="too large"):
        choose_dtype(2**31 + 1)


def test_token_too_large_for_dtype(tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
        with pytest.raises(ValueError, match="token id 65536 does not fit in dtype uint16"):
            writer.add_document(np.array([1, 65536]))
        with pytest.raises(ValueError, match="token id -1"):
            writer.add_document(np.array([-1, 2]))
        with pytest.raises(ValueError, match="integers"):
            writer.add_document(np.array([1.5]))
        with pytest.raises(ValueError, match="empty"):
            writer.add_document(np.array([], dtype=np.int64))
        writer.add_document(np.array([65535]))
    assert IndexedDataset(tmp_path / "ds")[0].tolist() == [65535]


class _Boom(RuntimeError):
    pass


def test_interrupted_write_keeps_previous_dataset(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    old_docs = [np.array([1, 2, 3]), np.array([4, 5])]
    _write(prefix, old_docs, np.dtype(np.uint16))
    old_bin, old_idx = (tmp_path / "ds.bin").read_bytes(), (tmp_path / "ds.idx").read_bytes()

    with pytest.raises(_Boom):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document(np.arange(1000))
            raise _Boom("crash midway")

    assert (tmp_path / "ds.bin").read_bytes() == old_bin
    assert (tmp_path / "ds.idx").read_bytes() == old_idx
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no temp files left
    assert IndexedDataset(prefix)[1].tolist() == [4, 5]


def test_interrupted_first_write_leaves_no_index(tmp_path: Path) -> None:
    with pytest.raises(_Boom):
        with IndexedDatasetWriter(tmp_path / "fresh", np.uint16) as writer:
            writer.add_document(np.arange(10))
            raise _Boom
    assert list(tmp_path.iterdir()) == []


def test_finalized_writer_rejects_more_documents(tmp_path: Path) -> None:
    writer = IndexedDatasetWriter(tmp_path / "ds", np.uint16)
    writer.add_document(np.array([1]))
    writer.finalize()
    with pytest.raises(RuntimeError, match="already finalized"):
        writer.add_document(np.array([2]))


def test_merge(tmp_path: Path) -> None:
    a, b = _random_docs(1, 1000, 5), _random_docs(2, 1000, 7)
    _write(tmp_path / "a", a, np.dtype(np.uint16))
    _write(tmp_path / "b", b, np.dtype(np.uint16))
    merged = merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert len(merged) == 12 and merged.num_documents == 12
    np.testing.assert_array_equal(merged.doc_boundaries, np.arange(13))
    for i, doc in enumerate(a + b):
        np.testing.assert_array_equal(merged[i], doc)


def test_merge_rejects_mixed_dtypes_and_self_overwrite(tmp_path: Path) -> None:
    _write(tmp_path / "a", [np.array([1])], np.dtype(np.uint16))
    _write(tmp_path / "b", [np.array([1])], np.dtype(np.int32))
    with pytest.raises(ValueError, match="dtype int32"):
        merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert not (tmp_path / "ab.idx").exists()
    with pytest.raises(ValueError, match="also an input"):
        merge_datasets([tmp_path / "a"], tmp_path / "a")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.idx"):
        IndexedDataset(tmp_path / "nope")
    _write(tmp_path / "ds", [np.array([1])], np.dtype(np.uint16))
    (tmp_path / "ds.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"ds\.bin"):
        IndexedDataset(tmp_path / "ds")


def test_bad_magic(tmp_path: Path) -> None:
    _write(tmp_path / "ds", [np.array([1, 2])], np.dtype(np.uint16))
    raw = bytearray((tmp_path / "ds.idx").read_bytes())
    raw[:4] = b"XXXX"
    (tmp_path / "ds.idx").write_bytes(bytes(raw))
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx: bad magic"):
        IndexedDataset(tmp_path / "ds")


def test_truncated_bin(tmp_path: Path) -> None:
    _write(tmp_path / "ds", [np.arange(100)], np.dtype(np.uint16))
    data = (tmp_path / "ds.bin").read_bytes()
    (tmp_path / "ds.bin").write_bytes(data[:-10])
    with pytest.raises(IndexedDatasetError, match=r"ds\.bin is truncated: 190 bytes on disk.*200 bytes"):
        IndexedDataset(tmp_path / "ds")


def test_truncated_idx(tmp_path: Path) -> None:
    _write(tmp_path / "ds", [np.arange(100), np.arange(3)], np.dtype(np.uint16))
    raw = (tmp_path / "ds.idx").read_bytes()
    (tmp_path / "ds.idx").write_bytes(raw[:-8])
    with pytest.raises(IndexedDatasetError, match="requires"):
        IndexedDataset(tmp_path / "ds")
    (tmp_path / "ds.idx").write_bytes(raw[:20])
    with pytest.raises(IndexedDatasetError, match="header"):
        IndexedDataset(tmp_path / "ds")
