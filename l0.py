"""
Hard-concrete L0 masks that learn which layers, key/value groups, MLP channels and hidden dimensions to keep, and
the Lagrangian that drives them to an exact target shape (Sheared-LLaMA's targeted structured pruning).

    from l0 import L0Module, TargetShape, mask_generator
    target = TargetShape(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                         intermediate_size=5504)
    l0 = L0Module(model.config, target, warmup_steps=640, steps=3200, landing_steps=320)  # fp32, replicated
    l0.set_step_(step)                                        # the gates' temperature (annealed in the landing)
    for row in range(first_row, last_row, micro_batch_size):  # this rank's micro-batches of the global batch
        masks = l0(mask_generator(seed, step, row))           # one sample per micro-batch
        (model(x, y, masks=masks, reduction="none").sum() / n_tokens).backward()
    if not l0.landing(step):
        l0.lagrangian(step).backward()                        # lambdas are *maximised* (gradient reversal)
    l0.all_reduce_grads_(); opt.step(); l0.constrain_()
    l0.land_(step)                                            # the last landing_steps: onto the target (below)
    l0.eval(); masks = l0()                                   # evaluation while pruning: the expected size
    small = model.prune(l0.deterministic_masks())             # exactly the target shape

Masks (one unit each):  layer_z [L]  ·  head_z [L, H_kv] (a key/value group with its query heads; for MHA a
head)  ·  intermediate_z [L, I]  ·  hidden_z [d].  head_dim is never pruned. A mask type whose target keeps every
unit (e.g. the layers of LLaMA-2-7B -> 2.7b, 32 -> 32) is not pruned at all: no gates, no Lagrangian term (its
lambda would otherwise grow without bound, since log_alpha is clamped and its expected sparsity can never reach 0).

Sampling. The original draws new masks at every forward, i.e. per micro-batch and per rank. We do the same, from a
CPU generator seeded by (seed, step, index of the micro-batch's first row in the global batch): a run draws the
same masks for the same rows whatever the world size or the gradient accumulation, for a fixed micro-batch size.
All masks' noise is drawn as one CPU tensor and copied to the device once (pinned, non-blocking).

Three kinds of masks: `l0()` in training mode samples; `l0.eval()()` gives `expected_masks()`: per row the
round(sum P(z > 0)) units with the largest log_alpha, i.e. the model of the size the masks currently describe
(the original's eval_target_model=false), which is what validation while pruning measures and what the dynamic
reference loss pairs with the expected sparsity; `deterministic_masks()` keeps exactly the target's units per row,
for compaction. A kept unit's value is `values`: "soft", the deterministic gate value sigmoid(0.8 log_alpha / beta)
= sigmoid(1.2 log_alpha) (the original's), or "binary", 1 (train.py's default: measured better, docs/results.md).
model.prune folds either into the weights, so the masked model equals the compacted one.

Landing. The Lagrangian pulls the expected sparsity towards the target but lags it: a short run ends with some mask
types above their target and others below (docs/results.md). For the last `landing_steps` of pruning, `land_(step)`
replaces the Lagrangian (train.py skips it): after every optimizer step it shifts each row's log_alpha by one
constant, so that the row's expected kept count sum P(z > 0) moves to the target's, closing what is left of the gap
linearly over the first half of the landing and holding it exactly in the second. A shift keeps the order of the
units (it is bounded so that the clamp never ties a kept unit with a dropped one), so the data gradient still
decides which units go, the projection only how many; at the end the expected-size masks are the compaction's
masks, and compaction cuts nothing the gates still used. With log_alpha clamped to [ln 0.01, ln 100] a closed gate
still has P(z > 0) = 0.047, so holding sum P = k keeps the kept gates below the top of the range, the further the
fewer units a row keeps (at temperature 2/3: log_alpha about 2-3 for the demo's shapes, 0.2 for a row keeping a
quarter), where a sample often lies strictly between 0 and 1. A landing_temperature below 2/3 anneals the gates'
temperature over the landing's first half (set_step_): at a low temperature a sample is almost always exactly 0 or
1 (a Bernoulli(sigmoid(log_alpha)) draw), so the last steps train the weights under masks much like the ones
compaction applies.

Distributed. The module is tiny: keep it replicated in fp32 on every rank, outside FSDP and outside mixed
precision (bf16 would move log_alpha's init from ln 100 = 4.605 to 4.594 and double the expected sparsity at init);
it refuses to run in a lower precision. Call `all_reduce_grads_()` after backward (it averages the gradients over
ranks), and give its parameters weight decay 0: decoupled weight decay would shrink lambda under gradient reversal.

Expected size. A unit's gate is non-zero with probability s = sigmoid(log_alpha - beta * ln(-l / r)). The
expected number of prunable parameters (weights of q/k/v/o and the MLP; embeddings, norms and biases excluded) is

    E = (sum_j s_hidden[j]) * sum_l s_layer[l] * ( P_group * sum_g s_head[l, g]  +  P_channel * sum_i s_int[l, i] )

with P_group = 2 * (G + 1) * head_dim (q and o: G query heads, k and v: one head; per hidden unit) and
P_channel = 3 (SwiGLU: gate, up, down) or 2 (GELU MLP). An unpruned dimension counts as s = 1, so any subset of
masks works. For MHA LLaMA this is the reference's 4 d^2 / H per head and 3 d per channel.
"""

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model import ModelConfig, Transformer

