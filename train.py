"""
Prune a pretrained model to a target shape while a domain weighter schedules the data, compact it, and continue
pretraining the smaller model: one loop, one process or many, resumable at any step.

    python train.py config/tiny.py --out_dir=out/tiny                          # one process (CPU, or one GPU)
    torchrun --standalone --nproc_per_node=8 train.py config/prune_llama2.py    # one node, FSDP2
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py config/prune_llama2.py                                        # on every node (shared out_dir)

A config file is plain Python assignments to TrainConfig fields; `--key=value` overrides them. Running the same
command again resumes an unfinished out_dir from its latest checkpoint (exactly: same batches, masks, weights).

    python train.py eval MODEL [MODEL ...] --data_dir=data/demo   # per-domain validation loss / perplexity
    python train.py report out/demo                               # what a run did: source, pruned, final models

Stages. `prune` (prune_steps) trains the weights, the hard-concrete gates (log_alpha) and the Lagrange multipliers
(lambda, maximised) with the target-sparsity warm-up, one mask sample per micro-batch, and evaluation with masks
of the current expected size. Then the deterministic masks compact the model (gather -> prune_state_dict ->
re-shard), it is exported to out_dir/pruned/, and `cpt` (cpt_steps) continues pretraining the compact model with
its own optimizer, schedule, batch and a fresh domain weighter. Either stage may be 0 steps.

The loss is the mean over all target tokens of the global batch (independent of world size and accumulation).
Per-domain sums of the per-token training losses feed the weighter every step; per-domain validation losses feed
its update every eval_interval; every rank computes the same proportions, rank 0's are broadcast anyway.

Outputs in out_dir: config.json (resolved config), metrics.jsonl, plots/*.png, checkpoints/ (the last
keep_checkpoints; model and optimizer sharded with torch.distributed.checkpoint), pruned/ and hf/ (Hugging Face
directories), masks.pt (final masks, log_alpha and lambdas), done.json once finished.
"""

import ast
import datetime
import difflib
import fcntl
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

import convert
import dro
from data import DomainBins, MixtureSampler
from l0 import L0Module, TargetShape, mask_generator, total_params
from model import ModelConfig, Transformer, prune_state_dict


@dataclass
class TrainConfig:
    # I/O
    init_from: str = "models/smollm2-135m"  # HF dir, cached hub id, .gguf, or an earlier run's out_dir (its hf/)
    data_dir: str = "data/demo"  # written by prepare.py
    out_dir: str = "out/run"
    overwrite: bool = False  # start over in an out_dir that holds a run with another config
    allow_changes: str = ""  # comma-separated keys that may differ from the config of the run being resumed
    seed: int = 1337
    # target shape for pruning; 0 keeps the source's (query heads follow from the source's group size)
    target_hidden_size: int = 0
    target_num_hidden_layers: int = 0
    target_num_key_value_heads: int = 0
    target_intermediate_size: int = 0
    target_params: float = 0  # or a budget: total parameters (1.3e9) or a fraction of the source's (0.4); sets the
    #                           target_* shape by l0.TargetShape.from_budget (width first, then depth)
    mask_init: str = "uniform"  # uniform (every log_alpha at ln 100) | importance (ranked by activations, see l0.py)
    mask_init_batches: int = 4  # global batches of the initial mixture for the importance pass
    # domain weighting (dro.parse_method): constant | sheared | bandit | dro[+eval][+dy][+dyall]
    domain_weighting: str = "dro+eval"
    # per domain: {name: value} (or a list in the data's domain order)
    domain_proportions: dict | list | None = None  # the initial (reference) mixture; None: by training tokens
    reference_loss: dict | list | str | None = None  # None: unknown, only with +dy/+dyall (fitted during training);
    #                                                  "teacher": the source model's validation loss per domain
    rho: float = 0.1  # radius of the chi^2 ball
    min_prob: float = 0.2  # every domain keeps >= min_prob x its reference share
    # pruning stage
    prune_steps: int = 3200
    prune_batch_size: int = 32  # sequences per optimizer step, over all ranks
    prune_micro_batch_size: int = 1  # sequences per forward on one rank
    prune_seq_len: int = 4096
    prune_lr: float = 1e-4
    prune_warmup: float = 0.1  # fraction of the stage's steps with a linear learning-rate warm-up
    lag_lr: float = 1.0  # learning rate of log_alpha and lambda (lambda ascends through gradient reversal)
    lambda_lr: float = 0.0  # learning rate of lambda alone; 0 = lag_lr (the reference)
    lagrangian_warmup: float = 0.2  # fraction of the pruning steps over which the target sparsity ramps up
    # distillation from the source model (a frozen teacher): loss = (1 - alpha) CE + alpha T^2 KL(teacher || student)
    distill_alpha: float = 0.0  # 0 = off: plain cross-entropy
    teacher: str = ""  # the model distilled from and measured for reference_loss="teacher"; "" = init_from
    distill_temperature: float = 1.0
    distill_prune: bool = False  # distill while pruning too (default: in continued pretraining only)
    # continued-pretraining stage
    cpt_steps: int = 0
    cpt_batch_size: int = 256
    cpt_micro_batch_size: int = 2
    cpt_seq_len: int = 4096
    cpt_lr: float = 1e-4
    cpt_warmup: float = 0.03
    # optimizer (AdamW; warm-up, then cosine decay to min_lr_ratio x lr)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global norm over the model's gradients; 0 = off
    # evaluation, logging, checkpoints
    eval_interval: int = 50
    eval_batches: int = 8  # per domain
    eval_batch_size: int = 8  # sequences per eval batch, over all ranks
    log_interval: int = 10
    save_interval: int = 400
    keep_checkpoints: int = 2  # the newest ones; 0 keeps all
    stop_at: int = 0  # stop (with a checkpoint) once the run reaches this step, e.g. a job's time limit; 0 = never
    export_dtype: str = "float32"  # of pruned/ and hf/: float32 | bfloat16
    wandb_project: str = ""  # log to Weights & Biases too (if installed)
    # system
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block


# fields that may change between the run that wrote out_dir and the one resuming it (out_dir: a moved run resumes)
RESUMABLE = {"out_dir", "overwrite", "allow_changes", "log_interval", "save_interval", "keep_checkpoints", "stop_at", "wandb_project", "compile",
             "activation_checkpointing"}
# fields that never change on resume, even in allow_changes: the checkpoints' data order and shapes follow from them
FIXED_ON_RESUME = {"init_from", "data_dir", "seed", "prune_seq_len", "cpt_seq_len", "domain_weighting",
                   "target_params", "target_hidden_size", "target_num_hidden_layers", "target_num_key_value_heads",
                   "target_intermediate_size"}


class ConfigError(ValueError):
    pass


class StopRun(Exception):
    """stop_at reached, or SIGTERM: the run is checkpointed and resumes when started again; `code` is the exit
    status (0 for stop_at, 143 = 128 + SIGTERM for a termination)."""

    def __init__(self, msg: str, code: int = 0):
        super().__init__(msg)
        self.code = code


