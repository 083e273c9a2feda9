"""The megatron_mgt model family for Hugging Face transformers (remote code).

Copied into an exported directory by megatron_mgt's `mgt-export` (template:
megatron_mgt/hf_modeling/modeling_mgt.py) and loaded with `trust_remote_code=True`. It is
self-contained (torch and transformers only) and re-implements the forward of every
residual rule from the config, with the project's parameter names, so the weights are the
project's state dict as it is. Per sublayer F (attention, then the MLP), N = config.norm
(LayerNorm or RMSNorm), C = X or N(X) (config.mgt["controller_input"]):

    preln        X + F(N X)
    postln       N(X + F(X))
    deepnorm     N(a X + F(X)),  a = (2L)^(1/4)
    mhc          X + V_mHC,  V_mHC = F(N X) * sigmoid(N(C W_gate))
    ddl          X + beta (F(N X) - alpha X),  beta = lam tanh(C W_beta + b_beta) + eps
    mgt          X + beta (V_mHC - alpha X)
    ddl_rank1    x + beta k (v - k.x),  k = f / sqrt(|f|^2 + k_eps^2), f = F(N x),
                 beta = 2 sigmoid(w . N x + b), v = w_v . C + b_v
    mhc_nstream  x <- H_res x + H_post^T F(N(H_pre x)) on n streams [B, T, n*d]; the
                 embedding is replicated into the streams, their mean is the final norm's input

F: causal multi-head attention with RoPE (channel halves rotated, angle t theta^(-2i/D)) or
the MLP (SwiGLU: W_down (silu(W_gate h) * W_up h); GELU: W_down gelu(W_up h)); no biases.
No key/value cache (every generation step reads the whole sequence); no padding (an
attention_mask with zeros is refused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

MGT_DEFAULTS = {
    "lam": 1.0,
    "eps": 0.0,
    "beta_init": 0.1,
    "alpha_init": 0.1,
    "alpha_mode": "scalar",
    "beta_granularity": "channel",
    "controller_input": "x",
}
RANK1_DEFAULTS = {"beta_init": 0.1, "value_input": "x", "k_eps": 1e-5}
NSTREAM_DEFAULTS = {"gate_init": 0.01, "res_diag_init": 0.95, "sinkhorn_iters": 20}
RESIDUALS = ("preln", "postln", "deepnorm", "mhc", "ddl", "mgt", "ddl_rank1", "mhc_nstream")


class MGTConfig(PretrainedConfig):
    """The project's model config (megatron_mgt.config.ModelConfig), d_ff resolved."""

    model_type = "mgt"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(
        self,
        vocab_size: int = 8000,
        d_model: int = 256,
        n_layers: int = 12,
        n_heads: int = 4,
        d_ff: int = 704,
        mlp: str = "swiglu",
        max_seq_len: int = 256,
        rope_theta: float = 10000.0,
        tie_embeddings: bool = True,
        final_norm: bool = True,
        residual: str = "mgt",
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        mgt: dict | None = None,
        ddl_rank1: dict | None = None,
        mhc_streams: int = 4,
        mhc_nstream: dict | None = None,
        **kwargs,
    ):
        if residual not in RESIDUALS:
            raise ValueError(f"config.json: residual={residual!r} is not one of {list(RESIDUALS)}")
        self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.d_ff = vocab_size, d_model, n_layers, n_heads, d_ff
        self.mlp, self.max_seq_len, self.rope_theta, self.tie_embeddings = mlp, max_seq_len, rope_theta, tie_embeddings
        self.final_norm, self.residual, self.norm, self.norm_eps = final_norm, residual, norm, norm_eps
        self.mgt = {**MGT_DEFAULTS, **(mgt or {})}
        self.ddl_rank1 = {**RANK1_DEFAULTS, **(ddl_rank1 or {})}
        self.mhc_streams = mhc_streams
        self.mhc_nstream = {**NSTREAM_DEFAULTS, **(mhc_nstream or {})}
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(tie_word_embeddings=tie_embeddings, **kwargs)


