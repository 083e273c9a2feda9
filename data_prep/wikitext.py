"""WikiText-2 and WikiText-103 (Merity et al. 2016), raw and tokenised releases -> shards.

    mgt-prep wikitext --config wikitext-103-raw-v1 --out data/wt103            # the hub (datasets)
    mgt-prep wikitext --config wikitext-103-raw-v1 --local ~/wikitext-103-raw --out data/wt103

Sources, all giving the same documents:

* the official files on a local path: a directory holding ``wiki.{train,valid,test}.raw``
  (``-raw-v1`` configs) or ``wiki.{train,valid,test}.tokens`` (``-v1``), or its parent
  holding the release folder (``wikitext-103-raw/``, ``wikitext-2/``, ...);
* a ``datasets.DatasetDict`` saved with ``save_to_disk`` (splits train/validation/test,
  column ``text``, one row per line as on the hub);
* the hub: ``datasets.load_dataset("Salesforce/wikitext", CONFIG)`` (``--local`` not given).

Format: a line ``" = Title = "`` (one ``=`` on each side) starts an article; ``" = = Section = = "``
lines are headings inside it; blank lines separate paragraphs. One article is one document:
its lines from the title to the line before the next title, blank lines at its two ends
dropped, blank lines inside it kept (as empty lines), so the shard encodes every character
of the split except the blank lines between articles, which the document's EOS stands for.
Blank lines never become documents.

The tokenizer is trained on the train split only (valid/test are read after it exists).
Word counts follow the WikiText literature (Merity et al.'s Table 1, AWD-LSTM's
``data.py``): every line of the split, blank ones included, counts
``len(line.split()) + 1`` words, the 1 being its end of line. Perplexity per word is
``exp(total NLL of the split / words)`` (``megatron_mgt.evaluate``).

``OUT/meta.json`` records, per split, articles, lines, words, characters and tokens, and the
tokenizer; ``read_split_words(prefix)`` is how the evaluator finds a shard's word count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.shards import tokenize_to_shards
from data_prep.sources import DataSourceError, Document
from data_prep.tokenizer import Tokenizer, train_tokenizer

CONFIGS = ("wikitext-2-raw-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-103-v1")
HUB_NAME = "Salesforce/wikitext"
SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # our shard name -> hub split
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer"
# Words (end of line counted) per split in Merity et al. 2016, Table 1; a full official
# split that counts otherwise is reported (it is the number a published perplexity divides by).
PUBLISHED_WORDS = {
    "wikitext-2": {"train": 2_088_628, "valid": 217_646, "test": 245_569},
    "wikitext-103": {"train": 103_227_021, "valid": 217_646, "test": 245_569},
}


class WikiTextError(DataSourceError):
    """A WikiText source is missing, unreadable or not in the WikiText format; names the file."""


def family(config: str) -> str:
    """'wikitext-103-raw-v1' -> 'wikitext-103'."""
    return config.split("-raw")[0].removesuffix("-v1")


def file_suffix(config: str) -> str:
    return ".raw" if "-raw" in config else ".tokens"


def check_config(config: str) -> None:
    if config not in CONFIGS:
        raise WikiTextError(f"unknown WikiText config {config!r}; expected one of {list(CONFIGS)}")


def is_title(line: str) -> bool:
    """True for an article title ``" = Title = "``, false for ``" = = Section = = "`` and text."""
    s = line.strip()
    return len(s) >= 5 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =") and not s.endswith("= =")


def words_in_line(line: str) -> int:
    """Whitespace-separated tokens of one line plus its end of line (the literature's count)."""
    return len(line.split()) + 1


@dataclass
class SplitCounts:
    """What one pass over a split saw (filled while its articles are read)."""

    lines: int = 0
    words: int = 0
    chars: int = 0
    articles: int = 0

    def as_dict(self) -> dict:
        return {"articles": self.articles, "lines": self.lines, "words": self.words, "chars": self.chars}


def iter_articles(lines: Iterable[str], source: str, counts: SplitCounts | None = None) -> Iterator[Document]:
    """Articles of a WikiText split given as its lines (with or without trailing newlines).

    Text before the first title (none in the official files) becomes a document of its own,
    so nothing is dropped. Raises WikiTextError when the split has no title at all."""
    counts = counts if counts is not None else SplitCounts()
    current: list[str] = []
    start = 0
    seen_title = False

    def flush() -> Iterator[Document]:
        while current and not current[-1].strip():
            current.pop()
        while current and not current[0].strip():
            current.pop(0)
        if current:
            counts.articles += 1
            yield Document("\n".join(current), f"{source}:{start}")

    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\n").rstrip("\r")
        counts.lines += 1
        counts.words += words_in_line(line)
        counts.chars += len(line) + 1
        if is_title(line):
            seen_title = True
            yield from flush()
            current, start = [], number
        current.append(line if line.strip() else "")
    if not seen_title:
        raise WikiTextError(f"{source}: no ' = Title = ' line in {counts.lines} lines; this is not a WikiText split")
    yield from flush()


def _read_lines(path: Path) -> Iterator[str]:
    """Lines of an official split file, with errors that name the file and position."""
    if not path.is_file():
        raise WikiTextError(f"WikiText split file not found: {path}")
    if path.stat().st_size == 0:
        raise WikiTextError(f"{path}: file is empty")
    with open(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            if b"\x00" in raw:
                raise WikiTextError(f"{path}: line {number} contains a NUL byte (binary file?)")
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise WikiTextError(f"{path}: invalid UTF-8 at byte {offset + err.start} (line {number}): {err.reason}") from err
            offset += len(raw)


def find_release_dir(local: str | os.PathLike, config: str) -> Path:
    """The directory holding ``wiki.train<suffix>``: ``local`` itself or its release subfolder."""
    root = Path(local)
    if not root.exists():
        raise WikiTextError(f"--local {root}: no such directory")
    suffix = file_suffix(config)
    release = family(config) + ("-raw" if suffix == ".raw" else "")
    for candidate in (root, root / release):
        if (candidate / f"wiki.train{suffix}").is_file():
            return candidate
    expected = ", ".join(f"wiki.{s}{suffix}" for s in SPLITS)
    raise WikiTextError(f"{root}: no {expected} (nor in {root / release}); config {config} reads the {suffix} files")


@dataclass
class WikiTextSource:
    """Where the lines of each split come from: official files, a saved DatasetDict, or the hub."""

    config: str
    local: str | None = None
    _dataset: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_config(self.config)

    def describe(self) -> str:
        return f"{self.local} ({self.config})" if self.local else f"hf:{HUB_NAME}:{self.config}"

    def lines(self, split: str) -> tuple[Iterator[str], str]:
        """(lines of `split` in ('train', 'valid', 'test'), a name for messages)."""
        if self.local and not self._is_saved_dataset():
            path = find_release_dir(self.local, self.config) / f"wiki.{split}{file_suffix(self.config)}"
            return _read_lines(path), str(path)
        dataset = self._load()
        name = SPLITS[split]
        if name not in dataset:
            raise WikiTextError(f"{self.describe()}: no split {name!r}; available: {list(dataset)}")
        rows = dataset[name]
        if "text" not in rows.column_names:
            raise WikiTextError(f"{self.describe()}[{name}]: no 'text' column; columns: {rows.column_names}")
        return (row["text"] for row in rows), f"{self.describe()}[{name}]"

    def _is_saved_dataset(self) -> bool:
        return any((Path(self.local) / marker).is_file() for marker in ("dataset_dict.json", "state.json"))

    def _load(self):
        if self._dataset is None:
            import datasets

            if self.local:
                self._dataset = datasets.load_from_disk(self.local)
                if not isinstance(self._dataset, datasets.DatasetDict):
                    raise WikiTextError(f"{self.local}: a single Dataset; expected a DatasetDict with splits {list(SPLITS.values())}")
            else:
                try:
                    self._dataset = datasets.load_dataset(HUB_NAME, self.config)
                except Exception as err:
                    raise WikiTextError(
                        f"load_dataset({HUB_NAME!r}, {self.config!r}) failed: {err}. Without the hub, download the official "
                        "release elsewhere and pass --local DIR"
                    ) from err
        return self._dataset


def read_split_words(prefix: str | os.PathLike) -> int | None:
    """The reference word count of the shard at `prefix`, from the meta.json beside it
    (written by `prepare_wikitext`), or None when the shard has none."""
    prefix = Path(prefix)
    meta_file = prefix.parent / META_NAME
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file}: invalid JSON ({err})") from err
    words = meta.get("splits", {}).get(prefix.name, {}).get("words")
    return int(words) if words is not None else None


def prepare_wikitext(
    out_dir: str | os.PathLike,
    config: str = "wikitext-103-raw-v1",
    local: str | os.PathLike | None = None,
    vocab_size: int = 32000,
    tokenizer_max_chars: int | None = None,
    workers: int = 1,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Tokenizer (train split only) + train/valid/test shards + meta.json in `out_dir`."""
    source = WikiTextSource(config, str(local) if local is not None else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {split: SplitCounts() for split in SPLITS}

    def articles(split: str, tally: SplitCounts) -> Iterator[Document]:
        lines, name = source.lines(split)
        return iter_articles(lines, name, tally)

    log(f"training a {vocab_size}-piece BPE tokenizer on the train split of {source.describe()}")
    tok_counts = SplitCounts()
    tok_meta = train_tokenizer(
        (doc.text for doc in articles("train", tok_counts)),
        out / TOKENIZER_NAME,
        vocab_size,
        num_threads=1,
        max_chars=tokenizer_max_chars,
        source=f"{source.describe()} train split only",
    )
    log(f"tokenizing {', '.join(SPLITS)}")
    items = ((split, doc) for split in SPLITS for doc in articles(split, counts[split]))
    stats = tokenize_to_shards(items, out / f"{TOKENIZER_NAME}.model", {s: out / s for s in SPLITS}, workers=workers, progress=progress)
    published = PUBLISHED_WORDS[family(config)]
    splits = {}
    for split, tally in counts.items():
        splits[split] = {
            **tally.as_dict(),
            "documents": stats[split].documents,
            "tokens": stats[split].tokens,
            "published_words": published[split],
        }
        if tally.words != published[split]:
            log(f"note: {split} has {tally.words:,} words, Merity et al. count {published[split]:,} for the full official split")
    tokenizer = Tokenizer(out / f"{TOKENIZER_NAME}.model")
    meta = {
        "dataset": config,
        "source": source.describe(),
        "word_count": "per line of the split: len(line.split()) + 1 (end of line), blank lines included",
        "tokenizer": {
            "model": f"{TOKENIZER_NAME}.model",
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "trained_on": "train",
            "trained_documents": tok_meta.num_documents,
            "trained_chars": tok_meta.num_chars,
        },
        "splits": splits,
    }
    tmp = out / f".{META_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META_NAME)
    return meta