def _coerce(name: str, value, typ: str, from_cli: bool):
    """A config value as the field's type; CLI values arrive as strings."""
    if from_cli and isinstance(value, str):
        if typ == "bool":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(f"--{name}={value}: expected true or false")
            return value.lower() in ("1", "true", "yes")
        if typ in ("int", "float"):
            try:
                return int(value) if typ == "int" else float(value)
            except ValueError:
                raise ConfigError(f"--{name}={value}: expected a number ({typ})") from None
        if typ == "numbers":
            if value.lower() in ("", "none"):
                return None
            if name == "reference_loss" and value == "teacher":
                return value
            try:
                value = ast.literal_eval(value if value.lstrip()[:1] in "[{" else f"[{value}]")
            except (ValueError, SyntaxError):
                raise ConfigError(f"--{name}={value}: expected comma-separated numbers or {{name: number}}") from None
    if typ == "bool" and isinstance(value, bool) or typ == "str" and isinstance(value, str):
        return value
    if typ == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ == "numbers":
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if value is None or name == "reference_loss" and value == "teacher":
            return value
        if isinstance(value, dict) and all(isinstance(k, str) and num(v) for k, v in value.items()):
            return {k: float(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and all(num(v) for v in value):
            return [float(v) for v in value]
        raise ConfigError(f"{name}={value!r}: expected {{domain: number}} or a list of numbers" +
                          (' or "teacher"' if name == "reference_loss" else ""))
    raise ConfigError(f"{name}={value!r}: expected {typ}")


def load_config(argv: list[str]) -> TrainConfig:
    """python train.py [config/x.py] [--key=value ...] -> a validated TrainConfig."""
    types = {f.name: "numbers" if "list" in str(f.type) else f.type.__name__ for f in fields(TrainConfig)}

    def check(name):
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            raise ConfigError(f"unknown config key {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))

    values = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"{arg}: write --key=value")
            check(key)
            values[key] = _coerce(key, val, types[key], from_cli=True)
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} not found")
            scope = {}
            try:
                exec(compile(open(arg).read(), arg, "exec"), {}, scope)
            except Exception as e:
                raise ConfigError(f"{arg}: {type(e).__name__}: {e}") from None
            for key, val in scope.items():
                if key.startswith("_") or callable(val) or type(val).__name__ == "module":
                    continue
                check(key)
                values[key] = _coerce(key, val, types[key], from_cli=False)
    cfg = TrainConfig(**values)
    for name in ("prune_steps", "cpt_steps", "keep_checkpoints", "stop_at"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 0")
    for name in ("prune_batch_size", "prune_micro_batch_size", "prune_seq_len", "cpt_batch_size",
                 "cpt_micro_batch_size", "cpt_seq_len", "eval_interval", "eval_batches", "eval_batch_size", "log_interval",
                 "save_interval"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.prune_steps == cfg.cpt_steps == 0:
        raise ConfigError("prune_steps and cpt_steps are both 0: nothing to do")
    try:
        dro.parse_method(cfg.domain_weighting)
    except ValueError as e:
        raise ConfigError(f"domain_weighting: {e}") from None
    if not 0 <= cfg.distill_alpha <= 1:
        raise ConfigError(f"distill_alpha={cfg.distill_alpha} must be in [0, 1] (0: off, 1: distillation alone)")
    if cfg.distill_temperature <= 0:
        raise ConfigError(f"distill_temperature={cfg.distill_temperature} must be > 0")
    if cfg.target_params < 0 or cfg.mask_init_batches < 1:
        raise ConfigError("target_params must be >= 0 and mask_init_batches >= 1")
    for name, choices in (("device", ("auto", "cpu", "cuda")), ("dtype", ("auto", "float32", "bfloat16")),
                          ("export_dtype", ("float32", "bfloat16")), ("mask_init", ("uniform", "importance"))):
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: choose one of {', '.join(choices)}")
    return cfg


# -----------------------------------------------------------------------------
# distributed setup, model building, state dicts

def setup_distributed(cfg: TrainConfig):
    """(rank, world, device): torchrun's environment -> a process group (NCCL on GPU, gloo on CPU)."""
    use_cuda = cfg.device == "cuda" or cfg.device == "auto" and torch.cuda.is_available()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no GPU is visible; use device=cpu")
    if "RANK" in os.environ:
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # rank 0 alone reads and exports whole models while the others wait: allow it more than the 10 min default
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu")
    return rank, world, device


def compute_dtype(cfg: TrainConfig, device) -> torch.dtype:
    if cfg.dtype == "auto":
        # on CPUs without native bf16 (AVX2 only), bf16 matmuls are many times slower than fp32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def build_model(mcfg: ModelConfig, sd: dict | None, cfg: TrainConfig, device, world: int) -> torch.nn.Module:
    """The model on `device`, from the full fp32 state dict `sd` that only rank 0 holds (None elsewhere; None on
    every rank leaves the weights uninitialised, for a checkpoint to fill). With several ranks: meta-device init,
    FSDP2 per block and root (bf16 mixed precision on GPU), then each rank receives its shards from rank 0, so no
    rank but 0 ever holds the whole model."""
    with torch.device("meta"):
        model = Transformer(mcfg)
    for block in model.model.layers:
        block.checkpoint = cfg.activation_checkpointing
        if cfg.compile:
            block.compile()
    if world == 1:
        model.to_empty(device=device)
        if mcfg.tie_word_embeddings:  # to_empty made two tensors of the shared one
            model.lm_head.weight = model.model.embed_tokens.weight
        if sd is not None:
            model.load_state_dict({**sd, "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])})
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype(cfg, device), reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)  # keeps the tied embedding tied
    if broadcast_object(sd is not None):
        if sd is not None and mcfg.tie_word_embeddings:
            sd = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}
        set_model_state_dict(model, sd if dist.get_rank() == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def full_state_dict(model) -> dict:
    """The whole model's weights on the CPU in rank 0 (an empty dict elsewhere); a collective with several ranks."""
    if not dist.is_initialized():
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resolve_init(path: str) -> str:
    """init_from as a model source: an earlier run directory stands for its final export (hf/)."""
    if os.path.isfile(os.path.join(path, "done.json")) or os.path.isdir(os.path.join(path, "checkpoints")):
        if not os.path.isfile(os.path.join(path, "hf", "config.json")):
            raise ConfigError(f"init_from={path} is a run directory without a final model (hf/); finish that run "
                              "or export one of its checkpoints with convert.py to-hf")
        return os.path.join(path, "hf")
    return path


# -----------------------------------------------------------------------------
# checkpoints: out_dir/checkpoints/<k>-<stage>-<step>/ {dcp shards, state.pt}, written aside then renamed

STAGES = ("prune", "cpt")


def checkpoint_name(stage: str, step: int) -> str:
    return f"{STAGES.index(stage)}-{stage}-{step:08d}"


class CheckpointError(Exception):
    """A checkpoint could not be written, or none can be read: the message says what is intact and what to do."""


def _error_text(e: BaseException) -> str:
    """The root cause in one line: DCP wraps a rank's OSError (disk full, ...) in a CheckpointException."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    return f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else \
        (e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {str(e).splitlines()[0]}")


def _write_durably(path: str, write, atomic: bool = False):
    """write(f) to path, on disk before this returns; atomic: through path.tmp, so that a reader (or a rerun after
    a kill) sees the old file or the new one, never half of one."""
    with open(path + ".tmp" if atomic else path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(path + ".tmp", path)


def save_checkpoint(out_dir, keep, rank, world, model, opt, state: dict):
    """Model and optimizer shards (DCP), then state.pt, then manifest.json with every file's size and sha256 (each
    rank hashes its share), all in checkpoints/.tmp-NAME, renamed to NAME once complete. Any failure (a full disk)
    on any rank removes the partial directory and raises CheckpointError on every rank; older checkpoints are
    untouched, and only once the new one is in place are those beyond `keep` deleted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    root = os.path.join(out_dir, "checkpoints")
    name = checkpoint_name(state["stage"], state["step"])
    tmp, final = os.path.join(root, ".tmp-" + name), os.path.join(root, name)

    def phase(fn):  # run fn on this rank; if it failed on any rank, clean up and fail on all of them
        try:
            out, err = fn(), None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            out, err = None, _error_text(e)
        err = next((e for e in all_gather_object(err) if e), None)
        if err is not None:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            have = [os.path.basename(p) for p in convert.checkpoints(out_dir)]
            raise CheckpointError(f"could not write checkpoint {name} ({err}); " + (
                f"{have[-1]} is intact: fix that and run the same command again to resume from it" if have else
                "there is no earlier checkpoint: fix that and run the same command again"))
        return out

    def start():
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            for d in os.listdir(root):  # leftovers of a save that was interrupted
                if d.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            os.makedirs(tmp)
    phase(start)
    msd, osd = get_state_dict(model, opt)
    phase(lambda: dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp))
    phase(lambda: rank == 0 and _write_durably(os.path.join(tmp, "state.pt"), lambda f: torch.save(state, f)))
    names = sorted(os.listdir(tmp))
    mine = phase(lambda: convert.hash_files([os.path.join(tmp, n) for n in names[rank::world]]))
    files = {os.path.basename(p): list(v) for part in all_gather_object(mine) for p, v in part.items()}

    def finish():
        if rank != 0:
            return
        manifest = json.dumps(dict(format=1, files=files), indent=1).encode()
        _write_durably(os.path.join(tmp, convert.MANIFEST), lambda f: f.write(manifest))
        if os.path.exists(final):  # the same step saved again after a resume: the new copy replaces it
            os.rename(final, tmp + "-old")
        os.rename(tmp, final)
        shutil.rmtree(tmp + "-old", ignore_errors=True)
        fd = os.open(root, os.O_RDONLY)  # the rename itself survives a power loss
        os.fsync(fd)
        os.close(fd)
    phase(finish)
    if rank == 0:
        done = convert.checkpoints(out_dir)
        for old in done[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def find_resume(out_dir, rank, world, log) -> str | None:
    """The newest checkpoint whose files match its manifest (all ranks share the hashing). A damaged one is renamed
    .damaged-NAME, kept for inspection but never loaded again, and the one before it is tried."""
    damaged = []
    for ckpt in reversed(convert.checkpoints(out_dir)):
        problem = next((p for p in all_gather_object(convert.check_checkpoint(ckpt, rank, world)) if p), None)
        if problem is None:
            return ckpt
        aside = os.path.join(os.path.dirname(ckpt), ".damaged-" + os.path.basename(ckpt))
        if rank == 0:
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(ckpt, aside)
        log(f"warning: checkpoint {ckpt} is damaged ({problem}); set aside as {aside}, trying the one before it")
        damaged.append(f"{os.path.basename(ckpt)}: {problem}")
        barrier()
    if damaged:
        raise CheckpointError(f"no undamaged checkpoint in {out_dir}/checkpoints ({'; '.join(damaged)}); they are "
                              "set aside as .damaged-*: restore them from a copy, or run the same command again to "
                              "start the run over")
    return None


def load_checkpoint_weights(path, model, opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# the stage loop

@dataclass
class Stage:
    name: str  # prune | cpt
    steps: int
    batch_size: int
    micro_batch_size: int
    seq_len: int
    lr: float
    warmup: float


def stages_of(cfg: TrainConfig) -> list[Stage]:
    out = []
    for name in STAGES:
        steps = getattr(cfg, f"{name}_steps")
        if steps:
            out.append(Stage(name, steps, getattr(cfg, f"{name}_batch_size"), getattr(cfg, f"{name}_micro_batch_size"),
                             getattr(cfg, f"{name}_seq_len"), getattr(cfg, f"{name}_lr"), getattr(cfg, f"{name}_warmup")))
    return out


def lr_factor(step: int, stage: Stage, min_ratio: float) -> float:
    """Linear warm-up over warmup x steps, then cosine decay to min_ratio (of every group's peak)."""
    warm = int(stage.warmup * stage.steps)
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, stage.steps - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


class Run:
    """Everything one process needs across stages: config, data, model, L0, optimizers, weighter, logging."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed(cfg)
        self.master = self.rank == 0
        self.dtype = compute_dtype(cfg, self.device)
        try:
            self.bins = DomainBins(cfg.data_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.domains = self.bins.domains
        p = self.per_domain("domain_proportions", cfg.domain_proportions) or [len(t) for t in self.bins.train]
        self.teacher = None  # the frozen source model, when distilling or measuring references against it
        self.reference_loss = (None if cfg.reference_loss == "teacher" else
                               self.per_domain("reference_loss", cfg.reference_loss))
        if cfg.domain_proportions is not None and (min(p) < 0 or abs(sum(p) - 1) > 1e-3):
            raise ConfigError(f"domain_proportions={cfg.domain_proportions} must be >= 0 and sum to 1 (they sum to "
                              f"{sum(p):.6g}); they are the initial share of each domain in the training mixture")
        if self.reference_loss is not None and not all(0 < v < math.inf for v in self.reference_loss):
            raise ConfigError(f"reference_loss={cfg.reference_loss}: every value must be a positive finite loss "
                              "(nats/token)")
        self.p0 = np.asarray(p, dtype=np.float64) / np.sum(p)
        try:  # a placeholder for the teacher's losses, which are measured when a stage starts
            self.make_weighter([1.0] * len(self.domains) if cfg.reference_loss == "teacher" else None)
        except ValueError as e:
            raise ConfigError(f"domain_weighting={cfg.domain_weighting!r}: {e}") from None
        self.stages = stages_of(cfg)
        for s in self.stages:
            if s.batch_size % (self.world * s.micro_batch_size):
                raise ConfigError(f"{s.name}_batch_size={s.batch_size} must be a multiple of world size {self.world} "
                                  f"x {s.name}_micro_batch_size={s.micro_batch_size}")
        if cfg.eval_batch_size % self.world:
            raise ConfigError(f"eval_batch_size={cfg.eval_batch_size} must be a multiple of world size {self.world}")
        for s in self.stages:  # data too short for a stage fails now, not after the stages before it
            try:
                MixtureSampler(self.bins, s.seq_len, s.batch_size)
                for d in self.domains:
                    self.bins.val_batches(d, s.seq_len, cfg.eval_batch_size, cfg.eval_batches, 0, self.world)
            except ValueError as e:
                raise ConfigError(f"{s.name} stage: {e}") from None
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.wandb = None
        self.sigterm = False  # set by the SIGTERM handler; read at the end of each step, all ranks together

    def per_domain(self, name, value) -> list | None:
        """A {domain: value} dict or a list in the data's domain order -> a list in the data's domain order."""
        if value is None:
            return None
        if isinstance(value, dict):
            if set(value) != set(self.domains):
                raise ConfigError(f"{name} names {sorted(value)} but {self.cfg.data_dir} has the domains "
                                  f"{self.domains}")
            return [value[d] for d in self.domains]
        if len(value) != len(self.domains):
            raise ConfigError(f"{name} has {len(value)} values but {self.cfg.data_dir} has {len(self.domains)} "
                              f"domains: need one value per domain of {self.domains}")
        return list(value)

    # ---------------------------------------------------------------- logging

    def log(self, msg: str):
        if self.master:
            print(msg, flush=True)

    def record(self, row: dict):
        if not self.master:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row)

    # ---------------------------------------------------------------- pieces of a stage

    def make_weighter(self, reference=None) -> dro.DomainWeighter:
        c = self.cfg
        return dro.DomainWeighter(self.domains, self.p0, c.domain_weighting,
                                  self.reference_loss if reference is None else reference, rho=c.rho,
                                  min_prob=c.min_prob, seed=c.seed)

    def make_optimizer(self, model, stage: Stage):
        c = self.cfg
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # CPU: the fused kernel, one pass over the state (6.4x faster than the for-loop on SmolLM2's 134M weights:
        # 48 vs 308 ms, 6% of a training step; bench/speed.py --rows adamw); GPU: foreach, the default
        cpu = self.device.type == "cpu"
        return torch.optim.AdamW(groups, lr=stage.lr, betas=(c.beta1, c.beta2), eps=1e-8,
                                 fused=cpu or None, foreach=None if cpu else True)

    def evaluate(self, model, masks, seq_len) -> np.ndarray:
        c = self.cfg
        with self.autocast():
            val = evaluate(model, self.bins, seq_len, c.eval_batch_size, c.eval_batches, masks, self.rank,
                           self.world, self.device)
        reshard(model)
        return val

    def autocast(self):
        # FSDP2 applies mixed precision itself (bf16 weights and residual stream); one process uses autocast (fp32
        # weights and residual stream, bf16 matmuls), so the two agree closely in bf16, exactly only in fp32
        use = self.world == 1 and self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=use)

    # ---------------------------------------------------------------- one stage

    def run_stage(self, stage: Stage, model, state: dict, l0: L0Module | None, l0_opt, resume_path: str | None):
        c = self.cfg
        sampler = MixtureSampler(self.bins, stage.seq_len, stage.batch_size, seed=c.seed + STAGES.index(stage.name))
        reference = None
        if c.reference_loss == "teacher":  # measured where the stage starts, on the batches its evaluations use
            reference = self.evaluate(self.teacher, None, stage.seq_len).tolist()
            self.log(f"{stage.name}: reference losses = the source model's validation losses: " +
                     ", ".join(f"{d} {v:.3f}" for d, v in zip(self.domains, reference)))
        weighter = self.make_weighter(reference)
        kd = self.teacher is not None and c.distill_alpha > 0 and (stage.name == "cpt" or c.distill_prune)
        opt = self.make_optimizer(model, stage)
        step = 0
        if resume_path is not None:
            load_checkpoint_weights(resume_path, model, opt)
            sampler.load_state_dict(state["sampler"])
            weighter.load_state_dict(state["weighter"])
            step = state["step"]
            self.log(f"resumed {stage.name} at step {step} from {resume_path}")
        offset = sum(s.steps for s in self.stages[:self.stages.index(stage)])
        B, mb, T = stage.batch_size, stage.micro_batch_size, stage.seq_len
        rows = B // self.world
        lo = self.rank * rows
        D = len(self.domains)
        bar = None
        if self.master:
            from tqdm import tqdm
            bar = tqdm(total=stage.steps, initial=step, desc=stage.name, dynamic_ncols=True, leave=True,
                       disable=not sys.stderr.isatty())
        saved = step if resume_path is not None else None  # the step of the newest checkpoint of this stage
        # training time and tokens of this stage (evaluation and checkpoints excluded), carried across resumes
        self.clock = dict(state.get("clock", {})) if resume_path is not None else {"seconds": 0.0, "tokens": 0}
        if step == 0:  # where the stage starts, for the plots (no weighter update)
            self.eval_and_update(stage, model, l0, weighter, step, offset, update=False)
            if stage.name == "cpt" and offset and resume_path is None:  # right after compaction: never prune twice
                self.save(model, opt, None, None, sampler, weighter, stage.name, step)
                saved = step
        t0, tokens_since, terminated = time.perf_counter(), 0, False
        while step < stage.steps:
            t_step = time.perf_counter()
            if c.stop_at and offset + step >= c.stop_at:
                if saved != step:
                    self.save(model, opt, l0, l0_opt, sampler, weighter, stage.name, step)
                raise StopRun(f"stopped at step {offset + step} (stop_at={c.stop_at}) with a checkpoint; run again "
                              "without stop_at (or with a later one) to resume")
            if terminated:  # a scheduler's SIGTERM before its SIGKILL: keep the steps done since the last save
                if saved != step:
                    self.save(model, opt, l0, l0_opt, sampler, weighter, stage.name, step)
                raise StopRun(f"terminated (SIGTERM) at step {offset + step}, with a checkpoint; run the same command "
                              "again to resume", code=143)
            f = lr_factor(step, stage, c.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = stage.lr * f
            if l0 is not None:
                for g, lr in zip(l0_opt.param_groups, (c.lag_lr, c.lambda_lr or c.lag_lr)):
                    g["lr"] = lr * f  # the reference schedules the mask and lambda groups like the model
            x, y, dom = sampler.next(weighter.proportions, self.rank, self.world)
            x, y, dom = x.to(self.device), y.to(self.device), dom.to(self.device)
            n_tokens = B * T  # every position is a target in these windows
            loss_sums = torch.zeros(D, dtype=torch.float64, device=self.device)
            counts = torch.zeros(D, dtype=torch.float64, device=self.device)
            kd_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
            # FSDP2 reduce-scatters after every micro-batch: skipping it would hold unsharded fp32 gradients
            for i in range(0, rows, mb):
                masks = l0(mask_generator(c.seed, step, lo + i)) if l0 is not None else None
                with self.autocast():
                    if kd:  # the objective per token, and its cross-entropy part for the weighter and the logs
                        with torch.no_grad():
                            teacher = (self.teacher.hidden(x[i:i + mb]), self.teacher.lm_head.weight, c.distill_alpha,
                                       c.distill_temperature)
                        tok, ce = model(x[i:i + mb], y[i:i + mb], masks=masks, reduction="none", teacher=teacher)
                        kd_sum += tok.detach().double().sum()
                    else:
                        tok = ce = model(x[i:i + mb], y[i:i + mb], masks=masks, reduction="none")  # (mb, T)
                # x world: FSDP averages the gradients over ranks, and the loss is a mean over the global batch
                (tok.sum() * (self.world / n_tokens)).backward()
                loss_sums.index_add_(0, dom[i:i + mb], ce.detach().double().sum(1))
                counts.index_add_(0, dom[i:i + mb], (y[i:i + mb] != -100).sum(1).double())
            if l0 is not None:
                l0.lagrangian(step).backward()
                l0.all_reduce_grads_()
            # one all-reduce per step: per-domain loss sums and token counts, the distillation objective's sum, and
            # whether any rank got SIGTERM (so that every rank stops at the same step boundary)
            stats = torch.cat([loss_sums, counts, kd_sum, kd_sum.new_tensor([float(self.sigterm)])])
            all_reduce(stats)
            loss_sums, counts, kd_sum, terminated = stats[:D], stats[D:2 * D], stats[2 * D], bool(stats[-1] > 0)
            loss = float(loss_sums.sum() / counts.sum())  # cross-entropy, also when the objective is distillation
            if kd:
                kd_loss = float(kd_sum / counts.sum())
                loss = loss if math.isfinite(kd_loss) else kd_loss
            if not math.isfinite(loss):
                raise FloatingPointError(f"{stage.name} step {step}: the training loss is {loss}; stopping. "
                                         + self.nan_advice(stage))
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip if c.grad_clip > 0 else math.inf)
            gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            if not math.isfinite(gnorm):  # before the step: no NaN ever reaches the weights or a checkpoint
                raise FloatingPointError(f"{stage.name} step {step}: the gradient norm is {gnorm}; stopping. "
                                         + self.nan_advice(stage))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if l0 is not None:
                l0_opt.step()
                l0_opt.zero_grad(set_to_none=True)
                l0.constrain_()
            weighter.observe_train(loss_sums.cpu().numpy(), counts.cpu().numpy())
            step += 1
            tokens_since += n_tokens
            self.clock["tokens"] += n_tokens
            self.clock["seconds"] += time.perf_counter() - t_step
            if bar is not None:
                bar.update(1)
            if step % c.log_interval == 0 or step == stage.steps:
                dt = time.perf_counter() - t0
                row = dict(stage=stage.name, step=step, iter=offset + step, loss=loss, lr=stage.lr * f,
                           grad_norm=gnorm, tokens_per_s=tokens_since / dt, **({"distill_loss": kd_loss} if kd else {}))
                row.update({f"train/{n}": float(s / k) for n, s, k in zip(self.domains, loss_sums.tolist(),
                                                                           counts.tolist()) if k})
                if l0 is not None:
                    row.update(l0.stats(step))
                msg = (f"{stage.name} {step}/{stage.steps} | loss {loss:.4f}" + (f" (distill {kd_loss:.4f})" if kd else "")
                       + f" | lr {stage.lr * f:.2e} | {tokens_since / dt:,.0f} tok/s")
                if self.device.type == "cuda":
                    row["mfu"] = mfu(model, tokens_since / dt, self.world, T)
                    msg += f" | mfu {row['mfu']:.1%}" if row["mfu"] else ""
                if l0 is not None:
                    msg += (f" | sparsity {row['expected_sparsity']:.3f} -> {row['target_sparsity']:.3f}"
                            f" (final {row['final_sparsity']:.3f})")
                self.record(row)
                (bar.write if bar is not None and not bar.disable else self.log)(msg)
                tokens_since = 0
            if step % c.eval_interval == 0 or step == stage.steps:
                self.eval_and_update(stage, model, l0, weighter, step, offset, update=True)
            if step % c.save_interval == 0 and step < stage.steps:
                self.save(model, opt, l0, l0_opt, sampler, weighter, stage.name, step)
                saved = step
            t0 = time.perf_counter() if step % c.log_interval == 0 else t0  # evaluation and saving are not training
        if bar is not None:
            bar.close()
        row = dict(stage=stage.name, step=step, iter=offset + step, stage_seconds=self.clock["seconds"],
                   stage_tokens=self.clock["tokens"], stage_tokens_per_s=self.clock["tokens"] / max(self.clock["seconds"], 1e-9),
                   peak_memory_gb=peak_memory_gb(self.device))
        if l0 is not None:  # how far the gates got: compaction cuts what they have not given up yet
            st = l0.stats(step)
            row.update(compaction_expected_sparsity=st["expected_sparsity"], compaction_final_sparsity=st["final_sparsity"])
            self.log(f"prune end: expected sparsity {st['expected_sparsity']:.3f}, target {st['final_sparsity']:.3f} "
                     f"(gap {st['expected_sparsity'] - st['final_sparsity']:+.3f}); compacting to the target")
        self.record(row)

    def nan_advice(self, stage: Stage) -> str:
        return (f"The checkpoints in {self.cfg.out_dir}/checkpoints are intact: resume from the last one with a lower "
                f"learning rate, e.g. --{stage.name}_lr={stage.lr / 2:g} --allow_changes={stage.name}_lr")

    def eval_and_update(self, stage, model, l0, weighter, step, offset, update: bool):
        c = self.cfg
        masks = l0.expected_masks() if l0 is not None else None
        val = self.evaluate(model, masks, stage.seq_len)
        row = dict(stage=stage.name, step=step, iter=offset + step)
        row.update({f"val/{n}": float(v) for n, v in zip(self.domains, val)})
        st = l0.stats(step) if l0 is not None else {}
        if update:
            weighter.update(step, max_steps=stage.steps, val_losses=val,
                            expected_sparsity=st.get("expected_sparsity"), final_sparsity=st.get("final_sparsity"))
            if self.world > 1:  # identical on every rank by construction; rank 0's is authoritative
                q = torch.tensor(weighter.q, dtype=torch.float64, device=self.device)  # NCCL: on the GPU
                dist.broadcast(q, 0)
                weighter.q = q.cpu().numpy()
        row.update(weighter.stats())
        if l0 is not None:
            row.update({k: v for k, v in st.items() if "sparsity" in k})
        self.record(row)
        self.log(f"{stage.name} {step}/{stage.steps} eval | " + " ".join(
            f"{n} {v:.3f} ({w:.3f})" for n, v, w in zip(self.domains, val, weighter.q)) + "  [val loss (weight)]")
        if self.master:
            plot_metrics(c.out_dir)

    def save(self, model, opt, l0, l0_opt, sampler, weighter, stage: str, step: int):
        state = dict(stage=stage, step=step, config=asdict(self.cfg), model_config=asdict(model.config),
                     src_path=os.path.abspath(self.src_path), clock=dict(self.clock), sampler=sampler.state_dict(),
                     weighter=weighter.state_dict(), l0=None if l0 is None else to_cpu(l0.state_dict()),
                     l0_opt=None if l0 is None else to_cpu(l0_opt.state_dict()))
        save_checkpoint(self.cfg.out_dir, self.cfg.keep_checkpoints, self.rank, self.world, model, opt, state)
        self.log(f"saved checkpoint {checkpoint_name(stage, step)}")

    # ---------------------------------------------------------------- the whole run

    def make_l0(self, mcfg: ModelConfig) -> L0Module:
        c = self.cfg
        nkv = c.target_num_key_value_heads or mcfg.num_key_value_heads
        if not 1 <= nkv <= mcfg.num_key_value_heads:  # query heads follow from it: name the field the user set
            raise ConfigError(f"target_num_key_value_heads={nkv} must be in [1, {mcfg.num_key_value_heads}] "
                              "(the source model's)")
        try:
            target = TargetShape.resolve(mcfg, **asdict(c))
            if c.target_params:
                n = total_params(mcfg, target)
                self.log(f"target_params={c.target_params:g} -> target {describe_target(target)} ({n / 1e6:,.1f}M "
                         "parameters)")
            l0 = L0Module(mcfg, target, warmup_steps=int(c.lagrangian_warmup * c.prune_steps))
        except ValueError as e:
            raise ConfigError(str(e) if str(e).startswith("target") else f"target shape: {e}") from None
        return l0.to(self.device)

    def load_source(self, path) -> tuple[ModelConfig, dict | None]:
        """(config, weights) of a model: rank 0 reads the weights, the others get the config (and any error, so
        that none waits for rank 0)."""
        mcfg = sd = error = None
        if self.master:
            try:
                mcfg, sd = convert.load_hf(path)
            except (convert.ConvertError, ValueError, OSError) as e:
                error = str(e)
        mcfg, error = broadcast_object((mcfg, error))
        if error:
            raise convert.ConvertError(error)
        return mcfg, sd

    def build_teacher(self, mcfg: ModelConfig, sd: dict | None) -> Transformer:
        """The frozen source model (sd on rank 0 only). Its blocks are sharded like the student's (FSDP2, bf16 on
        GPU); the embedding, final norm and lm_head stay whole on every rank, since the distillation loss reads the
        head's weight chunk by chunk inside the student's forward, outside any forward of the teacher."""
        with torch.device("meta"):
            teacher = Transformer(mcfg)
        if self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mp = MixedPrecisionPolicy(param_dtype=compute_dtype(self.cfg, self.device), reduce_dtype=torch.float32)
            for block in teacher.model.layers:
                fully_shard(block, mp_policy=mp)
        teacher.to_empty(device=self.device)
        if mcfg.tie_word_embeddings:
            teacher.lm_head.weight = teacher.model.embed_tokens.weight
        sd = sd if sd is None or not mcfg.tie_word_embeddings else {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}
        if self.world > 1:
            set_model_state_dict(teacher, sd if self.master else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            teacher.load_state_dict(sd)
        teacher.requires_grad_(False)
        return teacher.eval()

    def init_masks_from_importance(self, model, l0: L0Module, stage: Stage):
        """log_alpha from activation importance over mask_init_batches global batches of the initial mixture,
        drawn by a sampler of their own (the training batches stay those of a uniform-init run)."""
        from l0 import activation_importance
        c = self.cfg
        sampler = MixtureSampler(self.bins, stage.seq_len, stage.batch_size, seed=c.seed + 1000)

        def batches():
            for _ in range(c.mask_init_batches):
                x, y, _ = sampler.next(self.p0, self.rank, self.world)
                for i in range(0, len(x), stage.micro_batch_size):
                    yield x[i:i + stage.micro_batch_size], y[i:i + stage.micro_batch_size]
        with self.autocast():
            scores = activation_importance(model, batches(), reduce=all_reduce)
        reshard(model)
        ranks = l0.init_from_importance(scores)
        msg = f"mask_init=importance over {c.mask_init_batches * stage.batch_size * stage.seq_len:,} tokens"
        if "layer" in ranks:
            order = torch.argsort(ranks["layer"], descending=True)[:5].tolist()
            msg += f"; least important layers first: {order}"
        self.log(msg + "; log_alpha set by rank within each mask")

    def make_l0_optimizer(self, l0):
        c = self.cfg
        # weight decay 0: decoupled decay would shrink lambda, which ascends by gradient reversal
        return torch.optim.AdamW([{"params": [z.log_alpha for z in l0.z.values()], "lr": c.lag_lr},
                                  {"params": list(l0.lambdas.values()), "lr": c.lambda_lr or c.lag_lr}],
                                 betas=(c.beta1, c.beta2), eps=1e-8, weight_decay=0.0)

    def main(self, resume: str | None):
        """The run from its start, or from the checkpoint `resume` (one that find_resume checked)."""
        c = self.cfg
        state = torch.load(os.path.join(resume, "state.pt"), map_location="cpu", weights_only=False) if resume else None
        src_path = convert._resolve(resolve_init(c.init_from))
        teacher_path = convert._resolve(resolve_init(c.teacher)) if c.teacher else src_path
        need_teacher = c.reference_loss == "teacher" or c.distill_alpha > 0 and (c.cpt_steps > 0 or c.distill_prune)
        mcfg = sd = tcfg = tsd = None
        if state is None:
            mcfg, sd = self.load_source(src_path)
        else:  # resuming: the weights come from the checkpoint
            mcfg = ModelConfig(**state["model_config"])
        self.src_path = src_path
        self.check_data(mcfg, src_path)
        if need_teacher:
            tcfg, tsd = (mcfg, sd) if teacher_path == src_path and state is None else self.load_source(teacher_path)
            self.check_data(tcfg, teacher_path)
            self.teacher = self.build_teacher(tcfg, tsd if self.master else None)
        del tsd
        if self.master and c.wandb_project:
            try:
                import wandb
                self.wandb = wandb
                wandb.init(project=c.wandb_project, name=os.path.basename(os.path.abspath(c.out_dir)),
                           config=asdict(c), resume="allow")
            except ImportError:
                print("wandb_project is set but wandb is not installed (pip install wandb); not logging to it")
        stage_names = [s.name for s in self.stages]
        start = stage_names.index(state["stage"]) if state is not None else 0
        for si in range(start, len(self.stages)):
            stage = self.stages[si]
            resuming = state is not None and si == start
            # resuming: the weights come from the checkpoint (sd is None)
            model = build_model(mcfg, sd if self.master else None, c, self.device, self.world)
            sd = None
            l0 = l0_opt = None
            if stage.name == "prune":
                l0 = self.make_l0(mcfg)
                l0_opt = self.make_l0_optimizer(l0)
                if resuming:
                    l0.load_state_dict(state["l0"])
                    l0_opt.load_state_dict(state["l0_opt"])
                elif c.mask_init == "importance":
                    self.init_masks_from_importance(model, l0, stage)
            self.log(f"stage {stage.name}: {stage.steps} steps of {stage.batch_size} x {stage.seq_len} tokens on "
                     f"{self.world} process(es), {self.device.type}, {str(self.dtype).removeprefix('torch.')}; "
                     f"model {describe(mcfg)}" + (f" -> target {describe_target(l0.target)}" if l0 else ""))
            self.run_stage(stage, model, state if resuming else None, l0, l0_opt, resume if resuming else None)
            full = full_state_dict(model)
            del model
            if stage.name == "prune":  # compact: gathered on rank 0, re-sharded when the next stage builds it
                masks = l0.deterministic_masks()
                if self.master:
                    mcfg, sd = prune_state_dict(mcfg, full, masks)
                    save_masks(c.out_dir, l0, masks)
                    self.export(mcfg, sd, "pruned")
                mcfg = broadcast_object(mcfg)
            else:
                sd = full
            if si + 1 == len(self.stages) and self.master:
                self.export(mcfg, sd, "hf")
        barrier()
        if self.master:
            done = json.dumps(dict(model_config=asdict(mcfg), hf=os.path.join(c.out_dir, "hf")), indent=1).encode()
            _write_durably(os.path.join(c.out_dir, "done.json"), lambda f: f.write(done), atomic=True)
            plot_metrics(c.out_dir)
        self.log(f"done: {os.path.join(c.out_dir, 'hf')} ({describe(mcfg)})")

    def check_data(self, mcfg, src_path):
        import prepare
        try:
            fp = prepare.tokenizer_fingerprint(src_path) if os.path.isdir(src_path) else None
        except prepare.PrepareError:
            fp = None  # no tokenizer files beside the model: only the vocabulary size can be checked
        try:
            self.bins.check_compatible(mcfg.vocab_size, fp)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def export(self, mcfg, sd, name):
        model = Transformer.from_state_dict(mcfg, {k: v.float() for k, v in sd.items()})
        out = os.path.join(self.cfg.out_dir, name)
        convert.export_hf(model, out, tokenizer_src=self.src_path, dtype=getattr(torch, self.cfg.export_dtype),
                          force=True)
        self.log(f"exported {out} ({describe(mcfg)})")


# -----------------------------------------------------------------------------
# helpers

@torch.no_grad()
def evaluate(model, bins: DomainBins, seq_len: int, batch_size: int, batches: int, masks=None, rank: int = 0,
             world: int = 1, device="cpu") -> np.ndarray:
    """Per-domain mean validation loss (nats/token) over fixed batches, the same every time; all ranks together."""
    sums = torch.zeros(len(bins.domains), 2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for d in range(len(bins.domains)):
        for x, y in bins.val_batches(d, seq_len, batch_size, batches, rank, world):
            x, y = x.to(device), y.to(device)
            sums[d, 0] += model(x, y, masks=masks, reduction="none").double().sum()
            sums[d, 1] += (y != -100).sum()
    model.train(was_training)
    all_reduce(sums)
    return (sums[:, 0] / sums[:, 1]).cpu().numpy()


def peak_memory_gb(device) -> float:
    """The process's peak memory so far: GPU memory allocated on a GPU, resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def to_cpu(obj):
    """A (nested) state dict with its tensors on the CPU: checkpoints load anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def reshard(model):
    """After forwards without a backward: FSDP2 leaves the root's parameters unsharded after the first forward (a
    backward would reshard them), and an optimizer or a checkpoint must see the sharded ones."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        model.reshard()


def all_reduce(t: torch.Tensor):
    if dist.is_initialized():
        dist.all_reduce(t)


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def describe(m: ModelConfig) -> str:
    return (f"{m.num_hidden_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads}/{m.num_key_value_heads} "
            f"heads, intermediate {m.intermediate_size}")


def describe_target(t: TargetShape) -> str:
    return (f"{t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads}/{t.num_key_value_heads} "
            f"heads, intermediate {t.intermediate_size}")


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16


def mfu(model, tokens_per_s: float, world: int, T: int) -> float:
    """Model-FLOPs utilisation: ModelConfig.flops_per_token against the GPU's dense bf16 peak."""
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak is None:
        return 0.0
    return model.config.flops_per_token(T) * tokens_per_s / (peak * world)


def save_masks(out_dir, l0, masks):
    obj = dict(masks={k: v.cpu() for k, v in masks.items()},
               log_alpha={m: z.log_alpha.detach().cpu() for m, z in l0.z.items()},
               lambdas={k: float(v.detach()) for k, v in l0.lambdas.items()}, target=asdict(l0.target),
               source_config=asdict(l0.cfg))
    _write_durably(os.path.join(out_dir, "masks.pt"), lambda f: torch.save(obj, f), atomic=True)


def read_metrics(out_dir) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:  # the last line, cut by a kill or a full disk; the resumed run writes it again
                pass
    return rows


def truncate_metrics(out_dir, stage: str, step: int):
    """On resume, drop the lines written after the checkpoint (they will be written again)."""
    rows = read_metrics(out_dir)
    pos = (STAGES.index(stage), step)
    # lines of the checkpoint's own step stay, except at step 0, whose evaluation the resumed stage repeats
    keep = [r for r in rows if (STAGES.index(r["stage"]), r["step"]) < pos or (r["stage"], r["step"]) == (stage, step)
            and step > 0]
    text = "".join(json.dumps(r) + "\n" for r in keep).encode()  # rewritten always: drops a cut last line too
    _write_durably(os.path.join(out_dir, "metrics.jsonl"), lambda f: f.write(text), atomic=True)


def plot_metrics(out_dir):
    """plots/weights.png, plots/val_loss.png, plots/sparsity.png from metrics.jsonl, against the global step."""
    rows = read_metrics(out_dir)
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    switch = next((r["iter"] for r in rows if r["stage"] == "cpt"), None)

    def series(prefix):
        keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
        return {k[len(prefix):]: [(r["iter"], r[k]) for r in rows if k in r] for k in keys}

    panels = [("weights", "weight/", "domain weight"), ("val_loss", "val/", "validation loss (nats/token)")]
    for name, prefix, ylabel in panels:
        data = series(prefix)
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, pts in data.items():
            ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 30 else None)
        if switch is not None:
            ax.axvline(switch, color="gray", ls=":", label="compaction")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "plots", f"{name}.png"), dpi=110)
        plt.close(fig)
    pts = [(r["iter"], r["expected_sparsity"], r["target_sparsity"]) for r in rows if "expected_sparsity" in r]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4))
        it, e, t = zip(*pts)
        ax.plot(it, e, label="expected")
        ax.plot(it, t, label="target (warm-up schedule)", ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("sparsity of the prunable weights")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "plots", "sparsity.png"), dpi=110)
        plt.close(fig)


