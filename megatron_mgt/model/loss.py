"""The language-model loss: mean next-token cross-entropy in nats,

    L = (1/N) sum_i [ logsumexp_v(z_iv) - z_{i, y_i} ],   dL/dz_iv = (softmax(z_i)_v - [v = y_i]) / N

over the N targets that are not IGNORE_INDEX, computed in fp32 whatever the logits' dtype.

One autograd Function (`CrossEntropy`) instead of `F.cross_entropy`: the forward runs
log_softmax over row chunks of CHUNK_BYTES of fp32 (CUDA_CHUNK_BYTES on a GPU), keeps each
chunk's target entries only, and saves just the logits (which the head produced anyway); the
backward runs softmax per chunk straight into one gradient tensor, minus onehot, times 1/N.
`F.cross_entropy` keeps the [N, V] log-softmax for backward and allocates two more [N, V]
tensors there (nll_loss's zero-filled gradient and log_softmax's), each a fresh page-faulted
mapping at LM-head sizes (65 MB at 2048 tokens x vocab 8000), and makes two passes more over
them. Same value and gradient up to fp32 round-off (tests/test_loss.py); measured 1.7x faster
than F.cross_entropy at [2048, 8000] fp32 on 2 CPU threads (docs/BENCHMARKS.md, "The chunked loss").
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a target that is not scored (as F.cross_entropy's default)
CHUNK_BYTES = 4 << 20  # fp32 bytes of one row chunk on CPU: cache- and heap-sized, never its own mapping
CUDA_CHUNK_BYTES = 256 << 20  # on a GPU: few enough chunks that kernel launches stay negligible


def _row_chunks(rows: int, vocab: int, device: torch.device) -> list[slice]:
    """Row ranges of about CHUNK_BYTES of fp32 (CUDA_CHUNK_BYTES on CUDA and on the planner's meta device)."""
    step = max(1, (CHUNK_BYTES if device.type == "cpu" else CUDA_CHUNK_BYTES) // (4 * max(vocab, 1)))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class CrossEntropy(torch.autograd.Function):
    """sum over scored rows of -log_softmax(z_i)_{y_i}, divided by their count (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits.shape
        if targets.shape != (rows,):
            raise ValueError(f"lm_loss: targets hold {tuple(targets.shape)} entries for {rows} rows of logits (one target per row)")
        scored = targets != IGNORE_INDEX
        safe_targets = torch.where(scored, targets, 0)
        picked = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for rows_ in _row_chunks(rows, vocab, logits.device):
            log_probs = torch.log_softmax(logits[rows_].float(), dim=-1)
            picked[rows_] = log_probs.gather(1, safe_targets[rows_, None]).squeeze(1)
        count = scored.sum()
        ctx.save_for_backward(logits, safe_targets, scored, count)
        return -torch.where(scored, picked, 0.0).sum() / count  # 0/0 = nan with no scored target, as F.cross_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe_targets, scored, count = ctx.saved_tensors
        rows, vocab = logits.shape
        scale = (grad_loss.float() / count.clamp_min(1)) * scored.float()  # [rows]: 0 on ignored rows (all ignored: 0, as F.cross_entropy)
        grad = torch.empty_like(logits)
        in_place = logits.dtype == torch.float32  # softmax written straight into the gradient, no copy pass
        for rows_ in _row_chunks(rows, vocab, logits.device):
            probs = torch.softmax(logits[rows_], dim=-1, out=grad[rows_]) if in_place else torch.softmax(logits[rows_].float(), dim=-1)
            probs[torch.arange(probs.shape[0], device=probs.device), safe_targets[rows_]] -= 1.0
            probs.mul_(scale[rows_, None])
            if not in_place:
                grad[rows_] = probs
        return grad, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of logits [..., V] against targets [...] (one per
    row of logits), in fp32; targets equal to IGNORE_INDEX are not scored."""
    if targets.numel() != logits.numel() // max(logits.size(-1), 1):
        raise ValueError(f"lm_loss: targets of shape {tuple(targets.shape)} do not match logits of shape {tuple(logits.shape)} (one target per row)")
    return CrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
