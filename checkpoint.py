"""
A train.py run directory and its checkpoints: every path a run writes, the lock that keeps two runs out of one
out_dir, the config check on resume, durable writes, metrics.jsonl; checkpoint save / verify / find / load for
train.py (an exact resume), and a run directory read back as a model for convert.py and report.py.

    run = RunDir("out/demo")
    is_run_dir("out/demo")                        # the one test for "is this a run directory"
    ckpt = run.find_resume(rank, world, log)      # newest checkpoint whose files match its manifest, or None
    state = load(ckpt, model, optimizer)          # fills both in place; returns the loop state (one dict out)
    save(run, model, optimizer, state, keep, rank, world)   # one dict in
    cfg, sd, tokenizer_src = load_run(run.path)   # the latest checkpoint as weights (compacted if still pruning)

Layout of out_dir:

    config.json     the resolved TrainConfig (compared with the next command's: resume or refuse)
    metrics.jsonl   one JSON row per log / eval line, truncated to the checkpoint's step on resume
    checkpoints/<k>-<stage>-<step>/   .metadata and *.distcp (model and optimizer shards, torch.distributed.checkpoint),
                    meta.json (stage, step, configs, clock, sampler: readable), state.pt (weighter, L0 masks and
                    lambdas, their optimizer), manifest.json (every file's size and sha256)
    pruned/, hf/    Hugging Face exports at compaction and at the end;  masks.pt  the final masks
    done.json       written last: the run is finished;  .lock  held (flock) while a run uses out_dir;  plots/

A checkpoint is written in checkpoints/.tmp-NAME and renamed into place once complete, so a listed checkpoint was
whole when written; the manifest catches what happened to it since (a truncated copy, a bad disk block). Older
checkpoints (a state.pt holding everything, no meta.json) load the same way.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from data import NO_LOCKS
from l0 import L0Module, TargetShape
from model import ModelConfig, Transformer, prune_state_dict

STAGES = ("prune", "cpt")
MANIFEST = "manifest.json"
META_KEYS = ("stage", "step", "config", "model_config", "src_path", "clock", "sampler")  # meta.json; the rest: state.pt
RUN_FILES = ("checkpoints", "pruned", "hf", "plots", "metrics.jsonl", "masks.pt", "done.json")  # what a run writes


class CheckpointError(Exception):
    """A checkpoint could not be written, or none can be read: the message says what is intact and what to do."""


class RunDirError(ValueError):
    """out_dir cannot be used as asked (another config, another run holds it, not writable): a usage error."""


# -----------------------------------------------------------------------------
# collectives: no-ops in one process (train.py and report.py use these too). The tensor all-reduce is the training
# loop's (the default group, its short timeout); the barrier and the object collectives are where ranks wait for
# one rank's work (rank 0 loading or exporting a model, a checkpoint's files written and hashed), so they go through
# the control group when train.py set one (gloo, CPU, a long timeout), and so does DCP.

CONTROL = None  # the control group (train.setup_distributed); None: the default group


def set_control_group(group):
    global CONTROL
    CONTROL = group


def barrier():
    if dist.is_initialized():
        dist.barrier(group=CONTROL)


def all_reduce(t: torch.Tensor):
    if dist.is_initialized():
        dist.all_reduce(t)


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=CONTROL)
    return out


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0, group=CONTROL)
    return box[0]


# -----------------------------------------------------------------------------
# files

def error_text(e: BaseException) -> str:
    """The root cause in one line: DCP wraps a rank's OSError (disk full, ...) in a CheckpointException."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    first = (str(e).splitlines() or [""])[0]
    return first if type(e) is OSError and first else f"{type(e).__name__}: {first}"  # (ours say what failed)