# -----------------------------------------------------------------------------
# evaluation and the end-of-run report: python train.py eval MODEL ... / python train.py report RUN_DIR

def load_model(path: str) -> Transformer:
    """An HF directory, cached hub id, .gguf, or a run directory (its hf/, else its latest checkpoint)."""
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "done.json")):
        if os.path.isfile(os.path.join(path, "hf", "config.json")):
            path = os.path.join(path, "hf")
        else:
            cfg, sd, _ = convert.load_run(path)
            return Transformer.from_state_dict(cfg, sd)
    return Transformer.from_pretrained(path)


def loss_table(domains, rows) -> str:
    """rows: (name, params, per-domain losses) -> a table of loss (perplexity) with the mean and worst domain."""
    w = max(12, *(len(r[0]) for r in rows))
    head = f"{'model':<{w}} {'params':>8} " + " ".join(f"{d[:15]:>15}" for d in domains) + f" {'mean':>15} {'worst':>15}"
    lines = [head, "-" * len(head)]
    for name, params, losses in rows:
        cells = [f"{v:.3f} ({math.exp(v):.1f})" for v in losses]
        worst = int(np.argmax(losses))
        lines.append(f"{name:<{w}} {params / 1e6:>7.2f}M " + " ".join(f"{c:>15}" for c in cells) +
                     f" {np.mean(losses):>15.3f} {domains[worst][:9] + f' {losses[worst]:.3f}':>15}")
    return "\n".join(lines) + "\n(validation loss in nats/token, perplexity in brackets)"


