"""
Hard-concrete L0 masks that learn which layers, key/value groups, MLP channels and hidden dimensions to keep, and
the Lagrangian that drives them to an exact target shape (Sheared-LLaMA's targeted structured pruning).

    from l0 import L0Module, TargetShape
    target = TargetShape(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                         intermediate_size=5504)
    l0 = L0Module(model.config, target)                       # masks: layer_z, head_z, intermediate_z, hidden_z
    masks = l0(generator=g)                                   # training: one sample per optimizer step
    loss = model(x, y, masks=masks) + l0.lagrangian(step)     # lambdas are *maximised* (gradient reversal)
    ...
    small = model.prune(l0.deterministic_masks())             # exactly the target shape

Masks (one unit each):  layer_z [L]  ·  head_z [L, H_kv] (a key/value group with its query heads; for MHA a
head)  ·  intermediate_z [L, I]  ·  hidden_z [d].  head_dim is never pruned.

Expected size. A unit's gate is non-zero with probability s = sigmoid(log_alpha - beta * ln(-l / r)). The
expected number of prunable parameters (weights of q/k/v/o and the MLP; embeddings, norms and biases excluded) is

    E = (sum_j s_hidden[j]) * sum_l s_layer[l] * ( P_group * sum_g s_head[l, g]  +  P_channel * sum_i s_int[l, i] )

with P_group = 2 * (G + 1) * head_dim (q and o: G query heads, k and v: one head; per hidden unit) and
P_channel = 3 (SwiGLU: gate, up, down) or 2 (GELU MLP). An unpruned dimension counts as s = 1, so any subset of
masks works. For MHA LLaMA this is the reference's 4 d^2 / H per head and 3 d per channel.
"""

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from model import ModelConfig

MASKS = ("layer", "head", "intermediate", "hidden")


@dataclass
class TargetShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> "TargetShape":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})

    def validate(self, src: ModelConfig):
        """One-line ValueError unless `src` can be pruned to this shape."""
        for k, v in asdict(self).items():
            if not isinstance(v, int) or not 1 <= v <= getattr(src, k):
                raise ValueError(f"target {k}={v} must be an integer in [1, {getattr(src, k)}] (the source model's)")
        group = src.num_attention_heads // src.num_key_value_heads
        if self.num_attention_heads != self.num_key_value_heads * group:
            raise ValueError(f"target num_attention_heads={self.num_attention_heads} must be num_key_value_heads "
                             f"x {group} (pruning removes whole key/value groups of {group} query heads)")
        try:  # what a Hugging Face config of this family can express (head_dim is never pruned)
            replace(src, **asdict(self), head_dim=src.head_dim)
        except ValueError as e:
            raise ValueError(f"target shape: {e}") from None


def unit_params(cfg: ModelConfig) -> tuple[int, int]:
    """Weights per hidden unit of one key/value group (q, k, v, o) and of one MLP channel (gate, up, down)."""
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    return 2 * (group + 1) * cfg.head_dim, 2 if cfg.neox else 3


def prunable_params(cfg: ModelConfig, shape: TargetShape | None = None) -> int:
    """Weights of attention and MLP in all layers (embeddings, norms, biases excluded) at `shape` (default: cfg's)."""
    s = shape or TargetShape.of(cfg)
    per_group, per_channel = unit_params(cfg)
    return s.hidden_size * s.num_hidden_layers * (per_group * s.num_key_value_heads + per_channel * s.intermediate_size)


class HardConcrete(nn.Module):
    """Stretched hard-concrete gates (Louizos et al., 2018): z = clamp(sigmoid((logit(u) + log_alpha) / beta)
    * (r - l) + l, 0, 1), temperature beta = 2/3, stretch (l, r) = (-0.1, 1.1).

    Initialisation: every log_alpha starts at ln 100, the upper end of the range it is kept in (the original code
    draws N(5, 0.01) and then clamps, so its effective init is also ln 100 for every unit). A gate then is non-zero
    with probability 0.998 and samples are almost all exactly 1, so pruning starts from the unpruned model's
    function and the Lagrangian, not initial noise, decides which units go. Ties (all units equal at step 0) are
    broken by index, deterministically."""

    def __init__(self, shape, init_log_alpha=math.log(100.0), temperature=2 / 3, limit_l=-0.1, limit_r=1.1):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(tuple(shape), float(init_log_alpha)))
        self.temperature, self.limit_l, self.limit_r = temperature, limit_l, limit_r
        self.log_alpha_range = (math.log(0.01), math.log(100.0))

    def prob_nonzero(self) -> torch.Tensor:
        # P(z > 0) = 1 - Q(0), Q the CDF of the stretched concrete: sigmoid(log_alpha - beta * ln(-l / r))
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-self.limit_l / self.limit_r))

    def sample(self, generator=None) -> torch.Tensor:
        eps = 1e-6
        u = torch.rand(self.log_alpha.shape, generator=generator, device="cpu").to(self.log_alpha.device)
        u = u.clamp(eps, 1 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0, 1)

    @torch.no_grad()
    def deterministic(self, k: int) -> torch.Tensor:
        """Binary mask keeping exactly k units per row (last axis): the k largest log_alpha, ties to lower index.
        Kept values are exactly 1, so folding them into the weights changes nothing."""
        la = self.log_alpha.detach().float().reshape(-1, self.log_alpha.shape[-1])
        order = torch.argsort(-la, dim=-1, stable=True)[:, :k]
        z = torch.zeros_like(la).scatter_(-1, order, 1.0)
        return z.reshape(self.log_alpha.shape)

    @torch.no_grad()
    def constrain_(self):
        self.log_alpha.clamp_(*self.log_alpha_range)


