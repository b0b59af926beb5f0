"""
Prune a pretrained model to a target shape while a domain weighter schedules the data, compact it, and continue
pretraining the smaller model: one loop, one process or many, resumable at any step.

    python train.py config/tiny.py --out_dir=out/tiny                          # one process (CPU, or one GPU)
    torchrun --standalone --nproc_per_node=8 train.py config/prune_llama2.py    # one node, FSDP2
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py config/prune_llama2.py                                        # on every node (shared out_dir)
    python train.py eval MODEL [MODEL ...] --data_dir=data/demo   # per-domain validation loss (report.py)
    python train.py report out/demo                               # what a run did (report.py)

A config file is plain Python assignments to TrainConfig fields; `--key=value` overrides them. Running the same
command again resumes an unfinished out_dir from its latest checkpoint (exactly: same batches, masks, weights);
checkpoint.py describes the run directory.

Stages. `prune` (prune_steps) trains the weights, the hard-concrete gates (log_alpha) and the Lagrange multipliers
(lambda, maximised) with the target-sparsity warm-up, one mask sample per micro-batch, and evaluation with masks
of the current expected size; the last prune_landing of its steps put every mask exactly on its target (l0.py). Then
the deterministic masks compact the model (gather -> prune_state_dict -> re-shard), it is exported to
out_dir/pruned/, and `cpt` (cpt_steps) continues pretraining the compact model with its own optimizer, schedule,
batch and a fresh domain weighter. Either stage may be 0 steps: prune_steps=0 with mask_init=importance is one-shot
pruning (compaction straight from the importance ranking), with from_scratch=true the from-scratch control.

The loss is the mean over all target tokens of the global batch (independent of world size and accumulation).
Per-domain sums of the per-token training losses feed the weighter every step; per-domain validation losses feed
its update every eval_interval; every rank computes the same proportions, rank 0's are broadcast anyway.

Reading order: TrainConfig and load_config; setup_distributed and build_model; Run (data and the per-stage
pieces); then the loop in execution order: train -> start_stage -> run_stage -> train_step / evaluate_and_update
/ save -> finish_stage; main last.
"""

import ast
import datetime
import difflib
import math
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import checkpoint
import convert
import dro
import report
from checkpoint import STAGES, CheckpointError, RunDir, RunDirError, all_reduce, barrier, broadcast_object
from data import DomainBins, MixtureSampler, tokenizer_fingerprint
from l0 import L0Module, TargetShape, activation_importance, count_text, mask_generator, total_params
from model import ModelConfig, Transformer, prune_state_dict, tied_state_dict