def eval_main(argv) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="train.py eval", description="Per-domain validation loss and perplexity of "
                                 "models (HF directory, hub id, .gguf, or run directory) on a prepared dataset.")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data_dir", default="data/demo")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8, help="per domain")
    args = ap.parse_args(argv)
    try:
        bins = DomainBins(args.data_dir)
        rows = []
        for path in args.models:
            model = load_model(path)
            bins.check_compatible(model.config.vocab_size)
            rows.append((path, sum(p.numel() for p in model.parameters()),
                         evaluate(model, bins, args.seq_len, args.batch_size, args.batches)))
    except (ValueError, OSError, convert.ConvertError) as e:
        print(f"train.py eval: error: {e}", file=sys.stderr)
        return 1
    print(loss_table(bins.domains, rows))
    return 0


def report_main(argv) -> int:
    """What a run did: the source, the pruned and the final model on the same validation batches, the domain
    weights, the time per stage, and a greedy completion from the exported model loaded with transformers."""
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "config.json")):
        print("usage: python train.py report RUN_DIR (a train.py out_dir)", file=sys.stderr)
        return 2
    run = argv[0]
    with open(os.path.join(run, "config.json")) as f:
        c = TrainConfig(**json.load(f))
    bins = DomainBins(c.data_dir)
    seq_len = c.cpt_seq_len if c.cpt_steps else c.prune_seq_len
    rows = []
    for name, path in (("source", resolve_init(c.init_from)), ("pruned", os.path.join(run, "pruned")),
                       ("final", os.path.join(run, "hf"))):
        if name == "pruned" and (not c.prune_steps or not c.cpt_steps) or not os.path.exists(path):
            continue
        model = load_model(path)
        rows.append((name, sum(p.numel() for p in model.parameters()),
                     evaluate(model, bins, seq_len, c.eval_batch_size, c.eval_batches)))
    print(f"\n{run}: {c.eval_batches} x {c.eval_batch_size} sequences of {seq_len} tokens per domain")
    print(loss_table(bins.domains, rows))
    metrics = read_metrics(run)
    for stage in STAGES:
        w = [r for r in metrics if r["stage"] == stage and "weight/" + bins.domains[0] in r]
        if w:
            print(f"{stage} domain weights, first -> last evaluation: " + ", ".join(
                f"{d} {w[0]['weight/' + d]:.3f} -> {w[-1]['weight/' + d]:.3f}" for d in bins.domains))
    for r in metrics:
        if "stage_seconds" in r:
            extra = (f"; gates at compaction: expected sparsity {r['compaction_expected_sparsity']:.3f} vs target "
                     f"{r['compaction_final_sparsity']:.3f}" if "compaction_expected_sparsity" in r else "")
            print(f"{r['stage']}: {r['step']} steps, {r['stage_seconds']:.0f} s of training, "
                  f"{r['stage_tokens_per_s']:,.0f} tokens/s, peak memory {r['peak_memory_gb']:.2f} GB{extra}")
    hf = os.path.join(run, "hf")
    if os.path.isfile(os.path.join(hf, "tokenizer.json")) or os.path.isfile(os.path.join(hf, "tokenizer.model")):
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(hf)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        prompt = "The GNU General Public License is"
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        print(f"greedy completion by {hf} (transformers): {tok.decode(out[0], skip_special_tokens=True)!r}")
    return 0


