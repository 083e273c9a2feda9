"""Position-wise feed-forward sublayers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """V_raw = W_down (silu(W_gate H) * W_up H)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def init_weights(self, std: float, out_std: float, gain: float = 1.0) -> None:
        nn.init.normal_(self.gate.weight, std=std * gain)
        nn.init.normal_(self.up.weight, std=std * gain)
        nn.init.normal_(self.down.weight, std=out_std * gain)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(h)) * self.up(h))


class GELUMLP(nn.Module):
    """V_raw = W_down gelu(W_up H)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def init_weights(self, std: float, out_std: float, gain: float = 1.0) -> None:
        nn.init.normal_(self.up.weight, std=std * gain)
        nn.init.normal_(self.down.weight, std=out_std * gain)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(h)))


MLPS = {"swiglu": SwiGLU, "gelu": GELUMLP}
