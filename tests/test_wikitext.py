"""WikiText recipe: article splitting, word counts, no valid/test leakage into the tokenizer,
hub-layout (save_to_disk) and official-file sources agree, and per-word perplexity.

The hub is unreachable here, so the tests write small splits in the official layout
(`wikitext-2-raw/wiki.{train,valid,test}.raw`) themselves."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from data_prep.cli import main as prep_main
from data_prep.tokenizer import Tokenizer
from data_prep.wikitext import SplitCounts, WikiTextError, is_title, iter_articles, prepare_wikitext, read_split_words, words_in_line
from megatron_mgt.config import load_config
from megatron_mgt.data.indexed import IndexedDataset
from megatron_mgt.data.loader import scoring_windows
from megatron_mgt.evaluate import split_perplexity
from megatron_mgt.model import Transformer

WORDS = "the of and in to a was is for on as by with he that at from his it an were are which this be or".split() + [
    "river", "city", "album", "song", "army", "battle", "season", "game", "church", "station", "@-@", "@,@", ",", ".", "1998", "2004",
]  # fmt: skip
LEAK = "Zqxjvw"  # appears only in valid: a tokenizer trained on it would learn the piece


def article_lines(rng: random.Random, title: str, extra: str = "") -> list[str]:
    """One article in WikiText's layout: title, blank, paragraphs and sections between blanks."""
    lines = [f" = {title} = ", " "]
    for section in range(rng.randint(1, 3)):
        if section:
            lines += [f" = = Section {section} = = ", " "]
        for _ in range(rng.randint(1, 3)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(8, 30))]
            lines += [" " + " ".join(words) + (f" {extra}" if extra else "") + " ", " "]
    return lines


def write_release(root, n_articles=(40, 6, 6), seed=0):
    """wikitext-2-raw/wiki.{train,valid,test}.raw under root; valid lines carry LEAK."""
    rng = random.Random(seed)
    release = root / "wikitext-2-raw"
    release.mkdir(parents=True)
    splits = {}
    for split, n in zip(("train", "valid", "test"), n_articles, strict=True):
        lines = [" "]
        for i in range(n):
            lines += article_lines(rng, f"{split.title()} Article {i}", extra=LEAK if split == "valid" else "")
        (release / f"wiki.{split}.raw").write_text("\n".join(lines) + "\n", encoding="utf-8")
        splits[split] = lines
    return release, splits


def test_titles_and_sections():
    assert is_title(" = Valkyria Chronicles III = ")
    assert is_title(" = E = mc2 = ")
    assert not is_title(" = = Gameplay = = ")
    assert not is_title(" = = = Reception = = = ")
    assert not is_title(" The = sign is used . ")
    assert not is_title(" ")


def test_articles_split_at_titles_only(tmp_path):
    _, splits = write_release(tmp_path)
    counts = SplitCounts()
    docs = list(iter_articles(splits["train"], "train", counts))
    assert len(docs) == 40 == counts.articles
    for i, doc in enumerate(docs):
        lines = doc.text.split("\n")
        assert lines[0] == f" = Train Article {i} = "  # a document starts at its title
        assert sum(is_title(line) for line in lines) == 1  # sections do not split it
        assert lines[-1].strip() and lines[1] == ""  # no blank ends; inner blank lines kept, emptied
    assert counts.lines == len(splits["train"])


def test_word_count_by_hand():
    lines = [" ", " = A = ", " ", " x y z ", " "]
    # blank: 0 + 1; title: 3 + 1; blank: 1; text: 3 + 1; blank: 1
    assert sum(words_in_line(line) for line in lines) == 11
    counts = SplitCounts()
    (doc,) = iter_articles([line + "\n" for line in lines], "hand", counts)
    assert counts.words == 11 and doc.text == " = A = \n\n x y z "


def test_not_wikitext_is_a_clear_error(tmp_path):
    with pytest.raises(WikiTextError, match="no ' = Title = ' line"):
        list(iter_articles(["just text", "more text"], "f.raw"))
    with pytest.raises(WikiTextError, match="no such directory"):
        prepare_wikitext(tmp_path / "out", "wikitext-2-raw-v1", local=tmp_path / "missing")
    (tmp_path / "empty_release").mkdir()
    with pytest.raises(WikiTextError, match=r"wiki\.train\.raw"):
        prepare_wikitext(tmp_path / "out", "wikitext-2-raw-v1", local=tmp_path / "empty_release")


def test_bad_bytes_name_the_file(tmp_path):
    release, _ = write_release(tmp_path)
    valid = release / "wiki.valid.raw"
    valid.write_bytes(valid.read_bytes()[:50] + b"\xff\xfe" + valid.read_bytes()[50:])
    with pytest.raises(WikiTextError, match=r"wiki\.valid\.raw: invalid UTF-8 at byte 50"):
        prepare_wikitext(tmp_path / "out", "wikitext-2-raw-v1", local=tmp_path, vocab_size=300)
    (release / "wiki.test.raw").write_bytes(b"")
    valid.write_text(" = T = \n x \n")
    with pytest.raises(WikiTextError, match=r"wiki\.test\.raw: file is empty"):
        prepare_wikitext(tmp_path / "out", "wikitext-2-raw-v1", local=release, vocab_size=300)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("wt")
    release, splits = write_release(root)
    out = root / "shards"
    meta = prepare_wikitext(out, "wikitext-2-raw-v1", local=root, vocab_size=400)
    return out, meta, splits