def lock_out_dir(out_dir: str, master: bool):
    """An exclusive lock on out_dir/.lock for the whole run, so that two runs never write one out_dir. flock: the
    OS releases it when the process ends, however it ends, so a killed run leaves no stale lock. Returns the open
    file (keep it) on rank 0; every rank raises if another process holds it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir={out_dir} exists and is not a directory; choose another out_dir")
    held = f = None
    if master:
        try:
            os.makedirs(out_dir, exist_ok=True)
            f = open(os.path.join(out_dir, ".lock"), "a+")
        except OSError as e:
            raise ConfigError(f"cannot write in out_dir={out_dir} ({e.strerror}); choose a writable out_dir") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
        except BlockingIOError:
            f.seek(0)
            held = f.read().strip() or "?"
            f.close()
    held = broadcast_object(held)
    if held is not None:
        raise ConfigError(f"{out_dir} is in use by another train.py run (pid {held}); wait for it to finish, or "
                          "use another out_dir")
    return f


def prepare_out_dir(cfg: TrainConfig, master: bool, log=print) -> str:
    """'run' | 'done'. An out_dir holding a run with another config is refused, listing the keys that differ,
    unless they are in allow_changes (resume with them changed) or overwrite (start over)."""
    path = os.path.join(cfg.out_dir, "config.json")
    status = "run"
    if os.path.isfile(path):
        started = os.path.isfile(os.path.join(cfg.out_dir, "done.json")) or convert.checkpoints(cfg.out_dir)
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            old = None
        if not isinstance(old, dict):
            if started and not cfg.overwrite:
                raise ConfigError(f"{path} is corrupted; restore it, or pass --overwrite=true to start the run in "
                                  f"{cfg.out_dir} over")
            old = {"config.json": "corrupted"}  # differs from any config
        mine = asdict(cfg)
        allowed = {k.strip() for k in cfg.allow_changes.split(",") if k.strip()}
        diff = sorted(k for k in set(old) | set(mine) if k not in RESUMABLE and old.get(k) != mine.get(k))
        if diff and not started:  # an attempt that failed before its first checkpoint: nothing to protect or resume
            diff = []
        if diff and not cfg.overwrite:
            if set(diff) - allowed:
                refused = [k for k in diff if k not in allowed]
                raise ConfigError(f"{cfg.out_dir} holds a run with another config ({', '.join(refused)} differ); use "
                                  f"another out_dir, --allow_changes={','.join(refused)} to resume it with the new "
                                  "values, or --overwrite=true to start it over")
            fixed = [k for k in diff if k in FIXED_ON_RESUME]
            if fixed:
                raise ConfigError(f"{', '.join(fixed)} cannot change when resuming {cfg.out_dir} (its checkpoints' "
                                  "data order and shapes depend on them); use another out_dir, or --overwrite=true")
            log(f"resuming {cfg.out_dir} with a changed config: " + ", ".join(
                f"{k} {old.get(k)!r} -> {mine.get(k)!r}" for k in diff))
        elif diff:  # overwrite: start over
            if master:
                for name in ("checkpoints", "pruned", "hf", "plots", "metrics.jsonl", "masks.pt", "done.json"):
                    p = os.path.join(cfg.out_dir, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.path.exists(p) and os.remove(p)
        elif os.path.isfile(os.path.join(cfg.out_dir, "done.json")):
            status = "done"
    barrier()
    if master and status != "done":
        os.makedirs(cfg.out_dir, exist_ok=True)
        text = json.dumps(asdict(cfg), indent=1).encode()
        _write_durably(path, lambda f: f.write(text), atomic=True)
    return status


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    # one process saves its checkpoint with torch.distributed.checkpoint too, which says so at every save
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    lock = old_sigterm = None
    try:
        cfg = load_config(argv)
        run = Run(cfg)
        lock = lock_out_dir(cfg.out_dir, run.master)  # held until the run ends

        def on_sigterm(signum, frame):
            run.sigterm = True
        if threading.current_thread() is threading.main_thread():  # (signal handlers live in the main thread)
            old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
        if prepare_out_dir(cfg, run.master, run.log) == "done":
            run.log(f"{cfg.out_dir} is a finished run (done.json); its model is in {cfg.out_dir}/hf. Nothing to do.")
            return 0
        ckpt = find_resume(cfg.out_dir, run.rank, run.world, run.log)
        if run.master and ckpt is not None:
            st = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=False)
            truncate_metrics(cfg.out_dir, st["stage"], st["step"])
        elif run.master and os.path.exists(run.metrics_path):  # starting (over): no earlier lines belong to it
            os.remove(run.metrics_path)
        barrier()
        run.main(ckpt)
        barrier()  # leave together: a rank tearing gloo down while another still talks to it can abort
    except StopRun as e:
        run.log(str(e))
        barrier()
        return e.code
    except (ConfigError, convert.ConvertError, CheckpointError, FileNotFoundError, FloatingPointError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:  # Ctrl-C: a save in progress is left as .tmp-*, never taken for a checkpoint
        if not dist.is_initialized() or dist.get_rank() == 0:
            have = [os.path.basename(p) for p in convert.checkpoints(cfg.out_dir)] if "cfg" in locals() else []
            print("train.py: interrupted" + (f"; checkpoint {have[-1]} is intact: run the same command again to "
                                             "resume from it" if have else ""), file=sys.stderr)
        return 130
    except OSError as e:  # writing metrics, plots or an export (a full disk): the checkpoints are intact
        if not dist.is_initialized() or dist.get_rank() == 0:
            have = [os.path.basename(p) for p in convert.checkpoints(cfg.out_dir)] if "cfg" in locals() else []
            print(f"train.py: error: {_error_text(e)}" + (f"; the checkpoints in {cfg.out_dir}/checkpoints are "
                  "intact: fix that and run the same command again to resume" if have else ""), file=sys.stderr)
        return 1
    finally:
        if lock is not None:  # released now, not when a traceback holding this frame is collected
            lock.close()
        if old_sigterm is not None:  # in-process callers (tests, notebooks) get their handler back
            signal.signal(signal.SIGTERM, old_sigterm)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
