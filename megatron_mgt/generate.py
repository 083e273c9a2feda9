"""Sample text from a trained run.

    mgt-generate RUN "prompt" [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                 [--seed S] [--checkpoint CKPT] [--no-cache]

The prompt is encoded with the run's sentencepiece tokenizer (data.tokenizer) after an EOS:
the shards end every document with EOS, so EOS is the context a document starts from.
Each step draws the next token from softmax(logits / T), restricted to the K most likely
tokens (top-k, 0: all) and then to the smallest set whose probability reaches P (top-p,
nucleus); T = 0 is greedy (argmax). A fixed seed gives the same text. Generation stops at
EOS, after N tokens, or at model.max_seq_len positions. Keys and values of the positions
already seen are cached per layer (`--no-cache` recomputes the whole context every step: the
same tokens, slower).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megatron_mgt.config import ConfigError
from megatron_mgt.engine.dist import resolve_device
from megatron_mgt.export import run_state
from megatron_mgt.model import Transformer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] with every token outside the top-k and outside the top-p nucleus set
    to -inf. The nucleus is the smallest set of most likely tokens whose probability sum
    reaches top_p (the most likely token always stays)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token id [B] from logits [B, V]: argmax when temperature is 0, else a draw from
    softmax(filter_logits(logits / temperature))."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    context: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """The tokens sampled after `context` (EOS not included), at most `max_new_tokens` and at
    most model.max_seq_len positions in all."""
    if not context:
        raise ValueError("generate: the context must hold at least one token")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    budget = min(max_new_tokens, model.cfg.max_seq_len - len(context))
    model.eval()
    cache = model.new_cache() if use_cache else None
    ids = torch.tensor([context], device=device)
    logits = model(ids, cache=cache)[:, -1]
    out: list[int] = []
    while len(out) < budget:
        token = next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None and token.item() == eos_id:
            break
        out.append(token.item())
        if len(out) == budget:
            break
        if use_cache:
            logits = model(token[:, None], cache=cache)[:, -1]
        else:
            ids = torch.cat((ids, token[:, None]), dim=1)
            logits = model(ids)[:, -1]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgt-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("prompt", nargs="?", default="")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint dir (default: RUN's latest)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="sentencepiece .model (default: data.tokenizer of RUN)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")
    args = parser.parse_args(argv)
    try:
        if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 0:
            raise ValueError("--temperature and --top-k must be >= 0, --top-p in (0, 1], --max-new-tokens >= 0")
        from data_prep.tokenizer import Tokenizer

        cfg, checkpoint, state = run_state(args.run_dir, args.checkpoint)
        tokenizer_file = args.tokenizer or (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
        if tokenizer_file is None:
            raise ValueError(f"{args.run_dir}/config.yaml: data.tokenizer is empty; pass --tokenizer TOK.model")
        tokenizer = Tokenizer(tokenizer_file)
        context = [tokenizer.eos_id, *tokenizer.encode(args.prompt)]
        if len(context) >= cfg.model.max_seq_len:
            raise ValueError(
                f"the prompt is {len(context) - 1} tokens; model.max_seq_len={cfg.model.max_seq_len} leaves no room to generate"
            )
        model = Transformer(cfg.model)
        model.load_state_dict(state)
        model.to(resolve_device(cfg.train.device))
        new = generate(
            model, context, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tokenizer.eos_id, not args.no_cache
        )
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"mgt-generate: error: {err}", file=sys.stderr)
        return 2
    print(args.prompt + tokenizer.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