def test_recipe_writes_shards_and_counts(prepared):
    out, meta, splits = prepared
    for split, lines in splits.items():
        entry = meta["splits"][split]
        assert entry["words"] == sum(words_in_line(line) for line in lines)
        assert entry["lines"] == len(lines)
        shard = IndexedDataset(out / split)
        assert shard.num_documents == entry["articles"] == entry["documents"]
        assert shard.num_tokens == entry["tokens"]
        assert read_split_words(out / split) == entry["words"]
    assert json.loads((out / "meta.json").read_text()) == meta
    tok = Tokenizer(out / "tokenizer.model")
    first = IndexedDataset(out / "valid")[0]
    assert first[-1] == tok.eos_id and tok.decode(first[:-1]).startswith(" = Valid Article 0 = \n\n ")


def test_tokenizer_never_sees_valid_or_test(prepared):
    out, meta, splits = prepared
    tok = Tokenizer(out / "tokenizer.model")
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert not [p for p in pieces if "qxj" in p or "xjv" in p]  # LEAK fills valid, 1 in ~25 words
    train_chars = sum(len(doc.text) for doc in iter_articles(splits["train"], "train"))
    assert meta["tokenizer"]["trained_chars"] == train_chars and meta["tokenizer"]["trained_on"] == "train"
    # the control: the same recipe with the leaking word in train learns it
    valid_docs = [doc.text for doc in iter_articles(splits["valid"], "valid")]
    from data_prep.tokenizer import train_tokenizer

    train_tokenizer(valid_docs, out / "control", 400)
    control = Tokenizer(out / "control.model")
    assert [p for p in (control.id_to_piece(i) for i in range(control.vocab_size)) if "qxj" in p or "xjv" in p]


def test_saved_dataset_gives_the_same_shards(prepared, tmp_path):
    """The hub layout (one row per line, blank lines as ''), read with load_from_disk."""
    import datasets

    out, meta, splits = prepared
    rows = {
        name: [line + "\n" if line.strip() else "" for line in splits[ours]]
        for ours, name in (("train", "train"), ("valid", "validation"), ("test", "test"))
    }
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": r}) for name, r in rows.items()}).save_to_disk(str(tmp_path / "hub"))
    meta_hub = prepare_wikitext(tmp_path / "from_hub", "wikitext-2-raw-v1", local=tmp_path / "hub", vocab_size=400)
    for split in ("train", "valid", "test"):
        assert np.array_equal(IndexedDataset(tmp_path / "from_hub" / split).tokens, IndexedDataset(out / split).tokens)
        assert meta_hub["splits"][split]["words"] == meta["splits"][split]["words"]


def test_cli(tmp_path, capsys):
    write_release(tmp_path, n_articles=(12, 3, 3))
    assert (
        prep_main(
            [
                "wikitext",
                "--config",
                "wikitext-2-raw-v1",
                "--local",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--vocab-size",
                "300",
                "--quiet",
            ]
        )
        == 0
    )
    assert "valid:" in capsys.readouterr().out
    assert prep_main(["wikitext", "--config", "wikitext-2-raw-v1", "--local", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.parametrize("stride", [0, 5, 16])
def test_scoring_windows_score_every_token_once(prepared, stride):
    out, _, _ = prepared
    tokens = IndexedDataset(out / "test").tokens
    scored = []
    for x, y in scoring_windows(out / "test", 16, 3, stride):
        assert x.shape == y.shape and x.shape[1] == 16
        for row_x, row_y in zip(x, y, strict=True):
            keep = row_y != -100
            assert torch.equal(row_x[1:][keep[:-1]], row_y[:-1][keep[:-1]])  # targets are the next inputs
            scored.append(row_y[keep])
    assert torch.equal(torch.cat(scored), torch.from_numpy(np.asarray(tokens, dtype=np.int64)))


def test_word_perplexity_of_a_uniform_model(prepared):
    """Zero head weights give uniform logits: NLL = log V per token, so the per-word
    perplexity is V ** (tokens / words), known by hand."""
    out, meta, _ = prepared
    cfg = load_config(
        None,
        [
            "model.vocab_size=400",
            "model.d_model=32",
            "model.n_heads=2",
            "model.n_layers=2",
            "model.tie_embeddings=false",
            "data.seq_len=32",
            "model.max_seq_len=32",
            "train.micro_batch_size=4",
        ],
    )
    model = Transformer(cfg.model).eval()
    torch.nn.init.zeros_(model.head.weight)
    result = split_perplexity(model, str(out / "valid"), cfg, torch.device("cpu"))
    tokens, words = meta["splits"]["valid"]["tokens"], meta["splits"]["valid"]["words"]
    assert result["tokens"] == tokens and result["words"] == words
    assert result["loss"] == pytest.approx(math.log(400), rel=1e-6)
    assert result["word_ppl"] == pytest.approx(400 ** (tokens / words), rel=1e-5)
    assert result["ppl"] == pytest.approx(400, rel=1e-5)
