"""
One decoder-only Transformer for the LLaMA, Qwen2 and Pythia (GPT-NeoX) families, with pruning masks.

- Module and config names mirror Hugging Face Llama (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`,
  `mlp.gate_proj`, `input_layernorm`, `model.norm`, `lm_head`), so Llama/Qwen2 weights load without renaming;
  convert.py maps GPT-NeoX names onto these and splits its fused QKV.
- RoPE is rotate-half, as in Hugging Face, so no weight permutation is ever needed; partial rotary (Pythia),
  linear and Llama-3 frequency scaling are supported.
- Attention goes through `F.scaled_dot_product_attention`, GQA included (`num_key_value_heads`).
- `forward(idx, targets, masks=...)` applies the L0 masks of l0.py (`layer_z [L]`, `head_z [L, H_kv]`,
  `intermediate_z [L, I]`, `hidden_z [d]`); `prune(masks)` folds them and returns a smaller dense model that
  computes the same function as the masked one; `prune_state_dict` does the same on a gathered state dict.
- The loss (`LinearCrossEntropy`) computes the logits' gradient in the forward, in place, and with a large
  vocabulary a chunk of tokens at a time, so the (tokens, vocab) fp32 logits are never materialised.

    import convert
    model = convert.load_model("path/to/hf_dir")                # or a hub id, .gguf, or a train.py run directory
    logits = model(idx)                                        # (B, T, vocab)
    loss = model(idx, targets)                                 # mean token cross-entropy
    tok_loss = model(idx, targets, reduction="none")           # (B, T)
    kd, ce = model(idx, targets, reduction="none", teacher=(teacher.hidden(idx), teacher.lm_head.weight, 0.5, 1.0))
"""

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

SUPPORTED = ("llama", "qwen2", "gpt_neox")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}


@dataclass
class ModelConfig:
    model_type: str = "llama"  # llama | qwen2 | gpt_neox
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0  # 0 -> num_attention_heads (MHA)
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6  # llama, qwen2
    layer_norm_eps: float = 1e-5  # gpt_neox
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    partial_rotary_factor: float = 1.0  # GPT-NeoX `rotary_pct`
    attention_bias: bool = False  # q/k/v (and o, except qwen2) biases
    mlp_bias: bool = False
    use_parallel_residual: bool = False  # gpt_neox
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    extra: dict = field(default_factory=dict)  # HF fields we carry through unchanged (pad_token_id, initializer_range)

    def __post_init__(self):
        if self.model_type not in SUPPORTED:
            raise ValueError(f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED}")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act not in ACT:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of {sorted(ACT)}")
        if self.neox and self.num_attention_heads * self.head_dim != self.hidden_size:
            raise ValueError(f"GPT-NeoX needs num_attention_heads x head_dim = hidden_size, got "
                             f"{self.num_attention_heads} x {self.head_dim} != {self.hidden_size}")
        if self.model_type == "llama" and self.hidden_size % self.num_attention_heads:
            # transformers' LlamaConfig refuses such a config even with an explicit head_dim
            raise ValueError(f"a LLaMA config needs hidden_size divisible by num_attention_heads to load in "
                             f"transformers: {self.hidden_size} % {self.num_attention_heads} != 0")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported; expected default, linear or llama3")

    # the family decides the layout; these keep the modules free of `if model_type == ...`
    @property
    def neox(self) -> bool:
        return self.model_type == "gpt_neox"

    @property
    def o_bias(self) -> bool:  # Qwen2 has q/k/v biases but none on o_proj
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def matmul_params(self) -> int:
        """Weights used in a matmul per token: every linear layer and the lm_head (the embedding lookup is free)."""
        d, hs = self.hidden_size, self.head_dim
        attn = d * hs * 2 * (self.num_attention_heads + self.num_key_value_heads)
        mlp = d * self.intermediate_size * (2 if self.neox else 3)
        return self.num_hidden_layers * (attn + mlp) + d * self.vocab_size

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM's count, for MFU): 6 per matmul weight (forward 2, backward 4) plus
        attention's 12 L H hs T, without discounting the causal mask."""
        attention = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6 * self.matmul_params() + attention

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict: transformers 5.x (`rope_parameters`) or older files."""
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"model_type {mt!r} is not supported; expected one of {SUPPORTED}")
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}  # old files: {"type"|"rope_type": ..., "factor": ...}
        rope.update({k: v for k, v in legacy.items() if k not in rope})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        theta = rope.pop("rope_theta", d.get("rope_theta", d.get("rotary_emb_base", 10000.0)))
        prf = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", d.get("rotary_pct", 1.0)))
        if mt == "qwen2" and d.get("use_sliding_window"):
            raise ValueError("Qwen2 sliding-window attention is not supported (use_sliding_window=true)")
        neox = mt == "gpt_neox"
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=0 if neox else (d.get("num_key_value_heads") or 0),
            head_dim=0 if neox else (d.get("head_dim") or 0),
            hidden_act=d.get("hidden_act", "gelu" if neox else "silu"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling={"rope_type": rope_type, **rope} if rope_type != "default" else None,
            partial_rotary_factor=float(prf),
            attention_bias=mt == "qwen2" or d.get("attention_bias", neox),  # Qwen2 always has q/k/v biases
            mlp_bias=True if neox else d.get("mlp_bias", False),
            use_parallel_residual=neox and d.get("use_parallel_residual", True),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            extra={k: d[k] for k in ("pad_token_id", "initializer_range") if d.get(k) is not None},
        )

    def to_hf(self) -> dict:
        """A config.json dict that transformers (5.x, and 4.x through the legacy keys) loads as this model."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        d = dict(
            architectures=[ARCHITECTURES[self.model_type]], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            hidden_act=self.hidden_act, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, rope_theta=self.rope_theta, **self.extra,
        )
        if self.neox:
            rope["partial_rotary_factor"] = self.partial_rotary_factor
            d.update(layer_norm_eps=self.layer_norm_eps, use_parallel_residual=self.use_parallel_residual,
                     attention_bias=self.attention_bias, rotary_pct=self.partial_rotary_factor,
                     rotary_emb_base=self.rope_theta)
        else:
            d.update(num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                     rms_norm_eps=self.rms_norm_eps)
            if self.model_type == "llama":
                d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
            if self.rope_scaling:
                d["rope_scaling"] = dict(self.rope_scaling)
        d["rope_parameters"] = rope
        return d


