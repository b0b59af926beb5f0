"""
Per-domain token bins (written by prepare.py) and the mixture sampler that feeds training.

    bins = DomainBins("data/demo")                               # validates meta.json, memory-maps the bins
    bins.check_compatible(model_vocab_size, tokenizer_fingerprint(model_dir))
    sampler = MixtureSampler(bins, seq_len=1024, global_batch_size=64, seed=1337)
    x, y, dom = sampler.next(proportions, rank, world_size)     # this rank's rows of the global batch
    # one call per optimizer step; with gradient accumulation, split x, y, dom into micro-batches
    for x, y in bins.val_batches("code", seq_len=1024, batch_size=16, max_batches=8, rank=rank, world_size=world):
        ...

Layout: DIR/meta.json + DIR/<domain>/{train,val}.bin, flat little-endian uint16 or uint32 token ids, documents
back to back ([BOS] text EOS). Training sequences are fixed windows of seq_len+1 tokens starting at multiples
of seq_len, so every token is a target exactly once per pass over a domain.

Sampling is global: every rank computes the same global batch from (seed, step, proportions) and gathers only
its own rows, so results do not depend on the world size and resuming is exact. Rows per domain use systematic
sampling: one seeded uniform u per step, row i goes to the domain whose cumulative-proportion interval holds
(u + i) / B. Each domain then gets floor(B*p) or ceil(B*p) rows and exactly B*p on average: unbiased like a
multinomial draw (so a domain with B*p < 1 still gets its share over steps, unlike plain rounding), but
without the multinomial's +-sqrt(B*p) noise, which would otherwise blur the mixture the domain weighter
asked for. Within a domain, windows come from a seeded permutation per epoch (int32, 4 bytes per window) and are not
reused before it is exhausted; then a new epoch starts (a warning is logged and the domain's epoch counter increases).
"""

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

# torch is imported where tensors are made, not here: prepare.py takes FORMAT and tokenizer_fingerprint from this
# file, and each of its spawned tokenizer workers re-imports prepare.py, which must not load torch for nothing
FORMAT = 1  # the meta.json layout: prepare.py writes it, DomainBins checks it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # the files that define the id <-> text mapping
log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# durable directories: a dataset (prepare.py) or a model export (convert.py, train.py) replaced so that at every
# instant its path holds the old directory or the complete new one, or the next run can put one there

class DirInUse(OSError):
    pass


class DirExists(FileExistsError):
    pass


# flock's errors on filesystems without locks (NFS mounted nolock, some FUSE and parallel filesystems): there the
# locks of dir_lock and of a run's out_dir (checkpoint.RunDir.lock) degrade to a warning
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


@contextlib.contextmanager
def dir_lock(out: str):
    """Hold an exclusive lock on `out` (its .NAME.lock beside it) for the block; DirInUse if another process has it."""
    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.lock")
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise DirInUse(f"{out} is being written by another process (pid {f.read().strip() or '?'}); wait for "
                           "it or choose another output") from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            print(f"warning: {out} is on a filesystem without locks ({e.strerror}); writing it without the lock: "
                  "make sure that no other process writes it", file=sys.stderr, flush=True)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            os.remove(path)  # still holding it: nothing is left beside `out`
    finally:
        f.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def recover_dir(out: str):
    """Finish or undo what a killed replace_dir of `out` left: a complete new copy (.NAME.new) is moved into place
    (the swap it was making), an old copy (.NAME.old) goes once `out` is there (else it is put back), and the
    half-built copies (.NAME.tmp-PID) of processes that are gone are removed; a live process's are left alone."""
    parent, name = os.path.split(os.path.abspath(out))
    new, old = os.path.join(parent, f".{name}.new"), os.path.join(parent, f".{name}.old")
    if os.path.isdir(new):
        if os.path.lexists(out) and not os.path.lexists(old):
            os.rename(out, old)
        if not os.path.lexists(out):
            os.rename(new, out)
    if os.path.lexists(old):
        if os.path.lexists(out):
            _remove(old)
        else:
            os.rename(old, out)
    for tmp in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp-*")):
        pid = tmp.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(out: str, build, force: bool = False, lock: bool = True):
    """Write a directory at `out` by build(tmp): into a hidden sibling .NAME.tmp-PID, renamed .NAME.new once build
    returns (complete), then swapped in: `out` -> .NAME.old, .NAME.new -> `out`, .NAME.old removed. A kill at any
    point leaves `out` as it was, or `out` absent with a complete copy beside it that recover_dir (called first by
    every replace_dir of the same path) puts in place: a complete copy is never deleted. Without `force` an
    existing non-empty `out` is refused (DirExists). Holds dir_lock(out) throughout (lock=False: the caller
    holds it)."""
    parent, name = os.path.split(os.path.abspath(out))
    with dir_lock(out) if lock else contextlib.nullcontext():
        recover_dir(out)
        if os.path.exists(out) and not force and (not os.path.isdir(out) or os.listdir(out)):
            raise DirExists(f"{out} exists and is not empty")
        tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            build(tmp)
            new, old = os.path.join(parent, f".{name}.new"), os.path.join(parent, f".{name}.old")
            os.rename(tmp, new)  # complete: from here a kill leaves a copy that recover_dir moves into place
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.lexists(out):
            os.rename(out, old)
        os.rename(new, out)
        _remove(old)