class _GradReverse(torch.autograd.Function):
    # identity forward, negated gradient: the optimiser's descent on lambda becomes ascent (a min-max saddle),
    # with any optimiser and a positive learning rate, and under FSDP (it acts inside autograd)
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class L0Module(nn.Module):
    def __init__(self, cfg: ModelConfig, target: TargetShape, masks=MASKS, warmup_steps: int = 0,
                 start_sparsity: float = 0.0):
        super().__init__()
        target.validate(cfg)
        unknown = set(masks) - set(MASKS)
        if unknown or not masks:
            raise ValueError(f"unknown pruning masks {sorted(unknown)}; choose from {MASKS}")
        self.cfg, self.target = cfg, target
        self.warmup_steps, self.start_sparsity = warmup_steps, start_sparsity
        L, d, nkv, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.intermediate_size
        # name -> (mask shape, number of units kept per row at the target)
        spec = {"layer": ((L,), target.num_hidden_layers), "head": ((L, nkv), target.num_key_value_heads),
                "intermediate": ((L, I), target.intermediate_size), "hidden": ((d,), target.hidden_size)}
        for name, (shape, k) in spec.items():
            if name not in masks and k != shape[-1]:
                raise ValueError(f"the target changes the {name} dimension ({shape[-1]} -> {k}) but {name!r} is "
                                 f"not among the pruned masks {list(masks)}")
        self.names = [m for m in MASKS if m in masks]
        self.keep = {m: spec[m][1] for m in self.names}
        self.z = nn.ModuleDict({m: HardConcrete(spec[m][0]) for m in self.names})
        # one (lambda_1, lambda_2) pair per mask, both starting at 0
        self.lambdas = nn.ParameterDict({f"lambda_{i}_{m}": nn.Parameter(torch.zeros(())) for m in self.names
                                         for i in (1, 2)})
        self.prunable = prunable_params(cfg)
        self.target_sparsity_final = 1 - prunable_params(cfg, target) / self.prunable

    def forward(self, generator=None) -> dict:
        """Masks for the model: sampled in training (one draw per call; pass a CPU torch.Generator seeded the same
        on every rank, e.g. from (seed, step), so all ranks and micro-batches of a step share them; the noise is
        drawn on the CPU so it is the same whatever the device), deterministic in eval."""
        if not self.training:
            return self.deterministic_masks()
        return {f"{m}_z": self.z[m].sample(generator) for m in self.names}

    def deterministic_masks(self) -> dict:
        return {f"{m}_z": self.z[m].deterministic(self.keep[m]) for m in self.names}

    def constrain_(self):
        """Keep log_alpha in [ln 0.01, ln 100]; call after every optimizer step."""
        for z in self.z.values():
            z.constrain_()

    # -------------------------------------------------------------------------
    # expected size, schedule, Lagrangian

    def expected_num_params(self) -> torch.Tensor:
        cfg = self.cfg
        p = {m: self.z[m].prob_nonzero() for m in self.names}
        L, nkv, I = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.intermediate_size
        ref = next(iter(p.values()))
        layer = p.get("layer", ref.new_ones(L))
        heads = p["head"].sum(-1) if "head" in p else ref.new_full((L,), nkv)
        channels = p["intermediate"].sum(-1) if "intermediate" in p else ref.new_full((L,), I)
        hidden = p["hidden"].sum() if "hidden" in p else cfg.hidden_size
        per_group, per_channel = unit_params(cfg)
        return hidden * (layer * (per_group * heads + per_channel * channels)).sum()

    def expected_sparsity(self) -> dict:
        """Per mask: 1 - expected kept fraction, per row ([L] for head/intermediate, scalar for layer/hidden)."""
        return {m: 1 - self.z[m].prob_nonzero().mean(-1) for m in self.names}

    def _schedule(self, step: int, final: float) -> float:
        # linear warm-up from start_sparsity to the final target over warmup_steps, then constant
        frac = min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return self.start_sparsity + (final - self.start_sparsity) * frac

    def target_sparsity(self, step: int) -> dict:
        """Per-mask target sparsity at `step`: 1 - kept/units per row at the end of the warm-up."""
        return {m: self._schedule(step, 1 - self.keep[m] / self.z[m].log_alpha.shape[-1]) for m in self.names}

    def lagrangian(self, step: int) -> torch.Tensor:
        """sum over masks of mean_rows( lambda_1 (s - t) + lambda_2 (s - t)^2 ): minimised by the masks,
        maximised by the lambdas."""
        expected, target = self.expected_sparsity(), self.target_sparsity(step)
        loss = 0.0
        for m in self.names:
            gap = expected[m] - target[m]
            l1 = _GradReverse.apply(self.lambdas[f"lambda_1_{m}"])
            l2 = _GradReverse.apply(self.lambdas[f"lambda_2_{m}"])
            loss = loss + (l1 * gap + l2 * gap.pow(2)).mean()
        return loss

    @torch.no_grad()
    def stats(self, step: int) -> dict:
        """Floats for logging: expected/target sparsity per mask and overall, expected size, lambdas."""
        e, t = self.expected_sparsity(), self.target_sparsity(step)
        out = {f"expected_{m}_sparsity": float(e[m].mean()) for m in self.names}
        out.update({f"target_{m}_sparsity": float(t[m]) for m in self.names})
        n = float(self.expected_num_params())
        out.update(expected_num_params=n, expected_sparsity=1 - n / self.prunable,
                   target_sparsity=self._schedule(step, self.target_sparsity_final))
        out.update({k: float(v) for k, v in self.lambdas.items()})
        return out