MASKS = ("layer", "head", "intermediate", "hidden")
TEMPERATURE = 2 / 3  # the hard-concrete temperature beta (Louizos et al.; the original's)
# how far the shape from_budget picks may be from target_params before it is refused: real models land within 5%
# (tests/test_l0.py), a tiny one's rounding steps (a multiple of 64 MLP channels, of lcm(heads, 8) hidden) are coarse
BUDGET_TOLERANCE = 0.2


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

    @classmethod
    def resolve(cls, src: ModelConfig, target_hidden_size=0, target_num_hidden_layers=0,
                target_num_key_value_heads=0, target_intermediate_size=0, target_params=0, **_) -> "TargetShape":
        """The target from a training config's target_* fields (other keys ignored; 0 keeps the source's); query
        heads follow from the source's group size, since pruning removes whole key/value groups. target_params
        instead: from_budget."""
        if target_params:
            if target_hidden_size or target_num_hidden_layers or target_num_key_value_heads or target_intermediate_size:
                raise ValueError("give either target_params or the target_* shape fields, not both, in one config "
                                 "file or command line (a later file or --option replaces an earlier one's)")
            return cls.from_budget(src, target_params)
        nkv = target_num_key_value_heads or src.num_key_value_heads
        if not 1 <= nkv <= src.num_key_value_heads:  # query heads follow from it: name the field the user set
            raise ValueError(f"target_num_key_value_heads={nkv} must be in [1, {src.num_key_value_heads}] (the "
                             "source model's)")
        return cls(hidden_size=target_hidden_size or src.hidden_size,
                   num_hidden_layers=target_num_hidden_layers or src.num_hidden_layers,
                   num_attention_heads=nkv * (src.num_attention_heads // src.num_key_value_heads),
                   num_key_value_heads=nkv, intermediate_size=target_intermediate_size or src.intermediate_size)

    @classmethod
    def from_budget(cls, src: ModelConfig, params: float, min_width: float = 0.5) -> "TargetShape":
        """The target shape for a parameter budget: `params` total parameters (embeddings included), or a fraction
        of the source's if <= 1. One rule, width first: keep every layer and shrink the hidden size, the key/value
        groups and the MLP by one factor s, so the shape keeps the source's proportions (Minitron: width pruning
        beats depth pruning at equal size); only if s would fall below `min_width` does s stay at min_width and
        layers go instead. Rounding: groups to an integer, hidden to a multiple of lcm(query heads, 8) (GPT-NeoX:
        heads x head_dim), then the MLP width, to a multiple of 64 (or of what divides the source's), takes up
        the rest of the budget. For LLaMA-2-7B this picks Sheared-LLaMA's 1.3b and 2.7b shapes (docs/method.md)."""
        total = lambda shape: total_params(src, shape)  # noqa: E731
        source = total(cls.of(src))
        budget = params * source if params <= 1 else params
        group = src.num_attention_heads // src.num_key_value_heads
        align = next(a for a in (64, 8, 1) if src.intermediate_size % a == 0)

        def shape(s, layers, inter=None):
            nkv = max(1, min(src.num_key_value_heads, round(s * src.num_key_value_heads)))
            heads = nkv * group
            if src.neox:
                hidden = heads * src.head_dim
            else:
                step = math.lcm(heads, 8)
                hidden = max(step, min(src.hidden_size // step * step, round(s * src.hidden_size / step) * step))
            inter = inter or max(align, round(s * src.intermediate_size / align) * align)
            return cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=nkv, intermediate_size=min(inter, src.intermediate_size))

        L = src.num_hidden_layers
        smallest = total(shape(min_width, 1, align))  # the rule's smallest shape: one layer at min_width
        if not smallest <= budget < source:
            raise ValueError(
                f"target_params={params:g} asks for {budget:,.0f} parameters, but a parameter budget for this "
                f"{count_text(source)}-parameter model must be in [{count_text(smallest)}, {count_text(source)}) "
                f"(as a fraction: [{smallest / source:.3f}, 1)); a value <= 1 is a fraction of the source's, > 1 a "
                "count; for a smaller model give the target_* shape fields")
        lo, hi = 0.0, 1.0  # the width factor that meets the budget with every layer, by bisection
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(shape(mid, L)) < budget else (lo, mid)
        s = hi
        if s < min_width:
            s = min_width
            L = min(range(1, L + 1), key=lambda n: abs(total(shape(s, n)) - budget))
        # the MLP width takes up what the rounding of the others left: the count is linear in it
        a, b = shape(s, L, align), shape(s, L, 2 * align)
        per_channel = (total(b) - total(a)) / align
        inter = round((budget - total(a)) / per_channel / align) * align + align
        out = shape(s, L, max(align, min(inter, src.intermediate_size)))
        if out == cls.of(src):
            raise ValueError(f"target_params={params:g} rounds to the source's own shape: nothing to prune; ask for "
                             f"less than {count_text(total(shape(1.0, L, src.intermediate_size - align)))} "
                             "parameters")
        if abs(total(out) / budget - 1) > BUDGET_TOLERANCE:  # a small model's rounding steps are coarse
            raise ValueError(f"target_params={params:g}: the nearest shape the rounding allows ({out}) has "
                             f"{count_text(total(out))} parameters, {100 * (total(out) / budget - 1):+.0f}% off the "
                             f"budget's {count_text(budget)} (more than {BUDGET_TOLERANCE:.0%}); give the target_* "
                             "shape fields instead")
        return out

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


def count_text(n: float) -> str:
    """A parameter count as people write it: 6.7B, 134.5M, 84,000."""
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,.0f}"


def total_params(cfg: ModelConfig, shape: TargetShape | None = None) -> int:
    """Every parameter (embeddings included, a tied head once) of cfg's model at `shape` (default: cfg's own)."""
    if shape is not None:
        cfg = replace(cfg, **asdict(shape), head_dim=cfg.head_dim)

    def count(layers):  # on the meta device: shapes only, no memory
        with torch.device("meta"):
            return sum(p.numel() for p in Transformer(replace(cfg, num_hidden_layers=layers)).parameters())
    one = count(1)  # every layer has the same parameters: count one and two layers, extrapolate
    return one + (cfg.num_hidden_layers - 1) * (count(2) - one)


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

    def __init__(self, shape, init_log_alpha=math.log(100.0), temperature=TEMPERATURE, limit_l=-0.1, limit_r=1.1):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(tuple(shape), float(init_log_alpha)))
        self.temperature, self.limit_l, self.limit_r = temperature, limit_l, limit_r
        self.log_alpha_range = (math.log(0.01), math.log(100.0))

    def prob_nonzero(self) -> torch.Tensor:
        # P(z > 0) = 1 - Q(0), Q the CDF of the stretched concrete: sigmoid(log_alpha - beta * ln(-l / r))
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-self.limit_l / self.limit_r))

    def sample(self, u: torch.Tensor) -> torch.Tensor:
        """A mask sample from uniform noise u (same shape as log_alpha, on its device)."""
        u = u.clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0, 1)

    def soft_value(self) -> torch.Tensor:
        # the original's deterministic gate value: sigmoid(log_alpha * magical_number / beta), magical_number 0.8, at
        # the fixed beta 2/3 (not the landing's annealed one: a checkpoint does not depend on it)
        return torch.sigmoid(self.log_alpha * 0.8 / TEMPERATURE)

    @torch.no_grad()
    def keep_top(self, k, values: str = "binary") -> torch.Tensor:
        """Mask keeping the k largest log_alpha of each row (last axis), ties to the lower index; k is an int or a
        tensor with one count per row. Kept units get 1 (values="binary") or soft_value() ("soft")."""
        la = self.log_alpha.detach().reshape(-1, self.log_alpha.shape[-1])
        order = torch.argsort(-la, dim=-1, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(la.shape[-1], device=la.device).expand_as(order))
        k = torch.as_tensor(k, device=la.device).reshape(-1, 1)
        keep = (rank < k).to(la.dtype).reshape(self.log_alpha.shape)
        return keep * self.soft_value().detach() if values == "soft" else keep

    @torch.no_grad()
    def shift_to_count_(self, count: torch.Tensor, keep: int):
        """Add one constant per row to log_alpha (then clamped to its range) so that the row's sum P(z > 0) is
        `count` (one per row), by bisection: the sum rises monotonically with the constant. The constant is bounded
        so that the row's `keep` largest units stay above the others (the clamp would otherwise tie them all at one
        end when the count is out of reach, e.g. keeping 99.5% of the units at a low temperature): then the count is
        as near as the order allows."""
        n = self.log_alpha.shape[-1]
        la = self.log_alpha.detach().reshape(-1, n).double()
        lo, hi = self.log_alpha_range
        shift = self.temperature * math.log(-self.limit_l / self.limit_r)  # as in prob_nonzero
        count = torch.as_tensor(count, dtype=la.dtype, device=la.device).reshape(-1, 1).expand(la.shape[0], 1)
        a = torch.full_like(count, lo - hi)  # every unit at the bottom of the range
        b = torch.full_like(count, hi - lo)  # every unit at the top
        for _ in range(60):  # the bracket halves each time: 60 halvings reach float64's resolution
            c = (a + b) / 2
            high = torch.sigmoid((la + c).clamp(lo, hi) - shift).sum(-1, keepdim=True) > count
            a, b = torch.where(high, a, c), torch.where(high, c, b)
        c = (a + b) / 2
        top = la.sort(-1, descending=True).values
        if 0 < keep < n:  # the keep-th unit stays above the bottom, the next one below the top
            c = torch.minimum(torch.maximum(c, lo - top[:, keep - 1:keep] + 1e-3), hi - top[:, keep:keep + 1] - 1e-3)
        self.log_alpha.copy_((la + c).clamp(lo, hi).view_as(self.log_alpha))

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