def write_durably(path: str, write, atomic: bool = False):
    """write(f) to path, on disk before this returns; atomic: through path.tmp, so that a reader (or a rerun after
    a kill) sees the old file or the new one, never half of one."""
    try:
        with open(path + ".tmp" if atomic else path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, a write error, Ctrl-C: the old file stays, no half-written .tmp beside it
        if atomic:
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
        raise
    if atomic:
        os.replace(path + ".tmp", path)


def write_json(path: str, obj, atomic: bool = True):
    text = json.dumps(obj, indent=1).encode()
    write_durably(path, lambda f: f.write(text), atomic=atomic)


def hash_files(paths: list[str]) -> dict[str, tuple[int, str]]:
    """{path: (size, sha256 hex)}, files hashed in parallel threads (hashlib releases the GIL on large reads)."""
    def one(path):
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()
    with ThreadPoolExecutor(max(1, min(8, len(paths)))) as ex:
        return dict(zip(paths, ex.map(one, paths)))


def is_run_dir(path: str) -> bool:
    """A train.py out_dir that got as far as a checkpoint (or finished); a Hugging Face directory is not one."""
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "done.json"))


def checkpoint_name(stage: str, step: int) -> str:
    return f"{STAGES.index(stage)}-{stage}-{step:08d}"