# -----------------------------------------------------------------------------
# building blocks

ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,), fp32, with the config's frequency scaling (as Hugging Face computes it).
    Built directly on `device`: a CPU tensor copied to the GPU would block on a stream sync at every forward."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type") == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif rs.get("rope_type") == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated smoothly
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: ModelConfig, T: int, device, dtype, positions=None):
    """cos, sin (T, rd) for positions 0..T-1, or (B, 1, T, rd) for explicit positions (B, T) (packed sequences)."""
    # recomputed per forward (T x rotary_dim/2 flops): no cached buffer to rebuild after meta-device init
    pos = torch.arange(T, device=device) if positions is None else positions[:, None, :]  # (T,) or (B, 1, T)
    freqs = pos.to(torch.float32)[..., None] * rope_inv_freq(cfg, device)  # (..., T, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, rd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on the first cos.shape[-1] dims of x (B, nh, T, hs); the rest passes through (partial
    rotary)."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr.chunk(2, dim=-1)
    xr = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((xr, xp), dim=-1) if xp.shape[-1] else xr


def attention(q, k, v, attn_mask=None):
    """Causal attention, q (B, nh, T, hs), k and v (B, nkv, T, hs) -> (B, nh, T, hs): PyTorch's SDPA, which picks
    a FlashAttention kernel on GPUs. attn_mask (B, 1, T, T) bool, True = may attend, replaces the causal mask (the
    scorer of report.py packs several sequences, and choices sharing a context, into one row). A module-level
    function, so another kernel (bench/gpu.py tries the flash-attn package) can replace it: model.attention = ..."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


def apply_z(x, z):
    return x if z is None else x * z.to(x.device, x.dtype)


def masked_linear(lin: nn.Linear, x, out_z=None, in_z=None):
    """lin(x) with its output units scaled by out_z (out,) or a scalar and its input units by in_z (in,), both folded
    into the weight (and the bias) on the fly, which is exactly what compaction does once: the cost is O(weight),
    independent of the number of tokens, and the masked model and the compacted one share one code path."""
    if out_z is None and in_z is None:
        return lin(x)
    w, b = lin.weight, lin.bias
    if out_z is not None:
        w = w * out_z.reshape(-1, 1).to(w.dtype)
        b = None if b is None else b * out_z.to(b.dtype)
    if in_z is not None:
        w = w * in_z.reshape(1, -1).to(w.dtype)
    return F.linear(x, w, b)


class Norm(nn.Module):
    """RMSNorm (llama, qwen2) or LayerNorm with bias (gpt_neox), statistics in fp32 as Hugging Face computes them.

    With `hidden_z` (and `hidden_n`, its number of non-zero entries), the statistics are taken over the kept
    dimensions only and the output is multiplied by the mask, so it equals the norm of the compacted model. This
    relies on an invariant of the masked forward: the residual stream is exactly 0 on dropped dimensions (the
    embedding and every sublayer output are multiplied by hidden_z), so sums over all dimensions are sums over the
    kept ones and no (B, T, d) keep-mask multiply is needed."""

    def __init__(self, d: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x, hidden_z=None, hidden_n=None):
        dtype = x.dtype
        x = x.float()
        if self.bias is not None:  # LayerNorm: weight and bias applied in fp32 (F.layer_norm does), then cast
            if hidden_z is None:
                return F.layer_norm(x, x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(dtype)
            x = torch.where(hidden_z != 0, x - x.sum(-1, keepdim=True) / hidden_n, 0.0)  # centred on kept dims
            x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / hidden_n + self.eps)
            return ((x * self.weight.float() + self.bias.float()) * hidden_z).to(dtype)
        # RMSNorm: the weight multiplies the normalised input cast back to its dtype (as Hugging Face Llama)
        if hidden_z is None:
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / hidden_n + self.eps)
        return (self.weight * hidden_z.to(self.weight.dtype)) * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, nh, nkv, hs = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.nh, self.nkv, self.hs = nh, nkv, hs
        self.q_proj = nn.Linear(d, nh * hs, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, nkv * hs, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, nkv * hs, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hs, d, bias=cfg.o_bias)

    def forward(self, x, cos, sin, head_z=None, out_z=None, attn_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # a replacement kernel need not take a mask: training never passes one
        y = attention(q, k, v) if attn_mask is None else attention(q, k, v, attn_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)
        # one unit per key/value group: query head h belongs to group h // (nh // nkv), as in HF repeat_kv; head_z
        # scales each head's output, i.e. o_proj's input columns
        head_cols = None if head_z is None else head_z.repeat_interleave(self.nh // self.nkv * self.hs)
        return masked_linear(self.o_proj, y, out_z, head_cols)


class MLP(nn.Module):
    """SwiGLU (down(act(gate(x)) * up(x))) for llama/qwen2; up -> act -> down with biases for gpt_neox."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = None if cfg.neox else nn.Linear(d, I, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, I, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(I, d, bias=cfg.mlp_bias)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x, intermediate_z=None, out_z=None):
        h = self.act(self.up_proj(x)) if self.gate_proj is None else self.act(self.gate_proj(x)) * self.up_proj(x)
        return masked_linear(self.down_proj, h, out_z, intermediate_z)  # h (B, T, I) masked per channel