def make_norm(config: MGTConfig, dim: int) -> nn.Module:
    """LayerNorm (x - mean) / sqrt(var + eps) * w + b, or RMSNorm x / sqrt(mean x^2 + eps) * w."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


def apply_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate the channel halves (x1, x2) of x [B, T, H, D] by t theta^(-2i/D):
    (x1 cos - x2 sin, x1 sin + x2 cos), in fp32."""
    t, d = x.shape[1], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float32, device=x.device), inv_freq)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    """W_o softmax(RoPE(W_q h) RoPE(W_k h)^T / sqrt(D) + causal) W_v h, per head."""

    def __init__(self, config: MGTConfig):
        super().__init__()
        d = config.d_model
        self.n_heads, self.head_dim, self.theta = config.n_heads, d // config.n_heads, config.rope_theta
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, self.head_dim).unbind(dim=2)
        q, k = apply_rope(q, self.theta), apply_rope(k, self.theta)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, config: MGTConfig):
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, h):
        return self.down(F.silu(self.gate(h)) * self.up(h))


class GELUMLP(nn.Module):
    def __init__(self, config: MGTConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, h):
        return self.down(F.gelu(self.up(h)))


class PreLN(nn.Module):
    """X + F(N X)."""

    def __init__(self, config: MGTConfig):
        super().__init__()
        self.norm = make_norm(config, config.d_model)

    def forward(self, x, sublayer):
        return x + sublayer(self.norm(x))


class PostLN(nn.Module):
    """N(a X + F(X)); a = 1 (postln) or (2L)^(1/4) (deepnorm)."""

    def __init__(self, config: MGTConfig):
        super().__init__()
        self.norm = make_norm(config, config.d_model)
        self.alpha = (2 * config.n_layers) ** 0.25 if config.residual == "deepnorm" else 1.0

    def forward(self, x, sublayer):
        return self.norm(self.alpha * x + sublayer(x))


class DirectionGate(nn.Module):
    """V_mHC = V_raw * sigmoid(N(C W_gate))."""

    def __init__(self, config: MGTConfig):
        super().__init__()
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.norm = make_norm(config, config.d_model)

    def forward(self, v_raw, c):
        return v_raw * torch.sigmoid(self.norm(self.proj(c)))


class DeltaController(nn.Module):
    """beta = lam tanh(C W_beta + b_beta) + eps; alpha a buffer (fixed) or a parameter."""

    def __init__(self, config: MGTConfig):
        super().__init__()
        knobs, d = config.mgt, config.d_model
        self.lam, self.eps = knobs["lam"], knobs["eps"]
        self.proj = nn.Linear(d, d if knobs["beta_granularity"] == "channel" else 1, bias=True)
        alpha = torch.full((d if knobs["alpha_mode"] == "channel" else 1,), float(knobs["alpha_init"]))
        if knobs["alpha_mode"] == "fixed":
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = nn.Parameter(alpha)

    def beta(self, c):
        return self.lam * torch.tanh(self.proj(c)) + self.eps


class GeometricResidual(nn.Module):
    """mhc X + V_mHC; ddl X + beta (V_raw - alpha X); mgt X + beta (V_mHC - alpha X)."""

    def __init__(self, config: MGTConfig):
        super().__init__()
        self.norm = make_norm(config, config.d_model)
        self.read_normed = config.mgt["controller_input"] == "ln"
        self.gate = DirectionGate(config) if config.residual in ("mhc", "mgt") else None
        self.delta = DeltaController(config) if config.residual in ("ddl", "mgt") else None

    def forward(self, x, sublayer):
        h = self.norm(x)
        v = sublayer(h)
        c = h if self.read_normed else x
        if self.gate is not None:
            v = self.gate(v, c)
        if self.delta is None:
            return x + v
        return x + self.delta.beta(c) * (v - self.delta.alpha * x)