def mask_generator(seed: int, step: int, row: int) -> torch.Generator:
    """The CPU generator for one micro-batch's masks, seeded by (seed, step, index of the micro-batch's first row
    in the global batch) through numpy's SeedSequence, so nearby keys give unrelated streams."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, row]).generate_state(1, np.uint64)[0]))


class L0Module(nn.Module):
    def __init__(self, cfg: ModelConfig, target: TargetShape, masks=MASKS, warmup_steps: int = 0,
                 start_sparsity: float = 0.0, values: str = "binary", steps: int = 0, landing_steps: int = 0,
                 landing_temperature: float = TEMPERATURE):
        """warmup_steps: of the target-sparsity schedule; values: "soft" | "binary", the kept units' value in
        expected_masks and deterministic_masks; steps, landing_steps: the pruning stage's length and its last
        steps that land on the target (land_); landing_temperature: the gates' temperature at the end of the
        landing's first half (annealed from 2/3, see set_step_)."""
        super().__init__()
        target.validate(cfg)
        unknown = set(masks) - set(MASKS)
        if unknown or not masks:
            raise ValueError(f"unknown pruning masks {sorted(unknown)}; choose from {MASKS}")
        if values not in ("soft", "binary"):
            raise ValueError(f"mask values {values!r}: choose soft or binary")
        if not 0 <= landing_steps <= steps:
            raise ValueError(f"landing_steps={landing_steps} must be in [0, steps={steps}]")
        if not 0 < landing_temperature <= TEMPERATURE:
            raise ValueError(f"landing_temperature={landing_temperature} must be in (0, {TEMPERATURE:.4g}]")
        self.cfg, self.target = cfg, target
        self.warmup_steps, self.start_sparsity = warmup_steps, start_sparsity
        self.values, self.steps, self.landing_steps = values, steps, landing_steps
        self.landing_temperature = landing_temperature
        L, d, nkv, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.intermediate_size
        # name -> (mask shape, number of units kept per row at the target)
        spec = {"layer": ((L,), target.num_hidden_layers), "head": ((L, nkv), target.num_key_value_heads),
                "intermediate": ((L, I), target.intermediate_size), "hidden": ((d,), target.hidden_size)}
        for name, (shape, k) in spec.items():
            if name not in masks and k != shape[-1]:
                raise ValueError(f"the target changes the {name} dimension ({shape[-1]} -> {k}) but {name!r} is "
                                 f"not among the pruned masks {list(masks)}")
        # a mask type whose target keeps all its units is not pruned (see the module doc)
        self.names = [m for m in MASKS if m in masks and spec[m][1] < spec[m][0][-1]]
        if not self.names:
            raise ValueError("the target shape equals the source model's: there is nothing to prune")
        self.keep = {m: spec[m][1] for m in self.names}
        self.z = nn.ModuleDict({m: HardConcrete(spec[m][0]) for m in self.names})
        # one (lambda_1, lambda_2) pair per mask, both starting at 0
        self.lambdas = nn.ParameterDict({f"lambda_{i}_{m}": nn.Parameter(torch.zeros(())) for m in self.names
                                         for i in (1, 2)})
        self.prunable = prunable_params(cfg)
        self.final_sparsity = 1 - prunable_params(cfg, target) / self.prunable

    def _check_precision(self):
        dtype = self.z[self.names[0]].log_alpha.dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"L0Module holds {dtype} parameters; keep it in float32, outside FSDP mixed precision "
                            "(reduced precision moves the hard-concrete init and the expected sparsity)")

    def forward(self, generator: torch.Generator | None = None) -> dict:
        """Training: one mask sample, its noise drawn from `generator` (a CPU generator, see mask_generator) as
        one CPU tensor and copied to the device once. Eval: expected_masks()."""
        self._check_precision()
        if not self.training:
            return self.expected_masks()
        las = [self.z[m].log_alpha for m in self.names]
        u = torch.rand(sum(la.numel() for la in las), generator=generator, dtype=las[0].dtype)
        if las[0].device.type == "cuda":
            u = u.pin_memory()  # so the copy below is asynchronous: no stream sync in the training step
        u = u.to(las[0].device, non_blocking=True).split([la.numel() for la in las])
        return {f"{m}_z": self.z[m].sample(ui.view_as(la)) for m, ui, la in zip(self.names, u, las)}

    @torch.no_grad()
    def init_from_importance(self, scores: dict, band: float = 3.0) -> dict:
        """Start every gate's log_alpha by its unit's importance rank within its row (as keep_top ranks): the most
        important unit at the top of the clamp range (ln 100), the least important `band` below it, linear in the
        rank. At band 3 every gate still starts open with P(z > 0) >= 0.96, so step 0 computes nearly the source's
        function; what the ranks decide is which units the Lagrangian pushes out first, and which ones compaction
        drops if the gates never move. scores: {mask name: tensor of its log_alpha's shape, larger = more
        important} (activation_importance). Returns the ranks, 0 = most important."""
        ranks = {}
        for m in self.names:
            la = self.z[m].log_alpha
            s = scores[m].to(la.device, torch.float64).reshape(-1, la.shape[-1])
            order = torch.argsort(-s, dim=-1, stable=True)  # ties: the lower index ranks first
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1], device=la.device)
                                                    .expand_as(order))
            top = self.z[m].log_alpha_range[1]
            la.copy_((top - band * rank / max(s.shape[-1] - 1, 1)).view_as(la))
            ranks[m] = rank.view_as(la)
        return ranks

    @torch.no_grad()
    def expected_masks(self) -> dict:
        """Masks of the size the gates currently describe: per row the round(sum P(z > 0)) units with the largest
        log_alpha (ties to the lower index), kept values as `values`. Used to evaluate while pruning."""
        return {f"{m}_z": self.z[m].keep_top(self.z[m].prob_nonzero().sum(-1).round(), self.values)
                for m in self.names}

    @torch.no_grad()
    def deterministic_masks(self) -> dict:
        """Masks keeping exactly the target's units per row: what compaction (model.prune) uses."""
        return {f"{m}_z": self.z[m].keep_top(self.keep[m], self.values) for m in self.names}

    def landing(self, step: int) -> bool:
        """Whether `step` is one of the last landing_steps of pruning, where land_ holds the target."""
        return self.landing_steps > 0 and step >= self.steps - self.landing_steps

    def temperature(self, step: int) -> float:
        """The gates' temperature beta at `step`: 2/3 until the landing, then linear to landing_temperature over
        the landing's first half (reached at its last step), then constant. A lower beta makes a sample z nearly a
        Bernoulli(sigmoid(log_alpha)) draw of 0 or 1, so the model trains with the masks it will be compacted to."""
        beta = TEMPERATURE
        j = step - (self.steps - self.landing_steps)
        if self.landing_steps == 0 or j < 0:
            return beta
        return beta + (self.landing_temperature - beta) * min(1.0, (j + 1) / math.ceil(self.landing_steps / 2))

    def set_step_(self, step: int):
        """Set every gate's temperature for `step` (train.py calls it before each step's evaluation and training;
        it is a function of the step, so a resumed run gets the same)."""
        for z in self.z.values():
            z.temperature = self.temperature(step)

    @torch.no_grad()
    def land_(self, step: int):
        """After the optimizer step of `step` in the landing (else a no-op): move each row's expected kept count
        towards the target's by shifting its log_alpha, by 1 / (steps left in the first half of the landing) of the
        remaining gap, and onto it exactly from there on (see the module doc)."""
        if not self.landing(step):
            return
        self.set_step_(step)
        left = math.ceil(self.landing_steps / 2) - (step - (self.steps - self.landing_steps))
        for m in self.names:
            z = self.z[m]
            count = z.prob_nonzero().detach().sum(-1).double()
            z.shift_to_count_(count + (self.keep[m] - count) / max(1, left), self.keep[m])

    def constrain_(self):
        """Keep log_alpha in [ln 0.01, ln 100]; call after every optimizer step."""
        for z in self.z.values():
            z.constrain_()

    @torch.no_grad()
    def all_reduce_grads_(self):
        """Average the gradients over the ranks of the default process group (one all-reduce); a no-op in one
        process. The module is replicated, so every rank then takes the same optimizer step."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        params = [p for p in self.parameters() if p.grad is not None]
        if params:
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat)  # SUM: gloo has no AVG
            flat /= dist.get_world_size()
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))

    # -------------------------------------------------------------------------
    # expected size, schedule, Lagrangian

    def expected_num_params(self) -> torch.Tensor:
        self._check_precision()
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
        self._check_precision()
        return {m: 1 - self.z[m].prob_nonzero().mean(-1) for m in self.names}

    def _schedule(self, step: int, final: float) -> float:
        # linear warm-up from start_sparsity to the final target over warmup_steps, then constant
        frac = min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return self.start_sparsity + (final - self.start_sparsity) * frac

    def target_sparsity(self, step: int) -> dict:
        """Per-mask target sparsity at `step` on the warm-up schedule (1 - kept/units per row after it)."""
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
        """Floats for logging: expected and scheduled target sparsity per mask and overall (`target_sparsity`,
        on the warm-up schedule), the final target (`final_sparsity`), the expected size, the lambdas."""
        e, t = self.expected_sparsity(), self.target_sparsity(step)
        out = {f"expected_{m}_sparsity": float(e[m].mean()) for m in self.names}
        out.update({f"target_{m}_sparsity": float(t[m]) for m in self.names})
        n = float(self.expected_num_params())
        out.update(expected_num_params=n, expected_sparsity=1 - n / self.prunable,
                   target_sparsity=self._schedule(step, self.final_sparsity), final_sparsity=self.final_sparsity)
        out.update({k: float(v) for k, v in self.lambdas.items()})
        return out


@torch.no_grad()
def activation_importance(model, batches, reduce=None) -> dict:
    """Activation-based importance of every prunable unit (Minitron), from forward passes over `batches`, an
    iterable of (x, y) token batches. Per unit, the mean over all tokens of:
      layer         1 - cos(block input, block output): how much the block changes the residual stream
      head          |attention output of the key/value group| (L2 over its query heads' outputs, o_proj's input)
      intermediate  |act(gate) * up| (GELU MLP: |act(up)|), down_proj's input
      hidden        |output of each input_layernorm and post_attention_layernorm|, summed over the layers
    reduce: applied to each (sums, count) tensor, e.g. an all-reduce when every rank saw its own rows. Returns
    {mask name: tensor shaped like its log_alpha}, on the CPU, in float64."""
    cfg = model.config
    L, nkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    dev = next(model.parameters()).device
    sums = {"layer": torch.zeros(L, dtype=torch.float64, device=dev),
            "head": torch.zeros(L, nkv, dtype=torch.float64, device=dev),
            "intermediate": torch.zeros(L, cfg.intermediate_size, dtype=torch.float64, device=dev),
            "hidden": torch.zeros(cfg.hidden_size, dtype=torch.float64, device=dev)}
    hooks = []
    for i, block in enumerate(model.model.layers):
        def on_block(mod, args, out, i=i):
            x, y = args[0].double(), out.double()
            sums["layer"][i] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum()

        def on_heads(mod, args, i=i):
            a = args[0]  # (B, T, H * hs): query head j belongs to key/value group j // group
            sums["head"][i] += a.reshape(*a.shape[:-1], nkv, -1).double().norm(dim=-1).sum((0, 1))

        def on_mlp(mod, args, i=i):
            sums["intermediate"][i] += args[0].double().abs().sum((0, 1))

        def on_norm(mod, args, out):
            sums["hidden"].add_(out.double().abs().sum((0, 1)))
        hooks += [block.register_forward_hook(on_block), block.self_attn.o_proj.register_forward_pre_hook(on_heads),
                  block.mlp.down_proj.register_forward_pre_hook(on_mlp),
                  block.input_layernorm.register_forward_hook(on_norm),
                  block.post_attention_layernorm.register_forward_hook(on_norm)]
    tokens = torch.zeros((), dtype=torch.float64, device=dev)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            with torch.no_grad():
                model(x.to(dev), y.to(dev), reduction="none")  # the loss path: no (B, T, V) logits
            tokens += x.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if reduce is not None:
        for t in (*sums.values(), tokens):
            reduce(t)
    return {k: (v / tokens).cpu() for k, v in sums.items()}
