"""Train and load SentencePiece tokenizers (``<prefix>.model`` + ``<prefix>.json`` metadata).

Training uses identity normalisation, keeps whitespace verbatim (no dummy
prefix, no collapsing of spaces) and makes ``"\\n"`` a single token, so
``decode(encode(text)) == text`` for any text when byte fallback is on.
Special ids: unk 0, bos 1, eos 2, pad 3.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import sentencepiece as spm

ModelType = Literal["bpe", "unigram"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NEWLINE = "\n"


class TokenizerError(ValueError):
    """Tokenizer training or loading failed; the message names the file or setting."""


@dataclass(frozen=True)
class TokenizerMeta:
    """Contents of ``<prefix>.json``."""

    model_file: str
    vocab_size: int
    model_type: str
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    byte_fallback: bool
    user_defined_symbols: list[str]
    source: str
    num_documents: int
    num_chars: int
    sentencepiece_version: str


def _training_sentences(documents: Iterable[str], max_sentence_length: int, max_chars: int | None, counts: dict[str, int]) -> Iterator[str]:
    """Non-empty lines of the documents, cut to fit ``max_sentence_length`` bytes."""
    piece_chars = max(1, max_sentence_length // 4)  # a UTF-8 character takes at most 4 bytes
    for doc in documents:
        if max_chars is not None and counts["chars"] >= max_chars:
            return
        counts["documents"] += 1
        counts["chars"] += len(doc)
        for line in doc.split(NEWLINE):
            if not line.strip():
                continue
            if len(line.encode("utf-8")) <= max_sentence_length:
                yield line
            else:
                yield from (line[i : i + piece_chars] for i in range(0, len(line), piece_chars))


def train_tokenizer(
    documents: Iterable[str],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: ModelType = "bpe",
    byte_fallback: bool = True,
    user_defined_symbols: Sequence[str] = (),
    num_threads: int = 1,
    max_sentence_length: int = 4192,
    max_chars: int | None = None,
    character_coverage: float = 0.9995,
    source: str = "",
) -> TokenizerMeta:
    """Train on ``documents`` (at most about ``max_chars`` characters) and write ``.model`` + ``.json``.

    The learned vocabulary depends on ``num_threads``; fix it for reproducible tokenizers.
    """
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 8:
        raise TokenizerError(f"vocab_size must be at least 8, got {vocab_size}")
    prefix = Path(out_prefix)
    if not prefix.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {prefix.parent}")
    check_writable(prefix.parent)  # before training, not after
    symbols = [NEWLINE] + [s for s in user_defined_symbols if s != NEWLINE]
    counts = {"documents": 0, "chars": 0}
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(documents, max_sentence_length, max_chars, counts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            user_defined_symbols=symbols,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise TokenizerError(
            f"sentencepiece training for {prefix}.model failed (vocab_size={vocab_size}, "
            f"{counts['documents']} documents, {counts['chars']} chars): {err}"
        ) from err
    if counts["documents"] == 0:
        raise TokenizerError(f"no training documents for {prefix}.model")
    model_file = Path(f"{prefix}.model")
    _atomic_write(model_file, model.getvalue())
    meta = TokenizerMeta(
        model_file=model_file.name,
        vocab_size=vocab_size,
        model_type=model_type,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        byte_fallback=byte_fallback,
        user_defined_symbols=symbols,
        source=source,
        num_documents=counts["documents"],
        num_chars=counts["chars"],
        sentencepiece_version=spm.__version__,
    )
    _atomic_write(Path(f"{prefix}.json"), (json.dumps(asdict(meta), indent=2) + "\n").encode())
    return meta


def check_writable(directory: Path) -> None:
    """A file can be created in `directory`, else TokenizerError naming it and why."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".mgt-prep-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise TokenizerError(f"cannot write to the output directory {directory}: {err.strerror}") from err


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Tokenizer:
    """A trained SentencePiece model."""

    def __init__(self, model_file: str | os.PathLike) -> None:
        self.model_file = os.fspath(model_file)
        if not os.path.isfile(self.model_file):
            raise FileNotFoundError(f"tokenizer model not found: {self.model_file}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(self.model_file)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{self.model_file}: not a SentencePiece model: {err}") from err
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"{self.model_file}: model has no EOS token (eos_id=-1)")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)
