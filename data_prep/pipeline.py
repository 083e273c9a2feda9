"""End-to-end steps behind ``mgt-prep``: inputs -> tokenizer, inputs -> shards, and the default dataset.

``prepare_default(out_dir)`` produces::

    OUT/tokenizer.model, OUT/tokenizer.json   SentencePiece model + metadata
    OUT/train.bin, OUT/train.idx              38 Shakespeare works
    OUT/valid.bin, OUT/valid.idx              4 held-out works (corpora.VALID_WORKS)
    OUT/meta.json                             sizes, ids, dtype, unigram entropy baselines

The result does not depend on ``workers``. It is idempotent: an existing tokenizer is reused (if its vocab size matches)
and existing shards are kept unless the tokenizer was just (re)trained.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from data_prep.corpora import PACKAGE, VALID_WORKS, fetch_shakespeare
from data_prep.inspect_shards import token_counts, unigram_cross_entropy, unigram_entropy
from data_prep.shards import EmptySplitError, Item, ShardError, ShardStats, assign_splits, tokenize_to_shards
from data_prep.sources import SkipReport, SourceOptions, iter_documents
from data_prep.tokenizer import Tokenizer, TokenizerError, TokenizerMeta, train_tokenizer
from megatron_mgt.data.indexed import IndexedDataset, bin_path, idx_path

DEFAULT_VOCAB_SIZE = 8192
TOKENIZER_NAME = "tokenizer"
META_NAME = "meta.json"
SPLITS = ("train", "valid")


def train_tokenizer_on_inputs(
    inputs: Sequence[str],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    options: SourceOptions | None = None,
    **train_kwargs: object,
) -> tuple[TokenizerMeta, SkipReport]:
    """Train a tokenizer on documents read from ``inputs`` (see ``data_prep.sources``); a
    failure says which documents were skipped and why."""
    report = SkipReport()
    texts = (doc.text for doc in iter_documents(inputs, options, report))
    try:
        meta = train_tokenizer(texts, out_prefix, vocab_size, source=" ".join(inputs), **train_kwargs)  # type: ignore[arg-type]
    except TokenizerError as err:
        raise TokenizerError(f"{err}\n{report.format()}" if report.total else str(err)) from None
    return meta, report


def tokenize_inputs(
    inputs: Sequence[str],
    model_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    valid_inputs: Sequence[str] = (),
    valid_fraction: float = 0.0,
    workers: int = 1,
    options: SourceOptions | None = None,
    progress: bool = False,
) -> tuple[dict[str, ShardStats], SkipReport]:
    """Write ``out_dir/train.{bin,idx}`` and, if a validation source is given, ``out_dir/valid.{bin,idx}``.

    Validation documents come from ``valid_inputs`` or, alternatively, from an
    evenly spread ``valid_fraction`` of the input documents. An empty split is an error that
    says why (the skip reasons; a fraction that rounds down to no document).
    """
    if valid_inputs and valid_fraction:
        raise ValueError("give either valid_inputs or valid_fraction, not both")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} is a file; it must be a directory (it gets train.bin/.idx and valid.bin/.idx)")
    out.mkdir(parents=True, exist_ok=True)
    report = SkipReport()
    items: Iterator[Item] = assign_splits(iter_documents(inputs, options, report), valid_fraction)
    if valid_inputs:
        items = chain(items, (("valid", doc) for doc in iter_documents(valid_inputs, options, report)))
    splits = SPLITS if valid_inputs or valid_fraction else ("train",)
    try:
        stats = tokenize_to_shards(items, model_file, {s: out / s for s in splits}, workers=workers, progress=progress)
    except EmptySplitError as err:
        notes, documents = [str(err)], sum(err.counts.values())
        if valid_fraction and documents and not int(documents * valid_fraction):
            notes.append(f"--valid-fraction {valid_fraction} of {documents} documents rounds down to 0; use at least {1 / documents:.3g} or --valid-inputs")
        raise ShardError("\n".join(notes + ([report.format()] if report.total else []))) from None
    return stats, report


@dataclass(frozen=True)
class PrepareResult:
    """The contents of ``meta.json`` and which steps actually ran."""

    meta: dict
    ran: list[str]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shard_meta(prefix: Path) -> dict:
    dataset = IndexedDataset(prefix)
    return {"prefix": prefix.name, "documents": dataset.num_documents, "tokens": dataset.num_tokens}


def prepare_default(
    out_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    workers: int = 1,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> PrepareResult:
    """Corpus + tokenizer + train/valid shards + ``meta.json`` in ``out_dir``, skipping finished steps."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ran: list[str] = []
    corpus = fetch_shakespeare(cache_dir)
    train_inputs = [str(f) for f in corpus.train_files]
    valid_inputs = [str(f) for f in corpus.valid_files]
    options = SourceOptions(strict=True)

    model_file, tokenizer_json = out / f"{TOKENIZER_NAME}.model", out / f"{TOKENIZER_NAME}.json"
    if force or not (model_file.is_file() and tokenizer_json.is_file()):
        log(f"training a {vocab_size}-token BPE tokenizer on {len(train_inputs)} works")
        train_tokenizer(
            (doc.text for doc in iter_documents(train_inputs, options)),
            out / TOKENIZER_NAME,
            vocab_size,
            num_threads=1,  # sentencepiece's result depends on its thread count; keep the default dataset reproducible
            source=f"{PACKAGE} train works ({len(train_inputs)})",
        )
        ran.append("tokenizer")
    else:
        try:
            existing = json.loads(tokenizer_json.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{tokenizer_json}: invalid JSON ({err}); delete it or pass force=True") from err
        if existing.get("vocab_size") != vocab_size:
            raise ValueError(
                f"{tokenizer_json} has vocab_size {existing.get('vocab_size')}, but {vocab_size} was requested; "
                "pass force=True (--force) or use another output directory"
            )
        log(f"reusing {model_file}")

    shard_files = [p(out / split) for split in SPLITS for p in (bin_path, idx_path)]
    if ran or not all(p.is_file() for p in shard_files):
        log("tokenizing train and valid works")
        items = chain(
            (("train", doc) for doc in iter_documents(train_inputs, options)),
            (("valid", doc) for doc in iter_documents(valid_inputs, options)),
        )
        tokenize_to_shards(items, model_file, {s: out / s for s in SPLITS}, workers=workers, progress=progress)
        ran.append("shards")
    else:
        log(f"reusing {out / 'train'} and {out / 'valid'} shards")

    train_counts = token_counts(IndexedDataset(out / "train").tokens)
    valid_counts = token_counts(IndexedDataset(out / "valid").tokens)
    tokenizer = Tokenizer(model_file)
    meta = {
        "corpus": PACKAGE,
        "valid_works": list(VALID_WORKS),
        "tokenizer": {
            "model": model_file.name,
            "sha256": _sha256(model_file),
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
        },
        "dtype": str(IndexedDataset(out / "train").dtype),
        "train": _shard_meta(out / "train"),
        "valid": _shard_meta(out / "valid"),
        "unigram_entropy_nats": unigram_entropy(train_counts),
        "valid_unigram_cross_entropy_nats": unigram_cross_entropy(train_counts, valid_counts),
    }
    meta_file = out / META_NAME
    tmp = meta_file.with_name(f".{META_NAME}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_file)
    return PrepareResult(meta=meta, ran=ran)