def tokenizer_fingerprint(model_dir) -> str | None:
    """sha256 over the files that define the vocabulary (prepare.py records it in meta.json, training compares it
    with the model's); None when model_dir has none of them (a .gguf, a bare checkpoint): then only the vocabulary
    size can be checked."""
    found = [Path(model_dir) / n for n in TOKENIZER_FILES if (Path(model_dir) / n).is_file()]
    if not found:
        return None
    h = hashlib.sha256()
    for f in found:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return "sha256:" + h.hexdigest()


class DomainBins:
    """A prepared dataset: meta.json checked against the bins on disk, each bin memory-mapped once.

    nanoGPT re-creates its np.memmap every batch to dodge a 'memory leak'. What grows with a long-lived map is
    the process's RSS, by the file pages read through it: clean, file-backed page cache that the kernel drops
    under memory pressure (and that all ranks on a node share), not anonymous memory. So we keep maps open."""

    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            why = ("a directory without meta.json is unfinished (an interrupted prepare.py run?); run prepare.py again"
                   if self.path.is_dir() else "run prepare.py first")
            raise FileNotFoundError(f"no dataset at {self.path}: {meta_path} not found; {why}")
        try:
            meta = json.loads(meta_path.read_text())
            if meta["format"] != FORMAT:
                raise ValueError(f"format {meta['format']}, expected {FORMAT}")
            self.dtype = np.dtype({"uint16": "<u2", "uint32": "<u4"}[meta["dtype"]])
            self.vocab_size, self.eos_id = int(meta["vocab_size"]), int(meta["eos_id"])
            self.bos_id = None if meta["bos_id"] is None else int(meta["bos_id"])
            self.tokenizer_fingerprint = str(meta["tokenizer_fingerprint"])
            self.domains = [str(d["name"]) for d in meta["domains"]]
            sizes = [(int(d["train"]["tokens"]), int(d["val"]["tokens"])) for d in meta["domains"]]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path} is corrupted ({type(e).__name__}: {e}); "
                             "rebuild the dataset with prepare.py --force") from None
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"{meta_path} lists no domains or a domain twice: {self.domains}")
        self.meta = meta
        self.train, self.val = [], []  # per domain: 1-D arrays of token ids (views of the memory maps)
        for name, (n_train, n_val) in zip(self.domains, sizes):
            if n_train == 0:
                raise ValueError(f"domain {name!r} of {self.path} has no training tokens; "
                                 "drop it or give it more text and rerun prepare.py")
            for split, n, arrays in (("train", n_train, self.train), ("val", n_val, self.val)):
                f = self.path / name / f"{split}.bin"
                if not f.is_file():
                    raise FileNotFoundError(f"{f} is missing; rebuild the dataset with prepare.py --force")
                if f.stat().st_size != n * self.dtype.itemsize:
                    raise ValueError(f"{f} holds {f.stat().st_size} bytes but meta.json says {n} {self.dtype.name} "
                                     "tokens; rebuild the dataset with prepare.py --force")
                # np.asarray drops the memmap subclass (slicing a memmap is several times slower); the map stays
                # alive as the array's base. Empty files cannot be mapped.
                arrays.append(np.asarray(np.memmap(f, dtype=self.dtype, mode="r")) if n else np.empty(0, self.dtype))

    def index(self, domain) -> int:
        """A domain's position in the domain order, from its name or index."""
        if isinstance(domain, str) and domain in self.domains:
            return self.domains.index(domain)
        if isinstance(domain, (int, np.integer)) and 0 <= domain < len(self.domains):
            return int(domain)
        raise ValueError(f"unknown domain {domain!r}; {self.path} has {self.domains}")

    def per_domain(self, name: str, value) -> list | None:
        """A per-domain setting, {domain: value} or a list in this dataset's domain order -> a list in its order."""
        if value is None:
            return None
        if isinstance(value, dict):
            if set(value) != set(self.domains):
                raise ValueError(f"{name} names {sorted(value)} but {self.path} has the domains {self.domains}")
            return [value[d] for d in self.domains]
        if len(value) != len(self.domains):
            raise ValueError(f"{name} has {len(value)} values but {self.path} has {len(self.domains)} domains: need "
                             f"one value per domain of {self.domains}")
        return list(value)

    def check_compatible(self, vocab_size: int, tokenizer_fingerprint: str | None = None):
        """Refuse data the model cannot read: ids beyond its embedding, or another tokenizer's ids."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"{self.path} was tokenized with a {self.vocab_size}-token vocabulary but the model has "
                             f"{vocab_size} embeddings; prepare the data with the model's tokenizer "
                             "(prepare.py --tokenizer MODEL_DIR)")
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise ValueError(f"{self.path} was tokenized with another tokenizer ({self.tokenizer_fingerprint[:19]}) "
                             f"than the model's ({tokenizer_fingerprint[:19]}); rerun prepare.py --tokenizer MODEL_DIR")
        top = self.max_token_id()
        if top >= min(vocab_size, self.vocab_size):  # found now, not at the batch that samples it hours in
            raise ValueError(f"{self.path} holds token id {top}, beyond the {min(vocab_size, self.vocab_size)}-token "
                             "vocabulary its meta.json and the model have: the bins are not what meta.json says; "
                             "rerun prepare.py --force")

    def max_token_id(self) -> int:
        """The largest id in the bins: meta.json's max_token_id (prepare.py records it), else read once, here."""
        if "max_token_id" in self.meta:
            return int(self.meta["max_token_id"])
        chunk = 1 << 24
        return max((int(a[i:i + chunk].max()) for a in (*self.train, *self.val) for i in range(0, len(a), chunk)),
                   default=-1)

    def val_batches(self, domain, seq_len: int, batch_size: int, max_batches: int | None = None,
                    rank: int = 0, world_size: int = 1):
        """Fixed evaluation batches (x, y) of one domain: consecutive windows of seq_len+1 tokens from the start
        of val.bin, the same on every call. batch_size is global: each rank gets rows [r*B/W, (r+1)*B/W) of every
        batch, so all ranks run the same number of forward passes. Windows that do not fill a batch are left out."""
        d = self.index(domain)
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size} (rank {rank})")
        val, T = self.val[d], seq_len
        n = max(len(val) - 1, 0) // T // batch_size
        n = n if max_batches is None else min(n, max_batches)
        if n == 0:
            raise ValueError(f"domain {self.domains[d]!r} has {len(val)} validation tokens, fewer than one batch of "
                             f"{batch_size} x {T + 1}; lower the eval batch size or rerun prepare.py --val-tokens")

        def batches():
            import torch
            for b in range(n):
                lo = b * batch_size + rank * batch_size // world_size
                hi = b * batch_size + (rank + 1) * batch_size // world_size
                seg = torch.from_numpy(val[lo * T: hi * T + 1].astype(np.int64))  # rows overlap by one token
                yield seg[:-1].view(-1, T), seg[1:].view(-1, T)
        return batches()


