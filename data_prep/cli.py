"""``mgt-prep``: command line for corpus download, tokenizer training, sharding and inspection."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from data_prep.corpora import CorpusError, export_corpus, fetch_shakespeare
from data_prep.inspect_shards import format_summary, inspect_shard
from data_prep.pipeline import DEFAULT_VOCAB_SIZE, prepare_default, tokenize_inputs, train_tokenizer_on_inputs
from data_prep.shards import ShardError
from data_prep.sources import DEFAULT_MAX_LINE_CHARS, DataSourceError, SourceOptions
from data_prep.tokenizer import TokenizerError
from data_prep.wikitext import CONFIGS as WIKITEXT_CONFIGS
from data_prep.wikitext import prepare_wikitext
from megatron_mgt.data.indexed import IndexedDatasetError, merge_datasets

_EXPECTED_ERRORS = (
    CorpusError,
    DataSourceError,
    TokenizerError,
    ShardError,
    IndexedDatasetError,
    ValueError,
    OSError,  # FileNotFoundError, an --out that is a file, a read-only or full disk: the message names the path
)


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-key", default="text", help="JSONL key / parquet or dataset column with the text (default %(default)s)")
    parser.add_argument(
        "--split-mode",
        choices=("file", "paragraph"),
        default="file",
        help="text files: one document per file, or per blank-line separated paragraph (default %(default)s)",
    )
    parser.add_argument(
        "--max-line-chars", type=int, default=DEFAULT_MAX_LINE_CHARS, help="skip docs with longer lines (default %(default)s)"
    )
    parser.add_argument("--hf-split", default="train", help="split to use from a saved DatasetDict directory (default %(default)s)")
    parser.add_argument("--strict", action="store_true", help="fail on bad documents instead of skipping them")


def _source_options(args: argparse.Namespace) -> SourceOptions:
    return SourceOptions(
        text_key=args.text_key,
        split=args.split_mode,
        max_line_chars=args.max_line_chars,
        strict=args.strict,
        hf_split=args.hf_split,
    )


def _cmd_corpus(args: argparse.Namespace) -> None:
    corpus = fetch_shakespeare(args.cache_dir)
    files = export_corpus(corpus, args.out) if args.out else {"train": corpus.train_files, "valid": corpus.valid_files}
    for split, paths in files.items():
        for path in paths:
            print(f"{split}\t{path}")


def _cmd_train_tokenizer(args: argparse.Namespace) -> None:
    meta, report = train_tokenizer_on_inputs(
        args.inputs,
        args.out,
        args.vocab_size,
        _source_options(args),
        model_type=args.model_type,
        byte_fallback=not args.no_byte_fallback,
        user_defined_symbols=args.user_symbols,
        num_threads=args.threads,
        max_chars=args.max_chars,
    )
    print(f"wrote {args.out}.model and {args.out}.json: vocab {meta.vocab_size}, {meta.num_documents} documents, {meta.num_chars:,} chars")
    print(report.format())


def _cmd_tokenize(args: argparse.Namespace) -> None:
    stats, report = tokenize_inputs(
        args.inputs,
        args.tokenizer,
        args.out,
        valid_inputs=args.valid_inputs,
        valid_fraction=args.valid_fraction,
        workers=args.workers,
        options=_source_options(args),
        progress=not args.quiet,
    )
    for split, s in stats.items():
        print(f"{split}: {s.prefix}.bin/.idx  {s.documents:,} documents, {s.tokens:,} tokens, {s.tokens_per_second:,.0f} tokens/s")
    print(report.format())


def _cmd_merge(args: argparse.Namespace) -> None:
    merged = merge_datasets(args.inputs, args.out)
    print(f"wrote {args.out}.bin/.idx: {merged.num_documents:,} documents, {merged.num_tokens:,} tokens")


def _cmd_inspect(args: argparse.Namespace) -> None:
    print(format_summary(inspect_shard(args.prefix, args.tokenizer, args.sample), args.sample_chars))


def _log(message: str) -> None:
    print(f"[mgt-prep] {message}", flush=True)


def _cmd_prepare_default(args: argparse.Namespace) -> None:
    result = prepare_default(
        args.out,
        vocab_size=args.vocab_size,
        workers=args.workers,
        cache_dir=args.cache_dir,
        force=args.force,
        progress=not args.quiet,
        log=_log,
    )
    print(json.dumps(result.meta, indent=2))


def _cmd_wikitext(args: argparse.Namespace) -> None:
    meta = prepare_wikitext(
        args.out,
        config=args.config,
        local=args.local,
        vocab_size=args.vocab_size,
        tokenizer_max_chars=args.tokenizer_max_chars,
        workers=args.workers,
        progress=not args.quiet,
        log=_log,
    )
    for split, s in meta["splits"].items():
        print(f"{split}: {args.out}/{split}.bin/.idx  {s['articles']:,} articles, {s['tokens']:,} tokens, {s['words']:,} words")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgt-prep", description="Prepare token shards for megatron_mgt.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="fetch the default Shakespeare corpus and print its file paths")
    p.add_argument("--out", help="also copy the works to OUT/train and OUT/valid")
    p.add_argument("--cache-dir", help="download cache (default $MGT_CACHE or ~/.cache/megatron_mgt)")
    p.set_defaults(func=_cmd_corpus)

    p = sub.add_parser("train-tokenizer", help="train a SentencePiece tokenizer")
    p.add_argument("inputs", nargs="+", help="files, globs, .jsonl, .parquet, saved dataset dirs, hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.json")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="tokenizer vocabulary size (default %(default)s)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece algorithm (default %(default)s)")
    p.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to <unk> instead of bytes")
    p.add_argument("--user-symbols", nargs="*", default=[], help="extra special tokens")
    p.add_argument("--threads", type=int, default=1, help="SentencePiece training threads (default %(default)s)")
    p.add_argument("--max-chars", type=int, help="train on roughly the first N characters only")
    _add_source_options(p)
    p.set_defaults(func=_cmd_train_tokenizer)

    p = sub.add_parser("tokenize", help="tokenize inputs into OUT/train.bin/.idx (and OUT/valid.bin/.idx)")
    p.add_argument("inputs", nargs="+", help="files, globs, .jsonl, .parquet, saved dataset dirs, hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--valid-inputs", nargs="+", default=[], help="separate validation inputs")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="hold out this fraction of input documents (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_source_options(p)
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("merge", help="concatenate shards")
    p.add_argument("inputs", nargs="+", help="input prefixes (without .bin/.idx)")
    p.add_argument("--out", required=True, help="output prefix")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("inspect", help="print shard statistics and a decoded sample")
    p.add_argument("prefix", help="shard prefix (without .bin/.idx)")
    p.add_argument("--tokenizer", help="SentencePiece .model used to decode the sample")
    p.add_argument("--sample", type=int, default=0, help="index of the document to decode (default %(default)s)")
    p.add_argument("--sample-chars", type=int, default=1000, help="print at most this many decoded characters (default %(default)s)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("prepare-default", help="corpus + tokenizer + train/valid shards + meta.json in OUT")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="tokenizer vocabulary size (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes (default %(default)s)")
    p.add_argument("--cache-dir", help="download cache (default $MGT_CACHE or ~/.cache/megatron_mgt)")
    p.add_argument("--force", action="store_true", help="redo every step even if its outputs exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare_default)

    p = sub.add_parser("wikitext", help="WikiText-2/103 (hub or official files): tokenizer on train only, train/valid/test shards, word counts")
    p.add_argument("--config", choices=WIKITEXT_CONFIGS, default="wikitext-103-raw-v1", help="release (default %(default)s)")
    p.add_argument("--local", help="official files (wiki.*.raw / wiki.*.tokens) or a save_to_disk DatasetDict; default: the hub")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokenizer vocabulary size (default %(default)s)")
    p.add_argument("--tokenizer-max-chars", type=int, help="train the tokenizer on about the first N characters of train only")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_wikitext)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mgt-prep``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except _EXPECTED_ERRORS as err:
        print(f"mgt-prep {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