class Block(nn.Module):
    r"""
    sequential:  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
    parallel:    x = x + attn(ln1(x)) + mlp(ln2(x))          (GPT-NeoX use_parallel_residual)
    Masked, each sublayer's output is scaled by out_z = layer_z * hidden_z (formed once per layer by the caller),
    folded into o_proj and down_proj together with head_z and intermediate_z.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        eps = cfg.layer_norm_eps if cfg.neox else cfg.rms_norm_eps
        self.input_layernorm = Norm(cfg.hidden_size, eps, bias=cfg.neox)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = Norm(cfg.hidden_size, eps, bias=cfg.neox)
        self.mlp = MLP(cfg)
        self.parallel = cfg.use_parallel_residual
        self.checkpoint = False  # activation checkpointing: recompute this block in the backward
        self.compiled = None  # compile_(): torch.compile'd _forward, for training

    def compile_(self):
        """torch.compile this block's computation for training steps: its _forward, so that the hooks on the block
        (FSDP2's, and activation_importance's on its parts) stay outside the compiled code, and one compiled graph
        serves every block (the same code, the same shapes). Without gradients (evaluation, scoring, a teacher) the
        block runs eagerly: those few forwards are not worth more graphs, each of which counts towards dynamo's
        recompile limit, past which it silently runs everything eagerly."""
        self.compiled = torch.compile(self._forward)
        return self

    def forward(self, *args, **kwargs):
        fn = self.compiled if self.compiled is not None and torch.is_grad_enabled() else self._forward
        if self.checkpoint and torch.is_grad_enabled():
            # inside the block's forward, so FSDP2's hooks on the block stay outside the recomputed region
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def _forward(self, x, cos, sin, head_z=None, intermediate_z=None, hidden_z=None, hidden_n=None, out_z=None,
                 attn_mask=None):
        a = self.self_attn(self.input_layernorm(x, hidden_z, hidden_n), cos, sin, head_z, out_z, attn_mask)
        if self.parallel:
            return x + a + self.mlp(self.post_attention_layernorm(x, hidden_z, hidden_n), intermediate_z, out_z)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x, hidden_z, hidden_n), intermediate_z, out_z)


# -----------------------------------------------------------------------------
# the model

def tied_state_dict(cfg: ModelConfig, sd: dict, lm_head: bool) -> dict:
    """The one place that handles tied embeddings in a state dict. With tie_word_embeddings, lm_head.weight *is*
    the embedding matrix: files (Hugging Face's, our exports) and prune_state_dict leave it out (lm_head=False);
    nn.Module loading and set_model_state_dict want it (lm_head=True). An untied model's state dict passes through."""
    if not cfg.tie_word_embeddings:
        return sd
    sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    return {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]} if lm_head else sd


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        eps = config.layer_norm_eps if config.neox else config.rms_norm_eps
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=Norm(config.hidden_size, eps, bias=config.neox),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        """With tie_word_embeddings, lm_head reads the embedding matrix. Filling a model built on the meta device
        (to_empty, load_state_dict(assign=True)) makes two tensors of the shared one: builders call this after."""
        if self.config.tie_word_embeddings and self.lm_head.weight is not self.model.embed_tokens.weight:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_state_dict(cls, config: ModelConfig, sd: dict) -> "Transformer":
        """A model holding the tensors of `sd` (not copies), e.g. convert.load_hf's."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(tied_state_dict(config, sd, lm_head=True), strict=True, assign=True)
        model.tie_weights()
        return model

    def forward(self, idx, targets=None, masks: dict | None = None, reduction: str = "mean", teacher=None,
                positions=None, attn_mask=None):
        """idx (B, T) token ids -> logits (B, T, V); with targets (B, T) (-100 = ignore) -> the mean token
        cross-entropy, or per-token losses (B, T) with reduction="none". `masks` from l0.L0Module, any subset.
        teacher: (hidden (B, T, d_t), lm_head weight (V, d_t), alpha, temperature) of a frozen teacher (its
        `hidden(idx)`): with reduction="none", returns (distillation loss, cross-entropy) per token (distill_loss).
        positions (B, T) and attn_mask (B, 1, T, T) (True = may attend): packed rows, see `hidden`."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        x = self.hidden(idx, masks, positions, attn_mask)  # (B, T, d)
        if targets is None:
            return self.lm_head(x)  # (B, T, V)
        B, T = idx.shape
        w = self.lm_head.weight
        chunk = max(1, LOGITS_CHUNK // self.config.vocab_size)
        if teacher is not None:
            if reduction != "none":
                raise ValueError("distillation returns per-token losses: use reduction='none'")
            ht, wt, alpha, temperature = teacher
            loss, ce = distill_loss(x.flatten(0, 1), w, ht.flatten(0, 1), wt, targets.flatten(), alpha, temperature,
                                    chunk)
            return loss.view(B, T), ce.view(B, T)
        grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        if not grad and reduction == "none" and (keep := targets.flatten() != -100).sum() < B * T:
            # scoring (report.py) wants a few tokens of each row: ignored targets cost no lm_head matmul
            loss = torch.zeros(B * T, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
            loss[keep] = LinearCrossEntropy.apply(x.flatten(0, 1)[keep], w, targets.flatten()[keep], chunk, False)
            return loss.view(B, T)
        loss = LinearCrossEntropy.apply(x.flatten(0, 1), w, targets.flatten(), chunk, grad)  # (B * T,)
        if reduction == "none":
            return loss.view(B, T).clone()  # not a view: FSDP2 hooks the output of the root module
        return loss.sum() / (targets != -100).sum().clamp(min=1)

    def hidden(self, idx, masks: dict | None = None, positions=None, attn_mask=None):
        """idx (B, T) -> the final norm's output (B, T, d), what lm_head reads. Each row is one sequence at
        positions 0..T-1 under a causal mask, unless positions (B, T) and attn_mask (B, 1, T, T) say otherwise:
        several sequences in a row, each attending to its own earlier tokens, with its own positions."""
        B, T = idx.shape
        masks = masks or {}
        layer_z, hidden_z = masks.get("layer_z"), masks.get("hidden_z")
        # kept hidden dims, counted once per forward for all 2L+1 norms (a sample may close every gate: 0, not NaN)
        hidden_n = None if hidden_z is None else (hidden_z != 0).sum().clamp(min=1)
        x = apply_z(self.model.embed_tokens(idx), hidden_z)  # (B, T, d)
        cos, sin = rope_cos_sin(self.config, T, x.device, x.dtype, positions)
        for i, layer in enumerate(self.model.layers):
            z = {k: masks[k][i] for k in ("head_z", "intermediate_z") if k in masks}
            # a sublayer's output is scaled by layer_z and hidden_z: their product, once per layer
            out_z = hidden_z if layer_z is None else layer_z[i] if hidden_z is None else layer_z[i] * hidden_z
            x = layer(x, cos, sin, hidden_z=hidden_z, hidden_n=hidden_n, out_z=out_z, attn_mask=attn_mask, **z)
        return self.model.norm(x, hidden_z, hidden_n)  # (B, T, d)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None):
        """Random weights as Hugging Face initialises these families (PreTrainedModel._init_weights): every Linear
        and the embedding N(0, initializer_range) (the config's, else 0.02, the families' default), biases 0, norm
        weights 1, the padding token's embedding 0. For training the shape from scratch (train.py from_scratch)."""
        std = float(self.config.extra.get("initializer_range", 0.02))
        for mod in self.modules():
            tied = mod is self.lm_head and self.config.tie_word_embeddings  # (the embedding, drawn once)
            if isinstance(mod, (nn.Linear, nn.Embedding)) and not tied:
                mod.weight.normal_(0.0, std, generator=generator)
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.zero_()
            if isinstance(mod, Norm):
                mod.weight.fill_(1.0)
                if mod.bias is not None:
                    mod.bias.zero_()
        pad = self.config.extra.get("pad_token_id")
        if isinstance(pad, int) and 0 <= pad < self.config.vocab_size:
            self.model.embed_tokens.weight[pad].zero_()
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_word_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    @torch.no_grad()
    def prune(self, masks: dict) -> "Transformer":
        """Fold the (deterministic) masks into the weights and drop every zeroed unit: a new, smaller dense
        Transformer that computes what the masked model computes (see prune_state_dict)."""
        return Transformer.from_state_dict(*prune_state_dict(self.config, self.state_dict(), masks))


# -----------------------------------------------------------------------------
# compaction

@torch.no_grad()
def prune_state_dict(cfg: ModelConfig, sd: dict, masks: dict) -> tuple[ModelConfig, dict]:
    """Compact a full (unsharded) state dict with the masks: returns (new_config, new_state_dict) of a smaller dense
    model with a uniform shape (so a standard HF config describes it) that computes what the masked model computes.
    Kept mask values need not be 1; they are folded into the weight that follows them. Works on plain tensors on any
    device, so a sharded (FSDP2) model is gathered, compacted here and re-sharded. Each tensor keeps its dtype."""
    from torch.distributed.tensor import DTensor
    if any(isinstance(v, DTensor) for v in sd.values()):
        raise ValueError("prune_state_dict needs full tensors: gather the sharded state dict first "
                         "(e.g. DTensor.full_tensor())")
    sd = tied_state_dict(cfg, sd, lm_head=False)  # a tied lm_head is the embedding, compacted as such
    L, d, nkv, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.intermediate_size
    if unknown := set(masks) - {"layer_z", "head_z", "intermediate_z", "hidden_z"}:
        raise ValueError(f"unknown masks {sorted(unknown)}; expected layer_z, head_z, intermediate_z, hidden_z")
    dev = sd["model.embed_tokens.weight"].device
    get = lambda k, *shape: masks[k].to(dev, torch.float32) if k in masks else torch.ones(*shape, device=dev)
    layer_z, head_z = get("layer_z", L), get("head_z", L, nkv)
    int_z, hid_z = get("intermediate_z", L, I), get("hidden_z", d)
    for name, z, shape in (("layer_z", layer_z, (L,)), ("head_z", head_z, (L, nkv)),
                           ("intermediate_z", int_z, (L, I)), ("hidden_z", hid_z, (d,))):
        if tuple(z.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(z.shape)}, expected {shape} for this model")
    layers = layer_z.nonzero().flatten().tolist()
    kh = hid_z.nonzero().flatten()  # kept hidden dims
    if not layers or not len(kh):
        raise ValueError("the masks drop every layer or every hidden dimension")
    n_kv = {int((head_z[i] != 0).sum()) for i in layers}
    n_int = {int((int_z[i] != 0).sum()) for i in layers}
    if len(n_kv) != 1 or len(n_int) != 1 or 0 in n_kv or 0 in n_int:
        raise ValueError(f"kept layers must keep the same, non-zero number of key/value groups and MLP channels "
                         f"(got {sorted(n_kv)} and {sorted(n_int)}); use l0.L0Module.deterministic_masks()")
    group = cfg.num_attention_heads // nkv
    n_kv = n_kv.pop()
    # __post_init__ checks what a Hugging Face config of this family can express
    new_cfg = replace(cfg, hidden_size=len(kh), num_hidden_layers=len(layers), num_key_value_heads=n_kv,
                      num_attention_heads=n_kv * group, intermediate_size=n_int.pop(), head_dim=cfg.head_dim)

    hs, z_h = cfg.head_dim, hid_z[kh]
    out = {}

    def put(dst, src, f):  # out[dst] = f(sd[src]), computed in fp32, stored in the source tensor's dtype
        if src in sd:
            out[dst] = f(sd[src].float()).to(sd[src].dtype).contiguous()

    put("model.embed_tokens.weight", "model.embed_tokens.weight", lambda w: w[:, kh] * z_h)
    for j, i in enumerate(layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{j}."
        for name in ("input_layernorm", "post_attention_layernorm"):  # the masked norm multiplies by hidden_z
            for p in (".weight", ".bias"):
                put(dst + name + p, src + name + p, lambda w: w[kh] * z_h)
        kv = head_z[i].nonzero().flatten()  # kept key/value groups
        ar = torch.arange(hs, device=dev)
        kv_rows = (kv[:, None] * hs + ar).flatten()
        q_heads = (kv[:, None] * group + torch.arange(group, device=dev)).flatten()
        q_rows = (q_heads[:, None] * hs + ar).flatten()
        for name, r in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            k = f"self_attn.{name}"
            put(dst + k + ".weight", src + k + ".weight", lambda w: w[r][:, kh])
            put(dst + k + ".bias", src + k + ".bias", lambda w: w[r])
        # head_z scales each head's output, i.e. o_proj's input columns; layer_z and hidden_z its output rows
        out_scale = (layer_z[i] * z_h)[:, None]
        col_scale = head_z[i].repeat_interleave(group * hs)[q_rows]
        k = "self_attn.o_proj"
        put(dst + k + ".weight", src + k + ".weight", lambda w: w[kh][:, q_rows] * col_scale * out_scale)
        put(dst + k + ".bias", src + k + ".bias", lambda w: w[kh] * out_scale[:, 0])
        ch = int_z[i].nonzero().flatten()  # kept MLP channels
        for k in ("mlp.gate_proj", "mlp.up_proj"):  # gate_proj: none in GPT-NeoX
            put(dst + k + ".weight", src + k + ".weight", lambda w: w[ch][:, kh])
            put(dst + k + ".bias", src + k + ".bias", lambda w: w[ch])
        k = "mlp.down_proj"
        put(dst + k + ".weight", src + k + ".weight", lambda w: w[kh][:, ch] * int_z[i][ch] * out_scale)
        put(dst + k + ".bias", src + k + ".bias", lambda w: w[kh] * out_scale[:, 0])
    # the final norm's output carries hidden_z into lm_head: folded into lm_head's columns, not into the norm, so
    # that a tied lm_head, which is the compacted embedding (already scaled by hidden_z), needs nothing more
    for p in (".weight", ".bias"):
        put("model.norm" + p, "model.norm" + p, lambda w: w[kh])
    put("lm_head.weight", "lm_head.weight", lambda w: w[:, kh] * z_h)  # (untied)
    return new_cfg, out


# -----------------------------------------------------------------------------
# cross-entropy over a large vocabulary, without the (tokens, vocab) logits

LOGITS_CHUNK = 2**26  # logits per chunk (256 MB in fp32): above this, chunks of tokens and a recomputing backward


def _softmax_cross_entropy_(z, t, grad: bool):
    """Cross-entropy of the fp32 logits z (c, V), overwritten in place: one exp per logit, no (c, V) temporaries.
    Returns the losses (c,) (0 where t == -100), the log-sum-exp (c,), and, if grad, z turned into
    softmax(z) - onehot(t), the loss's gradient w.r.t. the logits."""
    valid = t != -100
    idx = t.clamp(min=0)[:, None]
    picked = z.gather(-1, idx)[:, 0]
    m = z.amax(-1, keepdim=True)
    e = z.sub_(m).exp_()  # (c, V) exp(z - max)
    total = e.sum(-1, keepdim=True)
    lse = (m + total.log())[:, 0]
    if grad:
        e.div_(total).scatter_add_(-1, idx, -valid[:, None].to(e.dtype))
    return torch.where(valid, lse - picked, 0.0), lse


class LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits = h @ weight.T, as F.cross_entropy(lm_head(h).float()) computes it (the
    matmul in the dtype F.linear would use: autocast's, if on; softmax in fp32), without its (N, V) intermediates.

    - N <= chunk tokens: the forward computes the logits once and, when a gradient is wanted, turns them in place into
      the gradient softmax - onehot, which the backward uses directly: one (N, V) buffer, one exp per logit, and no
      (N, V) pass in the backward (F.cross_entropy allocates and fills three more (N, V) tensors and exps twice;
      `bench/speed.py --rows loss` measures the two).
    - N > chunk: `chunk` tokens at a time, and the backward recomputes each chunk's logits (one more lm_head matmul,
      as activation checkpointing does), so the whole (N, V) matrix never exists: Qwen2's 152k vocabulary at 4k
      tokens is 2.5 GB of fp32 logits per sequence.

    h (N, d), weight (V, d), targets (N,) with -100 = ignore -> (N,) fp32 losses (0 where ignored). grad: will a
    backward follow (torch.is_grad_enabled() and an input requires grad; a Function's forward cannot tell)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, grad: bool = True):
        dev = h.device.type
        ctx.mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        dtype = torch.promote_types(h.dtype, torch.float32)  # fp32 (fp64 for gradcheck)
        ctx.chunk, ctx.stored = chunk, grad and len(h) <= chunk
        with torch.autocast(dev, enabled=False):
            w = weight.to(ctx.mm_dtype)
            if ctx.stored:
                g = (h.to(ctx.mm_dtype) @ w.T).to(dtype)  # (N, V), ours to overwrite (a new tensor in any dtype)
                loss, _ = _softmax_cross_entropy_(g, targets, grad=True)
                ctx.save_for_backward(h, weight, targets, g)
                return loss
            loss = torch.empty(len(h), device=h.device, dtype=dtype)
            lse = torch.empty_like(loss)
            for i in range(0, len(h), chunk):
                z = (h[i:i + chunk].to(ctx.mm_dtype) @ w.T).to(dtype)  # (c, V)
                loss[i:i + chunk], lse[i:i + chunk] = _softmax_cross_entropy_(z, targets[i:i + chunk], grad=False)
        ctx.save_for_backward(h, weight, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets, saved = ctx.saved_tensors
        mm, c = ctx.mm_dtype, ctx.chunk
        s = torch.where(targets != -100, grad, 0.0)[:, None]  # (N, 1) d total / d loss_i
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(mm)
            if ctx.stored:
                g = saved  # softmax - onehot (N, V)
                if g.dtype == mm:  # the per-token scale goes on the (N, d) sides: no pass over (N, V)
                    return ((g @ w) * s).to(h.dtype), (g.T @ (h.to(mm) * s)).to(weight.dtype), None, None, None
                g = (g * s).to(mm)
                return (g @ w).to(h.dtype), (g.T @ h.to(mm)).to(weight.dtype), None, None, None
            lse = saved
            dh = torch.empty_like(h)
            dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))
            for i in range(0, len(h), c):
                hc, t = h[i:i + c].to(mm), targets[i:i + c]
                g = (hc @ w.T).to(lse.dtype).sub_(lse[i:i + c, None]).exp_()  # softmax (c, V), in place
                g.scatter_add_(-1, t.clamp(min=0)[:, None], -(t != -100)[:, None].to(g.dtype))
                g = (g * s[i:i + c]).to(mm)  # dloss/dlogits
                dh[i:i + c] = (g @ w).to(h.dtype)
                dw += (g.T @ hc).to(dw.dtype)  # accumulated over chunks in fp32 (or more)
        return dh, dw.to(weight.dtype), None, None, None


def _distill_(zs, zt, t, alpha: float, temperature: float, grad: bool):
    """Per-token distillation loss and cross-entropy, (c,) each, from the fp32 logits zs (student) and zt (teacher),
    (c, V) each, both overwritten; if grad, also the loss's gradient w.r.t. zs, (c, V):
    (1 - a)(softmax(zs) - onehot(t)) + a T (softmax(zs / T) - softmax(zt / T))."""
    T, valid, idx = temperature, t != -100, t.clamp(min=0)[:, None]
    log_ps = zs.log_softmax(-1)  # the student, for the cross-entropy
    ce = -log_ps.gather(-1, idx)[:, 0]
    log_ps_t = log_ps if T == 1 else zs.div_(T).log_softmax(-1)  # the student at temperature T
    log_pt = zt.div_(T).log_softmax(-1)  # the teacher at temperature T
    pt = log_pt.exp()
    kl = (pt * log_pt.sub_(log_ps_t)).sum(-1)  # KL(teacher || student)
    loss = torch.where(valid, (1 - alpha) * ce + alpha * T * T * kl, 0.0)
    g = None
    if grad:
        g = log_ps.exp_()  # softmax(zs), in place
        if T != 1:  # (T = 1: (1 - a) softmax(zs) + a softmax(zs / T) is softmax(zs) itself)
            g.mul_(1 - alpha).add_(log_ps_t.exp_(), alpha=alpha * T)
        g.add_(pt, alpha=-alpha * T)
        g.scatter_add_(-1, idx, -(1 - alpha) * valid[:, None].to(g.dtype))
    return loss, torch.where(valid, ce, 0.0), g


class LinearDistill(torch.autograd.Function):
    """Knowledge distillation per token: (1 - a) CE + a T^2 KL(p_teacher || p_student), the two distributions
    softmax(logits / T) (Hinton et al.; T^2 keeps the soft term's gradient scale independent of T), for the student
    logits h @ w.T and the teacher logits ht @ wt.T (no gradient). Like LinearCrossEntropy: up to `chunk` tokens
    the forward keeps the gradient w.r.t. the student's logits and the backward is two matmuls; above, `chunk`
    tokens at a time and the backward recomputes both models' logits, so neither's (N, V) logits ever exist.

    h (N, d), w (V, d), ht (N, d_t), wt (V, d_t), targets (N,) with -100 = ignore -> loss (N,) and the plain
    cross-entropy (N,) (no gradient; what the domain weighter reads), fp32, 0 where ignored."""

    @staticmethod
    def forward(ctx, h, w, ht, wt, targets, alpha: float, temperature: float, chunk: int, grad: bool = True):
        dev = h.device.type
        ctx.mm_dtype = mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        dtype = torch.promote_types(h.dtype, torch.float32)
        ctx.args, ctx.stored = (alpha, temperature, chunk), grad and len(h) <= chunk
        loss, ce = torch.empty(len(h), device=h.device, dtype=dtype), torch.empty(len(h), device=h.device, dtype=dtype)
        with torch.autocast(dev, enabled=False):
            for i in range(0, len(h), chunk):
                zs = (h[i:i + chunk].to(mm) @ w.to(mm).T).to(dtype)  # (c, V)
                zt = (ht[i:i + chunk].to(mm) @ wt.to(mm).T).to(dtype)
                loss[i:i + chunk], ce[i:i + chunk], g = _distill_(zs, zt, targets[i:i + chunk], alpha, temperature,
                                                                  ctx.stored)
        ctx.save_for_backward(h, w, ht, wt, targets, g if ctx.stored else None)
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad, _):
        h, w, ht, wt, targets, g = ctx.saved_tensors
        (alpha, temperature, c), mm = ctx.args, ctx.mm_dtype
        s = torch.where(targets != -100, grad, 0.0)[:, None]  # (N, 1) d total / d loss_i
        dh = torch.empty_like(h)
        dw = torch.zeros(w.shape, device=w.device, dtype=torch.promote_types(w.dtype, torch.float32))
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, len(h), c):
                hc = h[i:i + c].to(mm)
                if g is None:  # recompute the chunk's logits, both models'
                    zs = (hc @ w.to(mm).T).to(s.dtype)
                    zt = (ht[i:i + c].to(mm) @ wt.to(mm).T).to(s.dtype)
                    gc = _distill_(zs, zt, targets[i:i + c], alpha, temperature, True)[2]
                else:
                    gc = g
                gc = (gc * s[i:i + c]).to(mm)  # d loss / d student logits
                dh[i:i + c] = (gc @ w.to(mm)).to(h.dtype)
                dw += (gc.T @ hc).to(dw.dtype)
        return dh, dw.to(w.dtype), None, None, None, None, None, None, None


def distill_loss(h, w, ht, wt, targets, alpha: float, temperature: float, chunk: int):
    """(loss, ce) per token of LinearDistill; no gradient work when none is wanted."""
    grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    return LinearDistill.apply(h, w, ht.detach(), wt.detach(), targets, alpha, temperature, chunk, grad)
