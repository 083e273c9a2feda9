"""The fused residual update of the geometric rules (mhc, ddl, mgt): `model.fused_residual`.

With v = F(LN x), gate_pre = c W_gate^T and beta_pre = c W_beta^T + b_beta (c = x or LN x,
`model.mgt.controller_input`), the rest of the update is elementwise:

    out  = x + beta * (v * sigmoid(LN_g(gate_pre)) - alpha * x),   beta = lam * tanh(beta_pre) + eps

(mhc: out = x + v * sigmoid(LN_g(gate_pre)); ddl: no gate, v stays F(LN x)). The eager rule
keeps every intermediate of this tail for backward (the gate norm's statistics, the sigmoid,
the gated value, tanh, beta, V - alpha X); here it is one autograd region that saves only its
inputs x, v, gate_pre, beta_pre (LN_g's affine and alpha are parameters) and recomputes the
tail in backward with the same ops, under the autocast state of the forward. Forward is the
eager rule op for op (bit-equal); gradients are the eager ones up to the order in which
autograd sums the contributions to x (measured: within 1e-6 relative at fp32, tests/test_fused.py).

`model.fused_recompute_projections` takes the region back to c: it saves x, v and c only and
recomputes gate_pre and beta_pre too, two d x d matmuls more in backward (+1/3 of the two
projections' FLOPs) for two d-sized tensors less per sublayer. c is x or LN x, which the norm
and the sublayer's first matmul keep anyway, so the update then saves one tensor (v) more than
pre-LN's X + F(LN X). docs/BENCHMARKS.md has the measured bytes.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class TailSpec(NamedTuple):
    """The constants of the tail: the gate norm's type, shape and eps; the controller's lam and eps."""

    layernorm: bool
    shape: tuple[int, ...]
    norm_eps: float | None
    lam: float
    eps: float


def beta_of(beta_pre: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """beta = lam * tanh(beta_pre) + eps, in fp32 (as `DeltaController.beta`)."""
    return lam * torch.tanh(beta_pre.float()) + eps


def tail(spec: TailSpec, x, v, gate_pre, beta_pre, gate_w, gate_b, alpha) -> torch.Tensor:
    """The eager rule's elementwise ops (`GeometricResidual.update`); gate_pre / beta_pre None: no gate / no controller."""
    if gate_pre is not None:
        if spec.layernorm:
            g = F.layer_norm(gate_pre, spec.shape, gate_w, gate_b, spec.norm_eps)
        else:
            g = F.rms_norm(gate_pre, spec.shape, gate_w, spec.norm_eps)
        v = v.float() * torch.sigmoid(g.float())
    if beta_pre is None:
        return (x.float() + v).to(x.dtype)
    beta = beta_of(beta_pre, spec.lam, spec.eps)
    return (x.float() + beta * (v.float() - alpha.float() * x.float())).to(x.dtype)


def projections_and_tail(spec: TailSpec, x, v, c, w_gate, w_beta, b_beta, gate_w, gate_b, alpha) -> torch.Tensor:
    """gate_pre = c W_gate^T, beta_pre = c W_beta^T + b_beta (the eager rule's nn.Linear ops), then `tail`."""
    gate_pre = F.linear(c, w_gate) if w_gate is not None else None
    beta_pre = F.linear(c, w_beta, b_beta) if w_beta is not None else None
    return tail(spec, x, v, gate_pre, beta_pre, gate_w, gate_b, alpha)


class Recomputed(torch.autograd.Function):
    """fn(spec, *inputs) that saves its inputs only and recomputes fn in backward."""

    @staticmethod
    def forward(ctx, fn, spec: TailSpec, *inputs):
        ctx.fn, ctx.spec = fn, spec
        device = inputs[0].device.type  # meta (the planner) has no autocast
        enabled = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        ctx.autocast = (device, torch.get_autocast_dtype(device) if enabled else None, enabled)
        ctx.save_for_backward(*inputs)
        return fn(spec, *inputs)

    @staticmethod
    def backward(ctx, grad):
        wants = ctx.needs_input_grad[2:]
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype) if enabled else contextlib.nullcontext():
            leaves = [None if t is None else t.detach().requires_grad_(w) for t, w in zip(ctx.saved_tensors, wants, strict=True)]
            out = ctx.fn(ctx.spec, *leaves)
        grads = iter(torch.autograd.grad(out, [t for t, w in zip(leaves, wants, strict=True) if w], grad))
        return (None, None, *(next(grads) if w else None for w in wants))


def _spec(gate_norm: nn.Module | None, lam: float, eps: float) -> tuple[TailSpec, torch.Tensor | None, torch.Tensor | None]:
    layernorm = isinstance(gate_norm, nn.LayerNorm)
    shape = tuple(gate_norm.normalized_shape) if gate_norm is not None else ()
    gate_w = gate_norm.weight if gate_norm is not None else None
    gate_b = gate_norm.bias if layernorm else None
    return TailSpec(layernorm, shape, getattr(gate_norm, "eps", None), lam, eps), gate_w, gate_b


def fused_tail(x, v, gate_pre, beta_pre, gate_norm: nn.Module | None, lam: float, eps: float, alpha) -> torch.Tensor:
    """x + beta (v * sigmoid(LN_g(gate_pre)) - alpha x) as one recomputed region (see the module docstring)."""
    spec, gate_w, gate_b = _spec(gate_norm, lam, eps)
    return Recomputed.apply(tail, spec, x, v, gate_pre, beta_pre, gate_w, gate_b, alpha)


def fused_update(x, v, c, gate_proj: nn.Linear | None, beta_proj: nn.Linear | None, gate_norm: nn.Module | None,
                 lam: float, eps: float, alpha) -> torch.Tensor:
    """The same update with the gate and controller projections of c inside the recomputed region."""
    spec, gate_w, gate_b = _spec(gate_norm, lam, eps)
    w_gate = gate_proj.weight if gate_proj is not None else None
    w_beta, b_beta = (beta_proj.weight, beta_proj.bias) if beta_proj is not None else (None, None)
    return Recomputed.apply(projections_and_tail, spec, x, v, c, w_gate, w_beta, b_beta, gate_w, gate_b, alpha)