class MixtureSampler:
    """Deterministic, resumable batches whose domain mixture may change at every step (see the module doc)."""

    def __init__(self, bins: DomainBins, seq_len: int, global_batch_size: int, seed: int = 0):
        if seq_len < 1 or global_batch_size < 1 or seed < 0:
            raise ValueError("seq_len and global_batch_size must be positive and seed non-negative")
        self.bins, self.seq_len, self.global_batch_size, self.seed = bins, seq_len, global_batch_size, seed
        self.windows = [(len(a) - 1) // seq_len for a in bins.train]  # windows of seq_len+1 tokens per domain
        for name, a, n in zip(bins.domains, bins.train, self.windows):
            if n == 0:
                raise ValueError(f"domain {name!r} has {len(a)} training tokens, fewer than seq_len+1 = {seq_len + 1}")
        D = len(bins.domains)
        self.step = 0
        self.epoch = [0] * D          # passes started over each domain's windows
        self.cursor = [0] * D         # windows taken from the current epoch's permutation
        self._perm = [None] * D       # current epoch's permutation, rebuilt from (seed, domain, epoch)

    def check_proportions(self, proportions) -> np.ndarray:
        if hasattr(proportions, "detach"):  # a torch tensor, on any device
            proportions = proportions.detach().cpu().double().numpy()
        p = np.asarray(proportions, dtype=np.float64)
        D = len(self.bins.domains)
        if p.shape != (D,):
            raise ValueError(f"proportions must have one entry per domain ({D}: {self.bins.domains}), "
                             f"got shape {p.shape}")
        if not np.all(np.isfinite(p)) or np.any(p < 0):
            raise ValueError(f"proportions must be finite and non-negative, got {p.tolist()}")
        if abs(p.sum() - 1) > 1e-6:
            raise ValueError(f"proportions must sum to 1 (got {p.sum():.8f}); normalize them first")
        return p / p.sum()

    def _take(self, d: int, n: int, verbose: bool) -> np.ndarray:
        """The next n window indices of domain d, moving to a new epoch (new permutation) when one runs out."""
        out = []
        while n > 0:
            if self._perm[d] is None:
                # int32 when it fits: half the memory of permutation(n) (80M windows: 320 MB), the same order
                w = self.windows[d]
                ids = np.arange(w, dtype=np.int32 if w < 2**31 else np.int64)
                self._perm[d] = np.random.default_rng([self.seed, 1, d, self.epoch[d]]).permutation(ids)
            c = self.cursor[d]
            k = min(n, self.windows[d] - c)
            out.append(self._perm[d][c:c + k])
            self.cursor[d], n = c + k, n - k
            if self.cursor[d] == self.windows[d]:
                self.epoch[d], self.cursor[d], self._perm[d] = self.epoch[d] + 1, 0, None
                if verbose:
                    log.warning(f"domain {self.bins.domains[d]!r}: all {self.windows[d]} windows of {self.seq_len + 1} "
                                f"tokens served; starting epoch {self.epoch[d]}, its sequences repeat from now on")
        return np.concatenate(out)

    def next(self, proportions, rank: int = 0, world_size: int = 1):
        """The next global batch, drawn with these domain proportions; returns this rank's rows
        [rank*B/W, (rank+1)*B/W) as (x, y, domain_ids): int64 tensors of shape (B/W, T), (B/W, T), (B/W,)."""
        p = self.check_proportions(proportions)
        B, T, D = self.global_batch_size, self.seq_len, len(p)
        if world_size < 1 or B % world_size or not 0 <= rank < world_size:
            raise ValueError(f"global_batch_size {B} must split evenly over world_size {world_size} (rank {rank})")
        rng = np.random.default_rng([self.seed, 0, self.step])
        cdf = np.cumsum(p)
        cdf[-1] = 1.0  # (u + i) / B < 1 always lands in some domain; zero-width intervals never do
        dom = np.searchsorted(cdf, (rng.random() + np.arange(B)) / B, side="right")
        counts = np.bincount(dom, minlength=D)
        win = np.concatenate([self._take(d, int(c), verbose=rank == 0) for d, c in enumerate(counts) if c])
        order = rng.permutation(B)  # mix domains across rows, so no rank or micro-batch holds one domain only
        dom, win = dom[order], win[order]
        self.step += 1
        lo, hi = rank * B // world_size, (rank + 1) * B // world_size
        x = np.empty((hi - lo, T), dtype=np.int64)
        y = np.empty((hi - lo, T), dtype=np.int64)
        for i, (d, w) in enumerate(zip(dom[lo:hi].tolist(), win[lo:hi].tolist())):
            a, s = self.bins.train[d], w * T
            x[i] = a[s:s + T]  # a widening copy per row, from the page cache (bench/data.py)
            y[i] = a[s + 1:s + T + 1]
        import torch
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(dom[lo:hi].astype(np.int64))

    def state_dict(self) -> dict:
        return dict(seed=self.seed, seq_len=self.seq_len, domains=list(self.bins.domains), windows=list(self.windows),
                    step=self.step, epoch=list(self.epoch), cursor=list(self.cursor))

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        for key in ("seed", "seq_len"):  # what the windows and permutations depend on
            if state.get(key) != mine[key]:
                raise ValueError(f"sampler state does not fit: {key} was {state.get(key)}, now {mine[key]}")
        if state.get("domains") != mine["domains"]:  # the dataset changed under the run: say how
            raise ValueError(f"its domains were {state.get('domains')}, now {mine['domains']}")
        if state.get("windows") != mine["windows"]:
            raise ValueError(", ".join(
                f"domain {d!r} had {a:,} training windows of {self.seq_len} tokens, now {b:,}"
                for d, a, b in zip(mine["domains"], state["windows"], mine["windows"]) if a != b) + " (rebuilt?)")
        self.step = int(state["step"])
        self.epoch, self.cursor = [int(e) for e in state["epoch"]], [int(c) for c in state["cursor"]]
        self._perm = [None] * len(self.windows)