def check_checkpoint(ckpt: str, rank: int = 0, world: int = 1) -> str | None:
    """None if every file in ckpt's manifest has its recorded size (all checked) and sha256 (this rank hashes
    every world-th file, so several ranks share the reading); otherwise what is wrong, in a few words."""
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.isfile(path):
        return None  # written before checkpoints had manifests: nothing to check against
    try:
        with open(path) as f:  # (a checkpoint saved in a scheduler's grace period has sizes alone: sha256 null)
            files = {str(k): (int(v[0]), None if v[1] is None else str(v[1])) for k, v in json.load(f)["files"].items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError):
        return f"{MANIFEST} is unreadable"
    for name, (size, _) in sorted(files.items()):
        p = os.path.join(ckpt, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        if os.path.getsize(p) != size:
            return f"{name} has {os.path.getsize(p)} bytes, the manifest says {size}"
    mine = [n for n in sorted(files) if files[n][1] is not None][rank::world]
    for p, (_, digest) in hash_files([os.path.join(ckpt, n) for n in mine]).items():
        if digest != files[os.path.basename(p)][1]:
            return f"{os.path.basename(p)} does not match its sha256 in the manifest (corrupted)"
    return None


def to_cpu(obj):
    """A (nested) state dict with its tensors on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def read_state(ckpt: str) -> dict:
    """A checkpoint's loop state: state.pt, with meta.json's readable part over it (older ones: state.pt alone)."""
    state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=False)
    meta = os.path.join(ckpt, "meta.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            state.update(json.load(f))
    return state


# -----------------------------------------------------------------------------
# the run directory

class RunDir:
    """out_dir: its paths, its lock, its config check, metrics.jsonl, its checkpoints."""

    def __init__(self, path: str):
        self.path = path
        self.config = os.path.join(path, "config.json")
        self.metrics = os.path.join(path, "metrics.jsonl")
        self.done = os.path.join(path, "done.json")
        self.root = os.path.join(path, "checkpoints")
        self.lock_file = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # ---------------------------------------------------------------- claiming it

    def lock(self, master: bool):
        """An exclusive flock on out_dir/.lock for the whole run, so that two runs never write one out_dir; the OS
        releases it when the process ends, however it ends, so a killed run leaves no stale lock. Every rank
        raises if another process holds it. unlock() releases it early (in-process callers)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunDirError(f"out_dir={self.path} exists and is not a directory; choose another out_dir")
        held = f = None
        if master:
            try:
                os.makedirs(self.path, exist_ok=True)
                f = open(self.file(".lock"), "a+")
            except OSError as e:
                raise RunDirError(f"cannot write in out_dir={self.path} ({e.strerror}); choose a writable "
                                  "out_dir") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                f.truncate(0)
                f.write(f"{os.getpid()}\n")
                f.flush()
            except BlockingIOError:
                f.seek(0)
                held = f.read().strip() or "?"
                f.close()
                f = None
            except OSError as e:
                if e.errno not in NO_LOCKS:
                    raise
                print(f"warning: {self.path} is on a filesystem without locks ({e.strerror}); running without the "
                      "lock: make sure that no other run uses this out_dir", file=sys.stderr, flush=True)
        held = broadcast_object(held)
        if held is not None:
            raise RunDirError(f"{self.path} is in use by another train.py run (pid {held}); wait for it to finish, "
                              "or use another out_dir")
        self.lock_file = f

    def unlock(self):
        if self.lock_file is not None:
            self.lock_file.close()
            self.lock_file = None

    def prepare(self, config: dict, resumable: set, fixed: set, master: bool, log=print) -> str:
        """'run' | 'done'. An out_dir holding a run with another config is refused, listing the keys that differ,
        unless they are in config["allow_changes"] (resume with them changed; never those in `fixed`) or
        config["overwrite"] (start over). Keys in `resumable` may always change. Writes config.json."""
        status = "run"
        if os.path.isfile(self.config):
            started = os.path.isfile(self.done) or self.checkpoints()
            try:
                with open(self.config) as f:
                    old = json.load(f)
            except ValueError:
                old = None
            if not isinstance(old, dict):
                if started and not config["overwrite"]:
                    raise RunDirError(f"{self.config} is corrupted; restore it, or pass --overwrite=true to start the "
                                      f"run in {self.path} over")
                old = {"config.json": "corrupted"}  # differs from any config
            allowed = {k.strip() for k in config["allow_changes"].split(",") if k.strip()}
            diff = sorted(k for k in set(old) | set(config) if k not in resumable and old.get(k) != config.get(k))
            if diff and not started:  # an attempt that failed before its first checkpoint: nothing to protect
                diff = []
            if diff and not config["overwrite"]:
                if set(diff) - allowed:
                    refused = [k for k in diff if k not in allowed]
                    raise RunDirError(f"{self.path} holds a run with another config ({', '.join(refused)} differ); "
                                      f"use another out_dir, --allow_changes={','.join(refused)} to resume it with the "
                                      "new values, or --overwrite=true to start it over")
                if changed := [k for k in diff if k in fixed]:
                    raise RunDirError(f"{', '.join(changed)} cannot change when resuming {self.path} (its checkpoints' "
                                      "data order and shapes depend on them); use another out_dir, or --overwrite=true")
                log(f"resuming {self.path} with a changed config: " + ", ".join(
                    f"{k} {old.get(k)!r} -> {config.get(k)!r}" for k in diff))
            elif diff:  # overwrite: start over
                if master:
                    for p in map(self.file, RUN_FILES):
                        shutil.rmtree(p) if os.path.isdir(p) else os.path.exists(p) and os.remove(p)
            elif os.path.isfile(self.done):
                status = "done"
        barrier()
        if master and status != "done":
            os.makedirs(self.path, exist_ok=True)
            write_json(self.config, config)
        return status

    # ---------------------------------------------------------------- metrics.jsonl

    def record(self, row: dict):
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        if not os.path.isfile(self.metrics):
            return []
        rows = []
        with open(self.metrics) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # the last line, cut by a kill or a full disk; the resumed run writes it again
                    pass
        return rows

    def truncate_metrics(self, stage: str | None, step: int = 0):
        """On resume from (stage, step), drop the lines written after the checkpoint (they will be written again);
        stage None: a run starting (over), whose file holds no line of its own."""
        if stage is None:
            if os.path.exists(self.metrics):
                os.remove(self.metrics)
            return
        pos = (STAGES.index(stage), step)
        # lines of the checkpoint's own step stay, except at step 0, whose evaluation the resumed stage repeats
        keep = [r for r in self.read_metrics() if (STAGES.index(r["stage"]), r["step"]) < pos or
                (r["stage"], r["step"]) == (stage, step) and step > 0]
        text = "".join(json.dumps(r) + "\n" for r in keep).encode()  # rewritten always: drops a cut last line too
        write_durably(self.metrics, lambda f: f.write(text), atomic=True)

    # ---------------------------------------------------------------- checkpoints

    def checkpoints(self) -> list[str]:
        """The checkpoint directories, oldest first (hidden ones are unfinished saves or set aside as damaged)."""
        if not os.path.isdir(self.root):
            return []
        whole = lambda d: any(os.path.isfile(os.path.join(self.root, d, f)) for f in (MANIFEST, "state.pt"))  # noqa
        return [os.path.join(self.root, d) for d in sorted(os.listdir(self.root)) if not d.startswith(".") and whole(d)]

    def newest(self) -> str | None:
        """The newest checkpoint's name, for messages that say what a rerun resumes from."""
        have = self.checkpoints()
        return os.path.basename(have[-1]) if have else None

    def latest(self) -> str | None:
        """The newest checkpoint that passes check_checkpoint, read by one process (damaged ones: a warning)."""
        for ckpt in reversed(self.checkpoints()):
            problem = check_checkpoint(ckpt)
            if problem is None:
                return ckpt
            print(f"warning: checkpoint {ckpt} is damaged ({problem}); trying the one before it", file=sys.stderr)
        return None

    def find_resume(self, rank: int, world: int, log) -> str | None:
        """The newest checkpoint whose files match its manifest (all ranks share the hashing). A damaged one is
        renamed .damaged-NAME, kept for inspection but never loaded again, and the one before it is tried."""
        damaged = []
        # rank 0's listing for all: on a shared filesystem another node's directory cache may be behind
        for ckpt in reversed(broadcast_object(self.checkpoints() if rank == 0 else None)):
            problem = next((p for p in all_gather_object(check_checkpoint(ckpt, rank, world)) if p), None)
            if problem is None:
                return ckpt
            aside = os.path.join(self.root, ".damaged-" + os.path.basename(ckpt))
            if rank == 0:
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(ckpt, aside)
            log(f"warning: checkpoint {ckpt} is damaged ({problem}); set aside as {aside}, trying the one before it")
            damaged.append(f"{os.path.basename(ckpt)}: {problem}")
            barrier()
        if damaged:
            raise CheckpointError(f"no undamaged checkpoint in {self.root} ({'; '.join(damaged)}); they are set aside "
                                  "as .damaged-*: restore them from a copy, or run the same command again to start "
                                  "the run over")
        return None


def save(run: RunDir, model, optimizer, state: dict, keep: int, rank: int, world: int, hashed: bool = True):
    """Model and optimizer shards (DCP), then meta.json and state.pt (the loop state), then manifest.json with every
    file's size and sha256 (each rank hashes its share), all in checkpoints/.tmp-NAME, renamed to NAME once
    complete. Any failure (a full disk) on any rank removes the partial directory and raises CheckpointError on
    every rank; older checkpoints are untouched, and only once the new one is in place are those beyond `keep`
    (0: none) deleted. hashed=False (a save in a scheduler's grace period before its SIGKILL) records the sizes
    alone: reading every file back for its sha256 would take as long again (minutes for 7B)."""
    name = checkpoint_name(state["stage"], state["step"])
    tmp, final = os.path.join(run.root, ".tmp-" + name), os.path.join(run.root, name)

    def phase(fn):  # run fn on this rank; if it failed on any rank, clean up and fail on all of them
        try:
            out, err = fn(), None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            out, err = None, error_text(e)
        err = next((e for e in all_gather_object(err) if e), None)
        if err is not None:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            have = run.newest()
            raise CheckpointError(f"could not write checkpoint {name} ({err}); " + (
                f"{have} is intact: fix that and run the same command again to resume from it" if have else
                "there is no earlier checkpoint: fix that and run the same command again"))
        return out

    def start():
        if rank == 0:
            os.makedirs(run.root, exist_ok=True)
            for d in os.listdir(run.root):  # leftovers of a save that was interrupted
                if d.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(run.root, d), ignore_errors=True)
            os.makedirs(tmp)

    def write_state():
        if rank == 0:
            write_json(os.path.join(tmp, "meta.json"), {k: state[k] for k in META_KEYS}, atomic=False)
            rest = to_cpu({k: v for k, v in state.items() if k not in META_KEYS})  # loads on any device
            write_durably(os.path.join(tmp, "state.pt"), lambda f: torch.save(rest, f))

    phase(start)
    msd, osd = get_state_dict(model, optimizer)
    phase(lambda: dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp, process_group=CONTROL))
    phase(write_state)
    names = broadcast_object(sorted(os.listdir(tmp)) if rank == 0 else None)  # one listing (see find_resume)
    mine = phase(lambda: hash_files([os.path.join(tmp, n) for n in names[rank::world]]) if hashed else
                 {os.path.join(tmp, n): (os.path.getsize(os.path.join(tmp, n)), None) for n in names[rank::world]})
    files = {os.path.basename(p): list(v) for part in all_gather_object(mine) for p, v in part.items()}

    def finish():
        if rank != 0:
            return
        write_json(os.path.join(tmp, MANIFEST), dict(format=1, files=files), atomic=False)
        if os.path.exists(final):  # the same step saved again after a resume: the new copy replaces it
            os.rename(final, tmp + "-old")
        os.rename(tmp, final)
        shutil.rmtree(tmp + "-old", ignore_errors=True)
        fd = os.open(run.root, os.O_RDONLY)  # the rename itself survives a power loss
        os.fsync(fd)
        os.close(fd)
    phase(finish)
    if rank == 0:
        done = run.checkpoints()
        for old in done[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def load(ckpt: str, model, optimizer) -> dict:
    """Fill model and optimizer (sharded or not) from a checkpoint; returns its loop state."""
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ckpt, process_group=CONTROL)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return read_state(ckpt)