class ConfigError(ValueError):
    pass


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
    mask_init: str = "uniform"  # uniform (every log_alpha at ln 100) | importance (ranked by activations, see l0.py);
    #                             with prune_steps=0, importance is one-shot pruning: compact straight from the ranking.
    #                             Keep lag_lr small with it (config/demo.py: 0.02): Adam moves each log_alpha by about
    #                             lag_lr a step, and the ranking spans 3, so at 0.5 a few steps reorder it
    mask_init_batches: int = 4  # global batches of the initial mixture for the importance pass
    mask_values: str = "binary"  # kept units at evaluation and compaction: binary (1; better on the demo, see
    #                              docs/results.md) | soft (the gate value sigmoid(1.2 log_alpha), folded: the original)
    from_scratch: bool = False  # the control: train init_from's architecture at the target shape from random weights
    #                             (as Hugging Face initialises the family), with prune_steps=0: cpt_steps is the budget
    # domain weighting (dro.parse_method): constant | sheared | bandit | dro[+eval][+dy][+dyall]
    domain_weighting: str = "dro+eval"
    # per domain: {name: value} (or a list in the data's domain order)
    domain_proportions: dict | list | None = None  # the initial (reference) mixture; None: by training tokens
    reference_loss: dict | list | str | None = None  # None: unknown, only with +dy/+dyall (fitted during training);
    #                                                  "teacher": the source model's validation loss per domain
    rho: float = 0.1  # radius of the chi^2 ball
    min_prob: float = 0.2  # every domain keeps >= min_prob x its reference share
    loss_ema: float = 0.1  # rate of the training-loss EMA the weighter reads (without +eval), per optimizer step
    #                        (the original: per micro-batch, so its horizon depends on the world size; docs/method.md)
    rescale_reference: bool = True  # when every domain is below its reference, scale the references by 0.9, 0.8, ...
    #                                 until one is not (the original's rule; it changes the weights, dro.py)
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
    prune_landing: float = 0.1  # the last fraction of the pruning steps, in which a projection replaces the
    #                             Lagrangian and lands every mask exactly on its target (l0.py); 0 = off (the original)
    landing_temperature: float = 0.2  # the gates' temperature, annealed from 2/3 to it over the landing's first
    #                                   half: lower, and the samples are nearly 0 or 1 (l0.py); 2/3 = no annealing
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
    grad_clip: float = 1.0  # one global norm over the model's and the masks' and lambdas' gradients; 0 = off
    # evaluation, logging, checkpoints
    eval_interval: int = 50
    eval_batches: int = 8  # per domain
    eval_batch_size: int = 8  # sequences per eval batch, over all ranks
    log_interval: int = 10
    save_interval: int = 400
    keep_checkpoints: int = 2  # the newest ones; 0 keeps all
    stop_at: int = 0  # stop (with a checkpoint) once the run reaches this step, e.g. a job's time limit; 0 = never
    # downstream tasks (report.TASKS), zero-shot: the model entering each stage (the source, then the compacted one)
    # and the final model are scored, into metrics.jsonl and the report
    eval_tasks: str = ""  # comma-separated task names, or all; "" = none
    eval_tasks_limit: int = 0  # the first N validation examples of each task; 0 = all of them
    eval_tasks_dir: str = report.TASKS_DIR  # their data (make tasks)
    export_dtype: str = "float32"  # of pruned/ and hf/: float32 | bfloat16
    wandb_project: str = ""  # log to Weights & Biases too (if installed)
    tensorboard_dir: str = ""  # write the numbers for TensorBoard there too (needs `pip install tensorboard`)
    # system
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 where native: GPU, AVX512-BF16/AMX CPU; else float32) | float32 | bfloat16
    compile: str = "auto"  # torch.compile each block's training forward (Block.compile_): auto (on GPU) | true | false
    # memory against speed, per stage (docs/operations.md, "Memory plan"): the defaults hold the least memory
    prune_activation_checkpointing: int = 0  # recompute every k-th block in the backward (1: all); 0 = off
    cpt_activation_checkpointing: int = 0
    # several processes (FSDP2)
    prune_reshard_after_forward: bool = True  # False: keep each block's gathered weights from its forward to its
    cpt_reshard_after_forward: bool = True  #    backward (one all-gather a micro-batch less; + the bf16 model per GPU)
    prune_defer_grad_sync: bool = False  # True: reduce-scatter the gradients once a step, after the last
    cpt_defer_grad_sync: bool = False  #   micro-batch, not after each (+ the fp32 gradients, unsharded, per GPU)
    dp_replicate: int = 1  # HSDP: shard the model within groups of world / dp_replicate ranks (a node) and
    #                        replicate it across the groups (nodes); 1 = shard over all ranks (FSDP)
    collective_timeout: int = 600  # seconds a collective of the training loop waits for the other ranks before the
    #                                run fails (a hang costs this of every GPU); the waits while rank 0 alone
    #                                loads, compacts or exports a model have RANK0_TIMEOUT

    def __post_init__(self):
        """Everything that can be checked without the data, the model or the world size."""
        for name in ("prune_steps", "cpt_steps", "keep_checkpoints", "stop_at", "eval_tasks_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("prune_batch_size", "prune_micro_batch_size", "prune_seq_len", "cpt_batch_size",
                     "cpt_micro_batch_size", "cpt_seq_len", "eval_interval", "eval_batches", "eval_batch_size",
                     "log_interval", "save_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.prune_steps == self.cpt_steps == 0 and not self.one_shot:
            raise ConfigError("prune_steps and cpt_steps are both 0: nothing to do")
        if not 0 <= self.prune_landing <= 1 or not 0 < self.loss_ema <= 1:
            raise ConfigError(f"prune_landing={self.prune_landing} must be in [0, 1] and loss_ema={self.loss_ema} in "
                              "(0, 1]")
        if not 0 < self.landing_temperature <= 2 / 3:
            raise ConfigError(f"landing_temperature={self.landing_temperature} must be in (0, 2/3]")
        if self.from_scratch and (self.prune_steps or self.mask_init != "uniform"):
            raise ConfigError("from_scratch trains the target shape directly: set prune_steps=0 (and mask_init="
                              "uniform) and give the token budget to cpt_steps")
        try:
            dro.parse_method(self.domain_weighting)
        except ValueError as e:
            raise ConfigError(f"domain_weighting: {e}") from None
        if isinstance(self.reference_loss, str) and self.reference_loss != "teacher":
            raise ConfigError(f"reference_loss={self.reference_loss!r}: expected comma-separated numbers, "
                              '{domain: number} or "teacher"')
        if not 0 <= self.distill_alpha <= 1:
            raise ConfigError(f"distill_alpha={self.distill_alpha} must be in [0, 1] (0: off, 1: distillation alone)")
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature={self.distill_temperature} must be > 0")
        if self.eval_tasks:
            try:
                report.task_names(self.eval_tasks)
            except ValueError as e:
                raise ConfigError(f"eval_tasks: {e}") from None
        if self.target_params < 0 or self.mask_init_batches < 1:
            raise ConfigError("target_params must be >= 0 and mask_init_batches >= 1")
        if self.dp_replicate < 1 or self.collective_timeout < 1 or any(
                getattr(self, f"{s}_activation_checkpointing") < 0 for s in STAGES):
            raise ConfigError("dp_replicate and collective_timeout must be >= 1, *_activation_checkpointing >= 0")
        for name, choices in (("device", ("auto", "cpu", "cuda")), ("dtype", ("auto", "float32", "bfloat16")),
                              ("compile", ("auto", "true", "false")),
                              ("export_dtype", ("float32", "bfloat16")), ("mask_init", ("uniform", "importance")),
                              ("mask_values", ("soft", "binary"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(choices)}")

    @property
    def one_shot(self) -> bool:
        """prune_steps=0 with mask_init=importance: a pruning stage of no steps compacts by the importance ranking."""
        return self.prune_steps == 0 and self.mask_init == "importance"

    @property
    def teacher_reference(self) -> bool:
        """reference_loss="teacher": the reference losses are the teacher's, measured where each stage starts."""
        return self.reference_loss == "teacher"

    def distills(self, stage: str) -> bool:
        return self.distill_alpha > 0 and (stage == "cpt" or self.distill_prune)


PLOT_EVERY = 300  # seconds: plots/ is redrawn at an evaluation at most this often (drawing costs ~1 s), and at the
#                   end of every stage
# fields that may change between the run that wrote out_dir and the one resuming it (out_dir: a moved run resumes)
# (and the speed settings, which change no number: activation_checkpointing is the field of runs before the per-stage
# ones), dp_replicate included: DCP re-shards a checkpoint to any layout
RESUMABLE = {"out_dir", "overwrite", "allow_changes", "log_interval", "save_interval", "keep_checkpoints", "stop_at",
             "wandb_project", "tensorboard_dir", "eval_tasks_dir", "compile", "activation_checkpointing",
             "collective_timeout", "dp_replicate",
             *(f"{s}_{k}" for s in STAGES for k in ("activation_checkpointing", "reshard_after_forward",
                                                    "defer_grad_sync"))}
SHAPE_FIELDS = {"target_hidden_size", "target_num_hidden_layers", "target_num_key_value_heads", "target_intermediate_size"}
TARGET_FIELDS = SHAPE_FIELDS | {"target_params"}  # the target: a shape or a parameter budget (load_config)
# fields that never change on resume, even in allow_changes: the checkpoints' data order and shapes follow from them
FIXED_ON_RESUME = {"init_from", "data_dir", "seed", "prune_seq_len", "cpt_seq_len", "domain_weighting",
                   "from_scratch", "target_params", "target_hidden_size", "target_num_hidden_layers",
                   "target_num_key_value_heads", "target_intermediate_size"}


def _coerce(name: str, value, typ: str, from_cli: bool):
    """A config value as the field's type ("numbers": {domain: number} or a list; "numbers|str" also a word, which
    TrainConfig checks); values from the command line arrive as strings."""
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    words = typ == "numbers|str"
    if from_cli and isinstance(value, str) and typ != "str":
        try:
            if typ == "bool":
                return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[value.lower()]
            if typ in ("int", "float"):
                return int(value) if typ == "int" else float(value)
            if value.lower() in ("", "none"):
                return None
            if not (words and value.isidentifier()):
                value = ast.literal_eval(value if value.lstrip()[:1] in "[{" else f"[{value}]")
        except (KeyError, ValueError, SyntaxError):
            expected = {"bool": "true or false", "int": "a number (int)", "float": "a number (float)"}
            raise ConfigError(f"--{name}={value}: expected " +
                              expected.get(typ, "comma-separated numbers or {name: number}")) from None
    if typ == "bool" and isinstance(value, bool) or typ == "str" and isinstance(value, str):
        return value
    if typ == "str" and isinstance(value, bool):  # compile = True in a config file
        return str(value).lower()
    if typ in ("int", "float") and num(value) and (typ == "float" or isinstance(value, int)):
        return value if typ == "int" else float(value)
    if typ.startswith("numbers"):
        if value is None or words and isinstance(value, str):
            return value
        if isinstance(value, dict) and all(isinstance(k, str) and num(v) for k, v in value.items()):
            return {k: float(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and all(num(v) for v in value):
            return [float(v) for v in value]
        raise ConfigError(f"{name}={value!r}: expected {{domain: number}} or a list of numbers" +
                          (" or a word" if words else ""))
    raise ConfigError(f"{name}={value!r}: expected {typ}")


def load_config(argv: list[str]) -> TrainConfig:
    """python train.py [config/x.py] [--key=value ...] -> a validated TrainConfig."""
    def kind(t) -> str:
        return ("numbers|str" if "str" in str(t) else "numbers") if "list" in str(t) else t.__name__
    types = {f.name: kind(f.type) for f in fields(TrainConfig)}

    def check(name):
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            raise ConfigError(f"unknown config key {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))

    values, origin = {}, {}  # key -> the index in argv of the file or option that set it

    def put(key, val, i):
        # the target is one setting given one of two ways: a budget from a later file or option replaces an earlier
        # shape (--target_params=0.5 on top of config/demo.py) and the other way round; both in one place is an error
        for other in ((SHAPE_FIELDS if key == "target_params" else {"target_params"}) if key in TARGET_FIELDS else ()):
            if origin.get(other, i) < i:
                values.pop(other)
                origin.pop(other)
        values[key], origin[key] = val, i

    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"{arg}: write --key=value")
            check(key)
            put(key, _coerce(key, val, types[key], from_cli=True), i)
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
                put(key, _coerce(key, val, types[key], from_cli=False), i)
    return TrainConfig(**values)


class StopRun(Exception):
    """stop_at reached, or SIGTERM: the run is checkpointed and resumes when started again; `code` is the exit
    status (0 for stop_at, 143 = 128 + SIGTERM for a termination)."""

    def __init__(self, msg: str, code: int = 0):
        super().__init__(msg)
        self.code = code


# -----------------------------------------------------------------------------
# distributed setup and model building

RANK0_TIMEOUT = datetime.timedelta(hours=2)  # rank 0 alone reads, compacts and exports whole models (minutes for 7B)


def setup_distributed(cfg: TrainConfig):
    """(rank, world, device, mesh): torchrun's environment -> a process group (NCCL on GPU, gloo on CPU) with
    collective_timeout, the device mesh FSDP2 shards over (2-D for HSDP: (replicate, shard)), and a gloo group with
    RANK0_TIMEOUT for everything that waits on one rank's work: rank 0's phases, checkpoint writes and hashing
    (checkpoint.py's barrier and object collectives). One process: mesh None."""
    use_cuda = cfg.device == "cuda" or cfg.device == "auto" and torch.cuda.is_available()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no GPU is visible; use device=cpu")
    rank, world, mesh = 0, 1, None
    if "RANK" in os.environ:
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.collective_timeout))
        rank, world = dist.get_rank(), dist.get_world_size()
        checkpoint.set_control_group(dist.new_group(backend="gloo", timeout=RANK0_TIMEOUT))
        if world % cfg.dp_replicate:
            raise ConfigError(f"dp_replicate={cfg.dp_replicate} must divide the world size {world}")
        from torch.distributed.device_mesh import init_device_mesh
        if cfg.dp_replicate > 1:  # new groups per mesh dimension: they get the training loop's timeout too
            opts = dist.ProcessGroupNCCL.Options() if use_cuda else dist.ProcessGroupGloo._Options()
            opts._timeout = datetime.timedelta(seconds=cfg.collective_timeout)
            mesh = init_device_mesh("cuda" if use_cuda else "cpu", (cfg.dp_replicate, world // cfg.dp_replicate),
                                    mesh_dim_names=("replicate", "shard"),
                                    backend_override={d: ("nccl" if use_cuda else "gloo", opts)
                                                      for d in ("replicate", "shard")})
        else:  # the default group
            mesh = init_device_mesh("cuda" if use_cuda else "cpu", (world,), mesh_dim_names=("shard",))
    elif cfg.dp_replicate > 1:
        raise ConfigError(f"dp_replicate={cfg.dp_replicate} needs several processes (torchrun)")
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu")
    return rank, world, device, mesh


def native_bf16(device) -> bool:
    """Does the device multiply in bf16 natively? A GPU does; so does a CPU with AVX512-BF16 or AMX (Zen 4, Cooper
    Lake, Sapphire Rapids and later), where oneDNN's bf16 matmuls run at 4-5x its fp32 rate. An AVX2-only CPU
    emulates them, many times slower than fp32."""
    if device.type == "cuda":
        return True
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def compute_dtype(cfg: TrainConfig, device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, cfg.dtype)


def compiles(cfg: TrainConfig, device) -> bool:
    return cfg.compile == "true" or cfg.compile == "auto" and device.type == "cuda"


def build_model(mcfg: ModelConfig, sd: dict | None, cfg: TrainConfig, device, mesh, stage: "Stage | None" = None,
                frozen: bool = False) -> torch.nn.Module:
    """The model on `device`, from the full fp32 state dict `sd` that only rank 0 holds (None elsewhere; None on
    every rank leaves the weights uninitialised, for a checkpoint to fill), set up for `stage` (its activation
    checkpointing and resharding). With a mesh (several ranks): meta-device init, FSDP2 per block and root (bf16
    mixed precision on GPU), then each rank receives its shards from rank 0, so no rank but 0 ever holds the whole
    model. frozen (the teacher): no gradients, eval mode, and only the blocks are sharded, each resharded right
    after its forward: its embedding, final norm and lm_head stay whole on every rank, since the distillation loss
    reads the head's weight chunk by chunk inside the student's forward, outside any forward of the teacher."""
    with torch.device("meta"):
        model = Transformer(mcfg)
    for i, block in enumerate(model.model.layers):
        if not frozen:  # (the teacher only runs without gradients: eager, as every evaluation)
            every = stage.activation_checkpointing
            block.checkpoint = every > 0 and i % every == 0  # every k-th block, from the first
            if compiles(cfg, device):  # compiled, then sharded, with FSDP2's hooks outside the compiled code
                block.compile_()
    if mesh is not None:
        # the student's masks enter its blocks as they are (cast_forward_inputs=False): the fp32 masks are cast to
        # the weights' dtype where they meet them, so their gradients accumulate in fp32. The teacher has no masks,
        # and its embedding stays whole and fp32: its blocks cast the residual stream they receive
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype(cfg, device), reduce_dtype=torch.float32,
                                  cast_forward_inputs=frozen)
        # reshard_after_forward=True said explicitly: each of the teacher's blocks is its own root, whose weights
        # FSDP2 would otherwise keep gathered after its forward (a root's backward follows at once, in training)
        keep = not frozen and not stage.reshard_after_forward
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not keep)
        if not frozen:  # None: the root's weights (embedding, final norm, lm_head) stay gathered for the backward
            fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False if keep else None)
    model.to_empty(device=device)
    model.tie_weights()
    if mesh is None:
        if sd is not None:
            model.load_state_dict(tied_state_dict(mcfg, sd, lm_head=True))
    elif broadcast_object(sd is not None):
        set_model_state_dict(model, tied_state_dict(mcfg, sd, lm_head=True) if dist.get_rank() == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if frozen:
        model.requires_grad_(False)
        model.eval()
    return model


def full_state_dict(model) -> dict:
    """The whole model's weights on the CPU in rank 0 (an empty dict elsewhere); a collective with several ranks."""
    if not dist.is_initialized():
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def reshard(model):
    """After forwards without a backward: FSDP2 leaves the root's parameters unsharded after the first forward (a
    backward would reshard them), and an optimizer or a checkpoint must see the sharded ones."""
    if isinstance(model, FSDPModule):
        model.reshard()


def model_source(path: str) -> str:
    """init_from / teacher as a model source: an earlier run directory stands for its final export (hf/)."""
    if checkpoint.is_run_dir(path):
        if not os.path.isfile(os.path.join(path, "hf", "config.json")):
            raise ConfigError(f"init_from={path} is a run directory without a final model (hf/); finish that run "
                              "or export one of its checkpoints with convert.py to-hf")
        path = os.path.join(path, "hf")
    return convert.resolve(path)


# -----------------------------------------------------------------------------
# the run: data, per-domain values, and the pieces every stage is built from

@dataclass
class Stage:
    name: str  # prune | cpt
    steps: int
    batch_size: int
    micro_batch_size: int
    seq_len: int
    lr: float
    warmup: float
    activation_checkpointing: int
    reshard_after_forward: bool
    defer_grad_sync: bool
    offset: int  # steps of the stages before it: its step s is the run's step offset + s


def stages_of(cfg: TrainConfig) -> list[Stage]:
    out, offset = [], 0
    for name in STAGES:
        steps = getattr(cfg, f"{name}_steps")
        if steps or name == "prune" and cfg.one_shot:  # one-shot: a pruning stage of 0 steps, compaction alone
            out.append(Stage(name, steps, *(getattr(cfg, f"{name}_{k}") for k in
                                            ("batch_size", "micro_batch_size", "seq_len", "lr", "warmup",
                                             "activation_checkpointing", "reshard_after_forward", "defer_grad_sync")),
                             offset))
            offset += steps
    return out


def lr_factor(step: int, stage: Stage, min_ratio: float) -> float:
    """Linear warm-up over warmup x steps, then cosine decay to min_ratio (of every group's peak)."""
    warm = int(stage.warmup * stage.steps)
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, stage.steps - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


class Run:
    """What one process holds across stages: config, process group, data, the run directory, logging."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, self.device, self.mesh = setup_distributed(cfg)
        self.master = self.rank == 0
        self.dtype = compute_dtype(cfg, self.device)
        self.dir = RunDir(cfg.out_dir)
        try:
            self.bins = DomainBins(cfg.data_dir)
            p = self.bins.per_domain("domain_proportions", cfg.domain_proportions) or [len(t) for t in self.bins.train]
            self.reference_loss = (None if cfg.teacher_reference else
                                   self.bins.per_domain("reference_loss", cfg.reference_loss))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.domains = self.bins.domains
        if cfg.domain_proportions is not None and (min(p) < 0 or abs(sum(p) - 1) > 1e-3):
            raise ConfigError(f"domain_proportions={cfg.domain_proportions} must be >= 0 and sum to 1 (they sum to "
                              f"{sum(p):.6g}); they are the initial share of each domain in the training mixture")
        self.p0 = np.asarray(p, dtype=np.float64) / np.sum(p)
        if self.reference_loss is not None and not all(0 < v < math.inf for v in self.reference_loss):
            raise ConfigError(f"reference_loss={cfg.reference_loss}: every value must be a positive finite loss "
                              "(nats/token)")
        try:  # the teacher's losses are measured when a stage starts: a placeholder checks the method now
            self.make_weighter([1.0] * len(self.domains) if cfg.teacher_reference else self.reference_loss)
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
        self.tasks = report.task_names(cfg.eval_tasks) if cfg.eval_tasks else []
        try:  # missing task data fails now, not after the first stage
            for name in self.tasks:
                report.load_docs(name, cfg.eval_tasks_dir, 1)
        except ValueError as e:
            raise ConfigError(f"eval_tasks: {e}") from None
        self.tokenizer = None  # the source's, for the tasks
        self.teacher = None  # the frozen source model, when distilling or measuring references against it
        self.src_path = None  # the source model (its tokenizer goes with every export)
        self.wandb = self.tensorboard = None  # optional loggers (rank 0)
        self.started = time.perf_counter()
        self.train_seconds = 0.0  # the stages' training steps (their clocks, across resumes)
        self.plotted = time.perf_counter()  # when plots/ was last drawn (evaluate_and_update redraws it now and then)
        self.sigterm = False  # set by the SIGTERM handler; read at the end of each step, all ranks together
        self.raised_together = False  # on_master raised its error on every rank: they can still leave together

    def log(self, msg: str):
        if self.master:
            print(msg, flush=True)

    def on_master(self, fn):
        """fn() on rank 0 alone (the run's files: metrics, masks, exports), called by every rank at the same point:
        an exception there is raised on every rank alike, so that none waits in a collective for a rank that has
        stopped, and rank 0's line is the run's one line."""
        result = error = None
        if self.master:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 (re-raised below, on every rank)
                error = e
        if self.world > 1:
            try:
                pickle.dumps(error)
                shared = error
            except Exception:  # noqa: BLE001
                shared = RuntimeError(f"{type(error).__name__}: {error}")
            shared = broadcast_object(shared)
            error = error if self.master else shared
        if error is not None:
            self.raised_together = self.world > 1
            raise error
        return result

    def record(self, row: dict):
        def write():
            self.dir.record(row)
            if self.wandb is not None:
                self.wandb.log(row)
            if self.tensorboard is not None:  # its scalars by the run's step; strings and tables stay in the files
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "iter"):
                        self.tensorboard.add_scalar(k, v, row.get("iter", 0))
                self.tensorboard.flush()
        self.on_master(write)

    def plot(self):
        """Redraw plots/ (rank 0); a failure to write them is a warning, not the end of the run."""
        if self.master:
            try:
                report.plot_metrics(self.dir)
            except OSError as e:
                print(f"warning: could not redraw {self.dir.file('plots')} ({checkpoint.error_text(e)}); the run "
                      "goes on", flush=True)
            self.plotted = time.perf_counter()

    def autocast(self):
        # FSDP2 applies mixed precision itself (bf16 weights and residual stream); one process uses autocast (fp32
        # weights and residual stream, bf16 matmuls), so the two agree closely in bf16, exactly only in fp32
        use = self.world == 1 and self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=use)

    def evaluate(self, model, masks, seq_len) -> np.ndarray:
        c = self.cfg
        with self.autocast():
            val = report.evaluate(model, self.bins, seq_len, c.eval_batch_size, c.eval_batches, masks, self.rank,
                                  self.world, self.device)
        reshard(model)
        return val

    def score_tasks(self, model, masks, label: str, st: "StageState"):
        """Zero-shot accuracy on eval_tasks of `label` (source | pruned | final), into metrics.jsonl and the log."""
        c, stage = self.cfg, st.stage
        t = time.perf_counter()
        with self.autocast():
            res = report.score_tasks(model, self.tokenizer, self.tasks, c.eval_tasks_dir, c.eval_tasks_limit, masks,
                                     self.rank, self.world, self.device, progress=self.master and sys.stderr.isatty())
        reshard(model)
        res, seconds = report.task_summary(res), time.perf_counter() - t
        self.record(dict(stage=stage.name, step=st.step, iter=stage.offset + st.step, tasks_model=label,
                         tasks_limit=c.eval_tasks_limit, tasks=res, tasks_seconds=seconds))
        self.log(f"{label} model, zero-shot: " + ", ".join(
            f"{n} {100 * v:.1f}" for n, v in report.headline(res).items()) +
            f" (acc_norm where the task has it, else acc; {seconds:.0f} s)")

    def load_source(self, path) -> tuple[ModelConfig, dict | None]:
        """(config, weights) of a model: rank 0 reads the weights, the others get the config (and any error, so
        that none waits for rank 0). Data tokenized for another vocabulary or tokenizer is refused."""
        mcfg = sd = error = None
        if self.master:
            try:
                mcfg, sd = convert.load_hf(path)
            except (convert.ConvertError, ValueError, OSError) as e:
                error = str(e)
        mcfg, error = broadcast_object((mcfg, error))
        if error:
            raise convert.ConvertError(error)
        self.check_data(mcfg, path)
        return mcfg, sd

    def check_data(self, mcfg: ModelConfig, path: str):
        try:
            self.bins.check_compatible(mcfg.vocab_size, tokenizer_fingerprint(path))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def make_weighter(self, reference) -> dro.DomainWeighter:
        c = self.cfg
        return dro.DomainWeighter(self.domains, self.p0, c.domain_weighting, reference, rho=c.rho,
                                  min_prob=c.min_prob, ema=c.loss_ema, rescale_reference=c.rescale_reference,
                                  seed=c.seed)

    def target(self, mcfg: ModelConfig) -> TargetShape:
        """The target shape from the config's target_* fields or target_params, checked against mcfg."""
        c = self.cfg
        try:
            target = TargetShape.resolve(mcfg, **asdict(c))
            target.validate(mcfg)
        except ValueError as e:
            raise ConfigError(str(e) if str(e).startswith("target") else f"target shape: {e}") from None
        if c.target_params:  # say how the number was read: <= 1 a fraction of the source's, > 1 a count
            source, n = total_params(mcfg), total_params(mcfg, target)
            budget = c.target_params * source if c.target_params <= 1 else c.target_params
            how = f"a fraction of the source's {count_text(source)}" if c.target_params <= 1 else "a count"
            self.log(f"target_params={c.target_params:g} ({how}: {count_text(budget)} parameters) -> target "
                     f"{report.describe(target)} ({count_text(n)} parameters, {100 * (n / budget - 1):+.1f}%)")
        return target

    def make_l0(self, mcfg: ModelConfig) -> L0Module:
        c = self.cfg
        target = self.target(mcfg)
        try:
            # one-shot: the gates never learned a value, only the ranking decides (binary kept values)
            l0 = L0Module(mcfg, target, warmup_steps=int(c.lagrangian_warmup * c.prune_steps),
                          values="binary" if c.one_shot else c.mask_values, steps=c.prune_steps,
                          landing_steps=math.ceil(round(c.prune_landing * c.prune_steps, 6)),
                          landing_temperature=c.landing_temperature)
        except ValueError as e:
            raise ConfigError(str(e) if str(e).startswith("target") else f"target shape: {e}") from None
        return l0.to(self.device)

    def make_optimizers(self, model, l0: L0Module | None, stage: Stage) -> tuple[list, list]:
        """([the model's AdamW] + [the masks' and lambdas' AdamW] while pruning, their groups' peak learning rates).
        The reference schedules the mask and lambda groups like the model (warm-up, cosine)."""
        c = self.cfg
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": c.weight_decay},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        # the fused kernel, one pass over the state (CPU: bench/speed.py --rows adamw; GPU: one launch, not foreach's
        # several per tensor list)
        opts = [torch.optim.AdamW(groups, lr=stage.lr, betas=(c.beta1, c.beta2), eps=1e-8, fused=True)]
        peaks = [[stage.lr, stage.lr]]
        if l0 is not None:
            # weight decay 0: decoupled decay would shrink lambda, which ascends by gradient reversal
            lam_lr = c.lambda_lr or c.lag_lr
            opt = torch.optim.AdamW([{"params": [z.log_alpha for z in l0.z.values()], "lr": c.lag_lr},
                                     {"params": list(l0.lambdas.values()), "lr": lam_lr}],
                                    betas=(c.beta1, c.beta2), eps=1e-8, weight_decay=0.0)
            opt.register_step_post_hook(lambda *_: l0.constrain_())  # log_alpha stays in its range after each step
            opts.append(opt)
            peaks.append([c.lag_lr, lam_lr])
        return opts, peaks

    def scratch_model(self, mcfg: ModelConfig) -> tuple[ModelConfig, dict | None]:
        """from_scratch: mcfg's family at the target shape, randomly initialised (rank 0; seeded by the run's seed)."""
        mcfg = replace(mcfg, **asdict(self.target(mcfg)), head_dim=mcfg.head_dim)
        sd = None
        if self.master:
            sd = Transformer(mcfg).init_weights(torch.Generator().manual_seed(self.cfg.seed)).state_dict()
        self.log(f"from_scratch: {report.describe(mcfg)} ({count_text(total_params(mcfg))} parameters), random "
                 f"weights N(0, {mcfg.extra.get('initializer_range', 0.02)}) as Hugging Face initialises the family")
        return mcfg, sd

    def init_masks_from_importance(self, model, l0: L0Module, stage: Stage):
        """log_alpha from activation importance over mask_init_batches global batches of the initial mixture,
        drawn by a sampler of their own (the training batches stay those of a uniform-init run)."""
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


# -----------------------------------------------------------------------------
# the loop, in execution order

def train(run: Run, ckpt: str | None):
    """The run from its start, or from the checkpoint `ckpt` (one that find_resume checked): each stage starts
    from what the one before it handed over (the compacted weights), or from the checkpoint."""
    c = run.cfg
    state = checkpoint.read_state(ckpt) if ckpt else None
    run.src_path = model_source(c.init_from)
    teacher_path = model_source(c.teacher) if c.teacher else run.src_path
    if run.tasks:
        run.tokenizer = convert.load_tokenizer(run.src_path)
    if state is None:
        mcfg, sd = run.load_source(run.src_path)
    else:  # resuming: the weights come from the checkpoint
        mcfg, sd = ModelConfig(**state["model_config"]), None
        run.check_data(mcfg, run.src_path)
    if c.teacher_reference or any(c.distills(s.name) for s in run.stages):
        tcfg, tsd = (mcfg, sd) if teacher_path == run.src_path and state is None else run.load_source(teacher_path)
        run.teacher = build_model(tcfg, tsd if run.master else None, c, run.device, run.mesh, frozen=True)
        del tsd
    if c.from_scratch and state is None:  # the source gave the family, the tokenizer (and the teacher)
        mcfg, sd = run.scratch_model(mcfg)
    if run.master and c.wandb_project:
        try:
            import wandb
            run.wandb = wandb
            wandb.init(project=c.wandb_project, name=os.path.basename(os.path.abspath(c.out_dir)), config=asdict(c),
                       resume="allow")
        except ImportError:
            print("wandb_project is set but wandb is not installed (pip install wandb); not logging to it")
    if run.master and c.tensorboard_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter
            run.tensorboard = SummaryWriter(c.tensorboard_dir)
        except ImportError:
            print("tensorboard_dir is set but tensorboard is not installed (pip install tensorboard); not logging to "
                  "it")
    names = [s.name for s in run.stages]
    if state is not None and state["stage"] not in names:
        raise ConfigError(f"{ckpt} is a checkpoint of the {state['stage']} stage, which {state['stage']}_steps=0 "
                          f"removes; run again with {state['stage']}_steps > 0 (and --allow_changes="
                          f"{state['stage']}_steps), or start over with --overwrite=true")
    start = names.index(state["stage"]) if state is not None else 0
    for i, stage in enumerate(run.stages[start:], start):
        resume = ckpt if state is not None and i == start else None
        model = build_model(mcfg, sd if run.master else None, c, run.device, run.mesh, stage)
        sd = None  # the model holds the weights: rank 0's full copy goes before the stage's other work
        st = start_stage(run, stage, model, resume)
        del model  # the stage holds it, and finish_stage lets it go before compaction
        mcfg, sd = run_stage(run, st, last_stage=i + 1 == len(run.stages))
    barrier()
    run.on_master(lambda: checkpoint.write_json(run.dir.done, dict(model_config=asdict(mcfg), hf=run.dir.file("hf"))))
    run.log(f"done: {run.dir.file('hf')} ({report.describe(mcfg)}); {clock_text(time.perf_counter() - run.started)} "
            f"of wall time in this process, the run's training steps {clock_text(run.train_seconds)} in all")


@dataclass
class StageState:
    """What one stage trains and what its checkpoints restore."""
    stage: Stage
    model: torch.nn.Module | None
    l0: L0Module | None  # while pruning
    optimizers: list  # the model's, then the masks' (while pruning)
    peak_lrs: list  # per optimizer, per param group
    sampler: MixtureSampler
    weighter: dro.DomainWeighter
    kd: bool  # distilling from run.teacher
    step: int = 0
    saved: int | None = None  # the step of this stage's newest checkpoint
    clock: dict = field(default_factory=lambda: {"seconds": 0.0, "tokens": 0})  # training only, across resumes
    resumed: bool = False
    terminated: bool = False  # some rank got SIGTERM (all-reduced with the step's statistics)
    started: float = 0.0  # perf_counter when this process began the stage (run_stage)


def start_stage(run: Run, stage: Stage, model, resume: str | None) -> StageState:
    """Around the model (its weights filled from the checkpoint `resume`, if any): its masks while pruning, the
    optimizers, the stage's sampler and a fresh domain weighter."""
    c, mcfg = run.cfg, model.config
    l0 = run.make_l0(mcfg) if stage.name == "prune" else None
    optimizers, peaks = run.make_optimizers(model, l0, stage)
    if resume is None and l0 is not None and c.mask_init == "importance":
        run.init_masks_from_importance(model, l0, stage)
    run.log(f"stage {stage.name}: {stage.steps} steps of {stage.batch_size} x {stage.seq_len} tokens on "
            f"{run.world} process(es), {run.device.type}, {str(run.dtype).removeprefix('torch.')}; "
            f"model {report.describe(mcfg)}" + (f" -> target {report.describe(l0.target)}" if l0 else ""))
    reference = run.reference_loss
    if c.teacher_reference:  # measured where the stage starts, on the batches its evaluations use
        reference = run.evaluate(run.teacher, None, stage.seq_len).tolist()
        run.log(f"{stage.name}: reference losses = the source model's validation losses: " +
                ", ".join(f"{d} {v:.3f}" for d, v in zip(run.domains, reference)))
    st = StageState(stage, model, l0, optimizers, peaks,
                    MixtureSampler(run.bins, stage.seq_len, stage.batch_size, seed=c.seed + STAGES.index(stage.name)),
                    run.make_weighter(reference), kd=run.teacher is not None and c.distills(stage.name))
    if run.teacher is not None and stage is run.stages[-1] and not st.kd:
        run.teacher = None  # its last references are measured and it distils no more: free its memory now
    if resume is not None:
        state = checkpoint.load(resume, model, optimizers[0])
        if l0 is not None:
            l0.load_state_dict(state["l0"])
            optimizers[1].load_state_dict(state["l0_opt"])
        try:
            st.sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise ConfigError(f"cannot resume from {resume}: the dataset {c.data_dir} changed since it was written "
                              f"({e}); put back the data the run was trained on, or start over with "
                              "--overwrite=true (or another out_dir)") from None
        st.weighter.load_state_dict(state["weighter"])
        st.step = st.saved = state["step"]
        st.clock, st.resumed = dict(state.get("clock", st.clock)), True
        run.log(f"resumed {stage.name} at step {st.step} from {resume}")
    return st


def run_stage(run: Run, st: StageState, last_stage: bool) -> tuple[ModelConfig, dict | None]:
    """Steps until the stage is done. Every step: evaluate (and update the domain weights) on eval_interval, save
    on save_interval, stop for stop_at or SIGTERM, one train_step, log. The last step evaluates and hands the
    weights over (finish_stage)."""
    c, stage = run.cfg, st.stage
    bar = tqdm(total=stage.steps, initial=st.step, desc=stage.name, dynamic_ncols=True, leave=True,
               disable=not (run.master and sys.stderr.isatty()))
    write = bar.write if not bar.disable else run.log
    first, t0, tokens = st.step, time.perf_counter(), 0  # tokens since the last log line, for its throughput
    st.started = t0  # this process's wall clock of the stage (evaluations and saves included), for the ETA
    while True:
        step, last_step = st.step, st.step >= stage.steps  # (>: resumed with fewer steps, allow_changes)
        if st.l0 is not None:
            st.l0.set_step_(step)  # the gates' temperature (annealed in the landing)
        if step == 0 or step > first:  # (a resumed step's evaluation and checkpoint are in the files already)
            if step == 0 or step % c.eval_interval == 0 or last_step:
                evaluate_and_update(run, st, update=step > 0)
            compacted = stage.name == "cpt" and run.stages[0].name == "prune"
            if step == 0 and run.tasks:  # the model entering the stage (again after a resume at step 0)
                label = "pruned" if compacted else "init" if c.from_scratch else "source"  # (init: random weights)
                run.score_tasks(st.model, None, label, st)
            if step == 0 and compacted and not st.resumed:  # right after compaction: never prune twice
                save(run, st)
            elif 0 < step < stage.steps and step % c.save_interval == 0:
                save(run, st)
        if last_step:
            bar.close()
            return finish_stage(run, st, last_stage)
        if step % c.log_interval == 0 or step == first:
            t0 = time.perf_counter()  # evaluation and saving are not training
        stop, at = c.stop_at and stage.offset + step >= c.stop_at, stage.offset + step
        if stop or st.terminated:  # SIGTERM: a scheduler's warning before its SIGKILL
            if st.saved != step:  # keep the steps done since the last checkpoint (SIGTERM: no time to hash it)
                save(run, st, hashed=not st.terminated)
            if stop:
                raise StopRun(f"stopped at step {at} (stop_at={c.stop_at}) with a checkpoint; run again without "
                              "stop_at (or with a later one) to resume")
            raise StopRun(f"terminated (SIGTERM) at step {at}, with a checkpoint; run the same command again to "
                          "resume", code=143)
        if st.l0 is not None and step == stage.steps - st.l0.landing_steps and (step > first or step == 0):
            check_gates(run, st, "the landing begins")  # (not again when resumed inside the landing)
        t_step = time.perf_counter()
        row = train_step(run, st)
        st.step += 1
        tokens += stage.batch_size * stage.seq_len
        st.clock["tokens"] += stage.batch_size * stage.seq_len
        st.clock["seconds"] += time.perf_counter() - t_step
        bar.update(1)
        if st.step % c.log_interval == 0 or st.step == stage.steps:
            log_step(run, st, row, tokens / (time.perf_counter() - t0), write, first)
            tokens = 0


def train_step(run: Run, st: StageState) -> dict:
    """One optimizer step on one global batch: micro-batches with one mask sample each, the Lagrangian, one
    all-reduce of the step's statistics, clipping, the optimizers, the weighter's training losses. Returns what
    the log line shows."""
    c, stage, model, l0, step = run.cfg, st.stage, st.model, st.l0, st.step
    f = lr_factor(step, stage, c.min_lr_ratio)
    for opt, peaks in zip(st.optimizers, st.peak_lrs):
        for g, lr in zip(opt.param_groups, peaks):
            g["lr"] = lr * f
    x, y, dom = st.sampler.next(st.weighter.proportions, run.rank, run.world)
    x, y, dom = x.to(run.device), y.to(run.device), dom.to(run.device)
    B, mb, D = stage.batch_size, stage.micro_batch_size, len(run.domains)
    n_tokens, rows, lo = B * stage.seq_len, B // run.world, run.rank * (B // run.world)  # every position a target
    loss_sums = torch.zeros(D, dtype=torch.float64, device=run.device)
    counts = torch.zeros(D, dtype=torch.float64, device=run.device)
    kd_sum = torch.zeros(1, dtype=torch.float64, device=run.device)
    # FSDP2 reduce-scatters after every micro-batch, unless defer_grad_sync holds the unsharded fp32 gradients
    # until the last one (one reduce-scatter a step: less traffic across nodes, more memory). Under HSDP, the
    # all-reduce across the replicas (nodes) of the sharded gradients is once a step either way
    fsdp = isinstance(model, FSDPModule)
    for i in range(0, rows, mb):
        if fsdp and stage.defer_grad_sync:
            model.set_requires_gradient_sync(i + mb >= rows)
        elif fsdp and c.dp_replicate > 1:
            model.set_requires_all_reduce(i + mb >= rows)
        masks = l0(mask_generator(c.seed, step, lo + i)) if l0 is not None else None
        xi, yi = x[i:i + mb], y[i:i + mb]
        with run.autocast():
            if st.kd:  # the objective per token, and its cross-entropy part for the weighter and the logs
                with torch.no_grad():
                    teacher = (run.teacher.hidden(xi), run.teacher.lm_head.weight, c.distill_alpha,
                               c.distill_temperature)
                tok, ce = model(xi, yi, masks=masks, reduction="none", teacher=teacher)
                kd_sum += tok.detach().double().sum()
            else:
                tok = ce = model(xi, yi, masks=masks, reduction="none")  # (mb, T)
        # x world: FSDP averages the gradients over ranks, and the loss is a mean over the global batch
        (tok.sum() * (run.world / n_tokens)).backward()
        loss_sums.index_add_(0, dom[i:i + mb], ce.detach().double().sum(1))
        counts.index_add_(0, dom[i:i + mb], (yi != -100).sum(1).double())
    if l0 is not None:
        if not l0.landing(step):  # in the landing, land_ holds the target instead (below)
            l0.lagrangian(step).backward()
        l0.all_reduce_grads_()
    # one all-reduce per step: per-domain loss sums and token counts, the distillation objective's sum, and
    # whether any rank got SIGTERM (so that every rank stops at the same step boundary); then the one copy to the
    # host of the step, with the gradient norm's parts (the GPU runs ahead until here)
    stats = torch.cat([loss_sums, counts, kd_sum, kd_sum.new_tensor([float(run.sigterm)])])
    all_reduce(stats)
    grads, norms = grad_norms(model, l0)
    host = torch.cat([stats, *(n.double().reshape(1) for n in norms)]).tolist()
    loss_sums, counts, kd_sum, st.terminated = host[:D], host[D:2 * D], host[2 * D], host[2 * D + 1] > 0
    loss = sum(loss_sums) / sum(counts)  # cross-entropy, also when the objective is distillation
    kd_loss = kd_sum / sum(counts) if st.kd else None
    if kd_loss is not None and not math.isfinite(kd_loss):
        loss = kd_loss
    gnorm = clip_(grads, host[2 * D + 2:], c.grad_clip)
    for what, v in (("training loss", loss), ("gradient norm", gnorm)):
        if not math.isfinite(v):  # before the step: no NaN ever reaches the weights or a checkpoint
            raise FloatingPointError(
                f"{stage.name} step {step}: the {what} is {v}; stopping. The checkpoints in {c.out_dir}/checkpoints "
                f"are intact: resume from the last one with a lower learning rate, e.g. --{stage.name}_lr="
                f"{stage.lr / 2:g} --allow_changes={stage.name}_lr")
    for opt in st.optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if l0 is not None:
        l0.land_(step)
    st.weighter.observe_train(np.asarray(loss_sums), np.asarray(counts))
    row = dict(loss=loss, lr=stage.lr * f, grad_norm=gnorm, **({"distill_loss": kd_loss} if st.kd else {}))
    row.update({f"train/{n}": s / k for n, s, k in zip(run.domains, loss_sums, counts) if k})
    return row


def grad_norms(model, l0: L0Module | None) -> tuple[list, list]:
    """(every gradient: the model's, FSDP2-sharded or not, and the masks' and lambdas', replicated and already
    averaged; the norms of the unsharded ones and of the sharded ones, as device tensors: no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grads += [p.grad for p in l0.parameters() if p.grad is not None] if l0 is not None else []
    local = [g for g in grads if not hasattr(g, "full_tensor")]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]  # the norm of a DTensor list all-reduces its shards
    norms = [torch.nn.utils.get_total_norm(local)] if local else []
    norms += [torch.nn.utils.get_total_norm(sharded).full_tensor()] if sharded else []
    return grads, norms


def clip_(grads: list, norms: list[float], max_norm: float) -> float:
    """Clip one global gradient norm (of the parts' norms), as the original clips the model's, the masks' and the
    lambdas' gradients together; max_norm 0 = off. Returns the norm before clipping."""
    norm = math.sqrt(sum(n ** 2 for n in norms))
    if max_norm > 0 and norm > max_norm:  # as torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def clock_text(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def log_step(run: Run, st: StageState, row: dict, tokens_per_s: float, write, first: int):
    """The step's metrics row, and its log line: loss, learning rate, throughput, the stage's wall time so far and
    the time to its last step at the pace since this process started it (evaluations and saves included)."""
    stage, step, l0 = st.stage, st.step, st.l0
    row = dict(stage=stage.name, step=step, iter=stage.offset + step, loss=row.pop("loss"), lr=row.pop("lr"),
               grad_norm=row.pop("grad_norm"), tokens_per_s=tokens_per_s, **row, **(l0.stats(step) if l0 else {}))
    elapsed = time.perf_counter() - st.started
    eta = elapsed / max(1, step - first) * (stage.steps - step)
    msg = (f"{stage.name} {step}/{stage.steps} | loss {row['loss']:.4f}" + (f" (distill {row['distill_loss']:.4f})"
           if st.kd else "") + f" | lr {row['lr']:.2e} | {tokens_per_s:,.0f} tok/s | {clock_text(elapsed)} elapsed, "
           f"ETA {clock_text(eta)}")
    if run.device.type == "cuda":
        row["mfu"] = report.mfu(st.model, tokens_per_s, run.world, stage.seq_len)
        msg += f" | mfu {row['mfu']:.1%}" if row["mfu"] else ""
    if "expected_sparsity" in row:
        msg += (f" | sparsity {row['expected_sparsity']:.3f} -> {row['target_sparsity']:.3f}"
                f" (final {row['final_sparsity']:.3f})")
    run.record(row)
    write(msg)


def evaluate_and_update(run: Run, st: StageState, update: bool):
    """Per-domain validation losses (masks of the current expected size while pruning) -> the weighter's update
    (identical on every rank; rank 0's is broadcast anyway), metrics.jsonl, the plots."""
    stage, step, l0, weighter = st.stage, st.step, st.l0, st.weighter
    masks, sparsity = ((l0.expected_masks(), {k: v for k, v in l0.stats(step).items() if "sparsity" in k})
                       if l0 is not None else (None, {}))
    val = run.evaluate(st.model, masks, stage.seq_len)
    if update:
        weighter.update(step, max_steps=stage.steps, val_losses=val,
                        expected_sparsity=sparsity.get("expected_sparsity"),
                        final_sparsity=sparsity.get("final_sparsity"))
        if run.world > 1:
            q = torch.tensor(weighter.q, dtype=torch.float64, device=run.device)  # NCCL: on the GPU
            dist.broadcast(q, 0)
            weighter.q = q.cpu().numpy()
    run.record(dict(stage=stage.name, step=step, iter=stage.offset + step,
                    **{f"val/{n}": float(v) for n, v in zip(run.domains, val)}, **weighter.stats(), **sparsity))
    run.log(f"{stage.name} {step}/{stage.steps} eval | " + " ".join(
        f"{n} {v:.3f} ({w:.3f})" for n, v, w in zip(run.domains, val, weighter.q)) + "  [val loss (weight)]")
    if time.perf_counter() - run.plotted > PLOT_EVERY:  # (and at the end of every stage)
        run.plot()


FAR_FROM_TARGET = 0.02  # of the prunable weights: without the landing, a gap of 0.039 cost +0.39 nats at compaction


def check_gates(run: Run, st: StageState, when: str):
    """Warn when the gates are far from the target where compaction (no landing) or the landing is about to move
    them there by fiat: the units that go are then picked by the gates' order, not learned (docs/operations.md,
    "Choosing prune_steps, lambda_lr and the budget"). With importance init that order is the ranking, the demo's
    design; from uniform gates it is whatever a few steps of noisy gradients left, close to random."""
    c, l0 = run.cfg, st.l0
    s = l0.stats(st.step)
    e, t = s["expected_sparsity"], s["final_sparsity"]
    if abs(e - t) <= FAR_FROM_TARGET or c.mask_init == "importance" and l0.landing_steps:
        return
    left = st.stage.steps - st.step
    how = (f"the landing moves them there in {left} step{'s' * (left != 1)}" if l0.landing_steps else
           "compaction cuts the difference without training")
    msg = (f"warning: when {when} the gates' expected sparsity is {e:.3f}, the target {t:.3f} (gap {e - t:+.3f}); "
           f"{how}, so the units it removes are chosen by gates that")
    if c.mask_init == "uniform":
        msg += (f" started equal and had {st.step} steps to order themselves. Use mask_init=importance (a ranking "
                f"from activations, as config/demo.py does), or more prune_steps or a larger lambda_lr "
                f"(now {c.lambda_lr or c.lag_lr:g}) so that the Lagrangian reaches the target first")
    else:
        msg += (" did not reach it. Add a landing (prune_landing=0.25) or more prune_steps or a larger lambda_lr "
                f"(now {c.lambda_lr or c.lag_lr:g})")
    run.log(msg + " (docs/operations.md, \"Choosing prune_steps\")")


def save(run: Run, st: StageState, hashed: bool = True):
    pruning = st.l0 is not None
    state = dict(stage=st.stage.name, step=st.step, config=asdict(run.cfg), model_config=asdict(st.model.config),
                 src_path=os.path.abspath(run.src_path), clock=dict(st.clock), sampler=st.sampler.state_dict(),
                 weighter=st.weighter.state_dict(), l0=st.l0.state_dict() if pruning else None,
                 l0_opt=st.optimizers[1].state_dict() if pruning else None)
    t = time.perf_counter()
    checkpoint.save(run.dir, st.model, st.optimizers[0], state, run.cfg.keep_checkpoints, run.rank, run.world,
                    hashed)
    st.saved = st.step
    run.log(f"saved checkpoint {checkpoint.checkpoint_name(st.stage.name, st.step)} "
            f"({time.perf_counter() - t:.1f} s{'' if hashed else ', sizes only: no sha256'})")


def finish_stage(run: Run, st: StageState, last_stage: bool) -> tuple[ModelConfig, dict | None]:
    """The stage's summary row; the weights gathered on rank 0, compacted to the target after pruning (exported to
    pruned/, the masks to masks.pt), exported to hf/ after the last stage. Returns (config, full state dict on
    rank 0, None elsewhere) for the next stage."""
    stage, l0, clock = st.stage, st.l0, st.clock
    row = dict(stage=stage.name, step=st.step, iter=stage.offset + st.step, stage_seconds=clock["seconds"],
               stage_wall_seconds=time.perf_counter() - st.started,  # this process's: evaluations, saves, tasks too
               stage_tokens=clock["tokens"], stage_tokens_per_s=clock["tokens"] / max(clock["seconds"], 1e-9),
               peak_memory_gb=report.peak_memory_gb(run.device))
    if l0 is not None:  # how far the gates got: compaction cuts what they have not given up yet
        s = l0.stats(st.step)
        gaps = {m: s[f"expected_{m}_sparsity"] - s[f"target_{m}_sparsity"] for m in l0.names}  # (warm-up done)
        if stage.steps:  # (one-shot: the gates never moved, only their ranking counts)
            row.update(compaction_expected_sparsity=s["expected_sparsity"],
                       compaction_final_sparsity=s["final_sparsity"],
                       **{f"compaction_{m}_gap": v for m, v in gaps.items()})
        run.log((f"one-shot: compacting by the importance ranking to the target {report.describe(l0.target)}"
                 if stage.steps == 0 else
                 f"prune end: expected sparsity {s['expected_sparsity']:.3f}, target {s['final_sparsity']:.3f}; per "
                 "mask, expected - target: " + ", ".join(f"{m} {round(v, 3) or 0.0:+.3f}" for m, v in gaps.items()) +
                 f"; compacting to the target with {l0.values} kept values"))
    if l0 is not None and stage.steps and not l0.landing_steps:
        check_gates(run, st, "compaction")
    run.record(row)
    run.train_seconds += clock["seconds"]
    run.plot()
    masks = l0.deterministic_masks() if l0 is not None else None  # what compaction keeps
    if last_stage and run.tasks:  # after pruning alone, under the masks compaction applies: the compacted model
        run.score_tasks(st.model, masks, "final", st)
    mcfg, sd = st.model.config, full_state_dict(st.model)
    st.model = st.optimizers = None  # gathered: the shards can go before the compacted copy is made
    if l0 is not None:  # compact: gathered on rank 0, re-sharded when the next stage builds it
        def compact():
            cfg, full = prune_state_dict(mcfg, sd, masks)
            checkpoint.save_masks(run.dir, l0, masks)
            export(run, cfg, full, "pruned")
            return cfg, full
        mcfg, sd = run.on_master(compact) or (None, None)
        mcfg = broadcast_object(mcfg)
    if last_stage:
        run.on_master(lambda: export(run, mcfg, sd, "hf"))
    return mcfg, sd


def export(run: Run, mcfg: ModelConfig, sd: dict, name: str):
    model = Transformer.from_state_dict(mcfg, {k: v.float() for k, v in sd.items()})
    out = run.dir.file(name)
    convert.export_hf(model, out, tokenizer_src=run.src_path, dtype=getattr(torch, run.cfg.export_dtype), force=True)
    run.log(f"exported {out} ({report.describe(mcfg)})")


# -----------------------------------------------------------------------------
# main: the config, the run directory (lock, resume or refuse), the loop, one line per failure

def launch(argv: list[str]) -> int:
    """python train.py --nproc_per_node=N [torchrun's other options] CONFIG [--key=value ...]: torchrun's launcher in
    this process, with its workers running this file. The same run as `torchrun ... train.py ...`, except at the
    end: on Ctrl-C or SIGTERM torchrun forwards the signal, the workers checkpoint and each run ends with its own
    line, and this process exits 130 / 143 where torchrun prints its SignalException and exits 1; a failed worker's
    line is the only one, with its exit status, where torchrun adds a ChildFailedError report."""
    import logging
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    options = torchrun.get_args_parser()._option_string_actions
    mine, rest = [], []
    for arg in argv:
        name = arg.partition("=")[0]
        if arg.startswith("--") and name in options:
            if "=" not in arg and options[name].nargs != 0:
                raise ConfigError(f"{arg}: write {name}=VALUE")
            mine.append(arg)
        else:
            rest.append(arg)
    for name in list(logging.root.manager.loggerDict):  # its notices (thread settings, "death signal"): ours say it
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = torchrun.parse_args([*mine, os.path.abspath(__file__), *rest])
    if str(args.nproc_per_node).isdigit() and "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 and say so; this shares the machine's cores between the workers instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(args.nproc_per_node)))
    try:
        torchrun.run(args)
    except SignalException as e:  # the workers got it too and ended with their own line (a checkpoint taken)
        return 128 + int(e.sigval)
    except ChildFailedError as e:  # the failed worker's own line is above: its exit status (128 + N if killed by N)
        code = next(iter(e.failures.values())).exitcode
        return code if code > 0 else 128 - code
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["eval"], ["report"]):
        return report.main(argv)
    if any(a.partition("=")[0] in ("--nproc_per_node", "--nproc-per-node") for a in argv):
        try:
            return launch(argv)
        except ConfigError as e:
            return fail(f"error: {e}", 2)
    # one process saves its checkpoint with torch.distributed.checkpoint too, which says so at every save
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    cfg = run = old_sigterm = None
    try:
        cfg = load_config(argv)
        run = Run(cfg)
        run.dir.lock(run.master)  # held until the run ends

        def on_sigterm(signum, frame):
            run.sigterm = True
        if threading.current_thread() is threading.main_thread():  # (signal handlers live in the main thread)
            old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
        # config.json holds the precision dtype=auto resolved to: resumed where it resolves otherwise (another CPU),
        # a run is refused like any changed setting instead of going on in another precision
        recorded = {**asdict(cfg), "dtype": str(run.dtype).removeprefix("torch.")}
        if run.dir.prepare(recorded, RESUMABLE, FIXED_ON_RESUME, run.master, run.log) == "done":
            run.log(f"{cfg.out_dir} is a finished run (done.json); its model is in {cfg.out_dir}/hf. Nothing to do.")
            return 0
        ckpt = run.dir.find_resume(run.rank, run.world, run.log)
        def truncate():  # the lines written after the checkpoint go (they will be written again)
            st = checkpoint.read_state(ckpt) if ckpt is not None else {"stage": None, "step": 0}
            run.dir.truncate_metrics(st["stage"], st["step"])
        run.on_master(truncate)
        train(run, ckpt)
        barrier()  # leave together: a rank tearing gloo down while another still talks to it can abort
    except StopRun as e:
        run.log(str(e))
        barrier()
        return e.code
    except (ConfigError, RunDirError, convert.ConvertError, CheckpointError, FileNotFoundError,
            FloatingPointError) as e:
        return fail(f"error: {e}", 2 if isinstance(e, (ConfigError, RunDirError)) else 1)
    except RuntimeError as e:  # gloo's (NCCL's watchdog ends the process itself, with its own message)
        peer = "Connection closed by peer" in str(e)
        if not dist.is_initialized() or not (peer or "Timed out" in str(e)):
            raise
        # gloo: the training loop's collectives on CPUs (collective_timeout), else only the control group's waits
        # for one rank's work (RANK0_TIMEOUT; NCCL's watchdog ends a process whose collective timed out itself)
        limit = (f"collective_timeout={cfg.collective_timeout} s" if dist.get_backend() == "gloo" else
                 f"{RANK0_TIMEOUT.total_seconds():.0f} s (RANK0_TIMEOUT)")
        print(f"train.py: error: rank {dist.get_rank()}: " + (
            "another rank stopped (its own output says why)" if peer else
            f"a collective waited more than {limit} for the other ranks: one of them hung or stopped (its own "
            "output says why); raise the limit if a step, an evaluation or an export takes longer") + (f"; checkpoint {RunDir(cfg.out_dir).newest()} is intact: run the same command again "
                               "to resume" if RunDir(cfg.out_dir).newest() else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: a save in progress is left as .tmp-*, never taken for a checkpoint
        have = RunDir(cfg.out_dir).newest() if cfg else None
        return fail("interrupted" + (f"; checkpoint {have} is intact: run the same command again to resume from it"
                                     if have else ""), 130)
    except OSError as e:  # writing metrics, plots or an export (a full disk): the checkpoints are intact
        have = RunDir(cfg.out_dir).newest() if cfg else None
        return fail(f"error: {checkpoint.error_text(e)}" + (
            f"; the checkpoints in {cfg.out_dir}/checkpoints are intact: fix that and run the same command again to "
            "resume" if have else ""), 1)
    finally:
        if run is not None:  # released now, not when a traceback holding this frame is collected
            run.dir.unlock()
        if old_sigterm is not None:  # in-process callers (tests, notebooks) get their handler back
            signal.signal(signal.SIGTERM, old_sigterm)
        if dist.is_initialized():
            if run is not None and run.raised_together:  # every rank has the error: leave together, as above
                try:
                    barrier()
                except RuntimeError:
                    pass
            dist.destroy_process_group()
    return 0


def fail(msg: str, code: int) -> int:
    """One line on stderr (from rank 0), and the exit status."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"train.py: {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