class Rank1Delta(nn.Module):
    """x + beta k (v - k.x) per token, in fp32; k = f / sqrt(|f|^2 + k_eps^2), f = F(N x)."""

    def __init__(self, config: MGTConfig):
        super().__init__()
        self.norm = make_norm(config, config.d_model)
        self.k_eps, self.value_reads_x = config.ddl_rank1["k_eps"], config.ddl_rank1["value_input"] == "x"
        self.gate = nn.Linear(config.d_model, 1)
        self.value = nn.Linear(config.d_model, 1)

    def forward(self, x, sublayer):
        h = self.norm(x)
        f = sublayer(h).float()
        k = f * torch.rsqrt(f.pow(2).sum(-1, keepdim=True) + self.k_eps**2)
        beta = 2 * torch.sigmoid(F.linear(h.float(), self.gate.weight.float(), self.gate.bias.float()))
        v = self.value(x if self.value_reads_x else h).float()
        kx = (k * x.float()).sum(-1, keepdim=True)
        return x + (beta * (v - kx) * k).to(x.dtype)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """exp(logits - max) [..., n, n] in fp32, then `iters` rounds of (columns, then rows) / their sums."""
    m = logits.float()
    m = torch.exp(m - m.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


class NStreamMHC(nn.Module):
    """x'' = H_res x + H_post^T F(N(H_pre x)) with, for x' = RMSNorm(vec x) (no affine, fp32),
    H_pre = sigmoid(a_pre x' phi_pre + b_pre), H_post = 2 sigmoid(a_post x' phi_post + b_post),
    H_res = Sinkhorn(exp(a_res mat(x' phi_res) + b_res))."""

    def __init__(self, config: MGTConfig):
        super().__init__()
        n, d = config.mhc_streams, config.d_model
        self.n, self.d, self.iters, self.rms_eps = n, d, config.mhc_nstream["sinkhorn_iters"], config.norm_eps
        self.norm = make_norm(config, d)
        self.phi = nn.Linear(n * d, 2 * n + n * n, bias=False)
        self.a_pre, self.a_post, self.a_res = (nn.Parameter(torch.zeros(())) for _ in range(3))
        self.b_pre, self.b_post, self.b_res = nn.Parameter(torch.zeros(n)), nn.Parameter(torch.zeros(n)), nn.Parameter(torch.zeros(n * n))

    def forward(self, x, sublayer):
        n = self.n
        xs = x.unflatten(-1, (n, self.d))
        xn = F.rms_norm(x.float(), (n * self.d,), eps=self.rms_eps)
        p_pre, p_post, p_res = F.linear(xn, self.phi.weight.float()).split([n, n, n * n], dim=-1)
        h_pre = torch.sigmoid(self.a_pre * p_pre + self.b_pre).to(x.dtype)
        h_post = (2 * torch.sigmoid(self.a_post * p_post + self.b_post)).to(x.dtype)
        h_res = sinkhorn(self.a_res * p_res.unflatten(-1, (n, n)) + self.b_res.view(n, n), self.iters).to(x.dtype)
        u = sublayer(self.norm(torch.einsum("...i,...id->...d", h_pre, xs)))
        out = torch.einsum("...ij,...jd->...id", h_res, xs) + h_post.unsqueeze(-1) * u.unsqueeze(-2)
        return out.flatten(-2)


RULES = {
    "preln": PreLN,
    "postln": PostLN,
    "deepnorm": PostLN,
    "mhc": GeometricResidual,
    "ddl": GeometricResidual,
    "mgt": GeometricResidual,
    "ddl_rank1": Rank1Delta,
    "mhc_nstream": NStreamMHC,
}


class Block(nn.Module):
    def __init__(self, config: MGTConfig):
        super().__init__()
        self.attn = Attention(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else GELUMLP(config)
        self.attn_residual = RULES[config.residual](config)
        self.mlp_residual = RULES[config.residual](config)

    def forward(self, x):
        return self.mlp_residual(self.attn_residual(x, self.attn), self.mlp)


class MGTForCausalLM(PreTrainedModel, GenerationMixin):
    """embedding -> L blocks -> final norm (or none) -> LM head (tied to the embedding or not)."""

    config_class = MGTConfig
    base_model_prefix = "mgt"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"head.weight": "embed.weight"} if int(transformers.__version__.split(".")[0]) >= 5 else ["head.weight"]

    def __init__(self, config: MGTConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = make_norm(config, config.d_model) if config.final_norm else nn.Identity()
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs) -> dict:
        """No key/value cache: `generate` passes the whole sequence at every step."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, labels: torch.LongTensor | None = None, **kwargs
    ) -> CausalLMOutputWithPast:
        """logits [B, T, V]; with labels, the mean next-token cross-entropy (labels shifted here, -100 ignored)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MGTForCausalLM: padding (attention_mask with zeros) is not supported; pass unpadded sequences")
        cfg = self.config
        x = self.embed(input_ids)
        if cfg.residual == "mhc_nstream":
            x = x.repeat(1, 1, cfg.mhc_streams)
        for block in self.layers:
            x = block(x)
        if cfg.residual == "mhc_nstream":
            x = x.unflatten(-1, (cfg.mhc_streams, cfg.d_model)).mean(dim=-2)
        logits = self.head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


__all__ = ["MGTConfig", "MGTForCausalLM"]