def save_masks(run: RunDir, l0: L0Module, masks: dict):
    """masks.pt: the masks compaction used, the gates' log_alpha, the lambdas, the target and the source's shape."""
    obj = dict(masks={k: v.cpu() for k, v in masks.items()},
               log_alpha={m: z.log_alpha.detach().cpu() for m, z in l0.z.items()},
               lambdas={k: float(v.detach()) for k, v in l0.lambdas.items()}, target=asdict(l0.target),
               source_config=asdict(l0.cfg))
    write_durably(run.file("masks.pt"), lambda f: torch.save(obj, f), atomic=True)


def load_run(path: str) -> tuple[ModelConfig, dict, str]:
    """A run directory's latest checkpoint -> (config, weights, tokenizer source: the run's source model). A
    pruning-stage checkpoint is compacted with its current deterministic masks, i.e. what the run would hand to
    continued pretraining. Raises CheckpointError when no checkpoint is whole."""
    ckpt = RunDir(path).latest()
    if ckpt is None:
        raise CheckpointError(f"{path} holds no complete, undamaged checkpoint")
    state = read_state(ckpt)
    cfg = ModelConfig(**state["model_config"])
    with torch.device("meta"):
        shapes = Transformer(cfg).state_dict()
    sd = {"model": {k: torch.empty(v.shape) for k, v in shapes.items()}}
    with warnings.catch_warnings():  # one process reading a checkpoint: DCP says distributed is off, each time
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(sd, checkpoint_id=ckpt)  # reads the model's shards only, not the optimizer's
    sd = sd["model"]
    if state["stage"] == "prune":
        # the run's kept values (runs from before mask_values compacted with binary ones)
        l0 = L0Module(cfg, TargetShape.resolve(cfg, **state["config"]),
                      values=state["config"].get("mask_values", "binary"))
        l0.load_state_dict(state["l0"])
        cfg, sd = prune_state_dict(cfg, sd, l0.deterministic_masks())
    return cfg, sd, state["src_path"]
