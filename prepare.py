"""
Text -> per-domain token bins for training (read back by data.py).

    python prepare.py                                    # the embedded demo corpus -> data/demo
    python prepare.py --tokenizer models/llama-2-7b --out data/mine \\
        --domain code='src/**/*.py' --domain web='crawl/*.jsonl.gz' --val-tokens 1000000
    python prepare.py --hf-dataset cerebras/SlimPajama-627B --domain-field meta.redpajama_set_name \\
        --max-tokens-per-domain 100000000 --out data/slimpajama          # needs `pip install datasets`

Output: OUT/meta.json and OUT/<domain>/{train,val}.bin, flat little-endian token ids, uint16 when the
vocabulary fits (<= 65536 ids), else uint32. Each document is stored as [BOS] text EOS: BOS only for
families that use one; EOS is the tokenizer's document-end token (<|endoftext|>, <|end_of_text|>) when it
has one, not a chat model's end-of-turn token, else its configured EOS (--eos-token overrides). The
validation split is held out by whole documents: every 5th document goes to val until it holds --val-tokens
tokens.

The demo corpus is real text found on any Debian + Python machine: the Python standard library (code),
license texts (legal), Debian changelogs (changelog), English man pages rendered to text (man) and
non-English ones (man-intl); a domain whose source is absent is skipped with a warning. Files are read in
a fixed pseudo-random order (sorted, then shuffled with --seed), so a size cap takes a representative,
reproducible sample. The output does not depend on --workers.

OUT is built in a hidden temp dir beside it and renamed into place once complete, so an interrupted run
never leaves a dataset that looks finished. Running again with the same settings is a no-op; --force
rebuilds, and the old dataset stays in place until the new one is complete.
"""

import argparse
import collections
import concurrent.futures as cf
import glob
import gzip
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import FORMAT, dir_lock, recover_dir, replace_dir, tokenizer_fingerprint

VAL_EVERY = 5           # every 5th document is a validation document, until val is full
BATCH_BYTES = 1 << 20   # text per tokenizer task: enough to amortize the inter-process traffic
# Llama-3's pre-tokenizer regex; its tokenizer.model (tiktoken format) does not carry one
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEMO_DOMAINS = ("code", "legal", "changelog", "man", "man-intl")
DOC_END = ("<|endoftext|>", "<|end_of_text|>")  # GPT-2/NeoX/Qwen/SmolLM and Llama-3 document ends


class PrepareError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


# -----------------------------------------------------------------------------
# tokenizer

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None



class Tokenizer:
    """A model dir's tokenizer (tokenizer.json, or tokenizer.model as sentencepiece or tiktoken) and its
    BOS/EOS convention, from tokenizer_config.json, then config.json, then generation_config.json."""

    def __init__(self, model_dir, eos_token: str | None = None):
        d = Path(model_dir)
        # in-process encoding uses every core: HF tokenizers through its own thread pool, sentencepiece and
        # tiktoken through their batch threads (worker processes set this to 1)
        self.threads = os.cpu_count() or 1
        tc = read_json(d / "tokenizer_config.json")
        self._hf = self._sp = self._tt = None
        defaults = {}
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            self.kind, self._hf = "tokenizers", HFTokenizer.from_file(str(d / "tokenizer.json"))
            self._hf.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not EOS
            self.vocab_size = max(self._hf.get_vocab(with_added_tokens=True).values()) + 1
        elif (d / "tokenizer.model").is_file():
            with open(d / "tokenizer.model", "rb") as f:
                first = f.readline(4096)
            if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first):  # tiktoken BPE: "base64(token) rank" lines
                import tiktoken
                from tiktoken.load import load_tiktoken_bpe
                self._ranks = load_tiktoken_bpe(str(d / "tokenizer.model"))
                n = len(self._ranks)
                if tc.get("added_tokens_decoder"):
                    self._specials = {v["content"]: int(k) for k, v in tc["added_tokens_decoder"].items()}
                    self.vocab_size = max(n, max(self._specials.values()) + 1)
                else:  # Llama-3's layout: BOS and EOS first among 256 reserved ids after the BPE ranks
                    self._specials = {"<|begin_of_text|>": n, "<|end_of_text|>": n + 1}
                    self.vocab_size = n + 256
                self.kind, self._tt = "tiktoken", tiktoken.Encoding(
                    "tokenizer.model", pat_str=LLAMA3_PAT, mergeable_ranks=self._ranks, special_tokens=self._specials)
                defaults = {"bos": self._specials.get("<|begin_of_text|>"),
                            "eos": self._specials.get("<|end_of_text|>")}
            else:
                import sentencepiece as spm
                self.kind, self._sp = "sentencepiece", spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
                self.vocab_size = self._sp.get_piece_size()
                defaults = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id()}  # -1 when the model has none
        else:
            raise PrepareError(f"{d} has no tokenizer.json or tokenizer.model")
        cfgs = [read_json(d / "config.json"), read_json(d / "generation_config.json")]

        def special(key):
            tok = tc.get(f"{key}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if isinstance(tok, str) and self.token_id(tok) is not None:
                return self.token_id(tok)
            for v in [cfg.get(f"{key}_token_id") for cfg in cfgs] + [defaults.get(key)]:
                v = v[0] if isinstance(v, list) and v else v  # generation configs may list several EOS ids
                if isinstance(v, int) and 0 <= v < self.vocab_size:
                    return v
            return None

        self.bos_id, self.eos_id = special("bos"), special("eos")
        # Documents end with the document-end token of pretraining. Chat models configure a turn end as EOS
        # (<|im_end|>, <|eot_id|>), which would teach "end of turn" at every document boundary.
        for name in ((eos_token,) if eos_token else DOC_END):
            if self.token_id(name) is not None:
                self.eos_id = self.token_id(name)
                break
        else:
            if eos_token:
                raise PrepareError(f"--eos-token {eos_token!r} is not a token of the tokenizer in {d}")
        if self.eos_id is None:
            raise PrepareError(f"{d}: cannot tell the end-of-document token; set eos_token in tokenizer_config.json")
        if isinstance(tc.get("add_bos_token"), bool):
            add_bos = tc["add_bos_token"]
        elif self._hf is not None:  # does the tokenizer's own post-processor put BOS in front?
            add_bos = self._hf.encode("a").ids[:1] == [self.bos_id]
        else:                       # sentencepiece (LLaMA-1/2) and tiktoken (Llama-3) models start with BOS
            add_bos = True
        self.add_bos = add_bos and self.bos_id is not None

    def token_id(self, s: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(s)
        if self._sp is not None:
            i = self._sp.piece_to_id(s)
            return i if self._sp.id_to_piece(i) == s else None  # unknown pieces map to <unk>
        return self._specials.get(s, self._ranks.get(s.encode()))

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        if self._hf is not None:
            encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)  # _fast skips offsets
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        if self._sp is not None:
            return self._sp.encode(texts, num_threads=self.threads)
        return self._tt.encode_ordinary_batch(texts, num_threads=self.threads)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids) if self._sp is not None else self._tt.decode(ids)


_WORKER = None  # (Tokenizer, dtype) of this process, for _encode_task


def _init_worker(model_dir, eos_token, dtype):
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    tok = Tokenizer(model_dir, eos_token)
    tok.threads = 1
    _WORKER = (tok, np.dtype(dtype))


def _encode_task(task):
    """(domain, texts) -> (domain, ids of [BOS] text EOS for each text back to back, lengths, utf-8 sizes)."""
    name, texts = task
    tok, dtype = _WORKER
    head = [tok.bos_id] if tok.add_bos else []
    docs = [head + ids + [tok.eos_id] for ids in tok.encode(texts)]
    ids = np.array(list(itertools.chain.from_iterable(docs)), dtype=dtype)
    return name, ids, np.array([len(d) for d in docs]), [len(t.encode()) for t in texts]


def ordered_map(executor, fn, items, depth):
    """executor.map that reads `items` at most `depth` ahead of the results (they may be an endless stream)."""
    if executor is None:
        yield from map(fn, items)
        return
    pending = collections.deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# -----------------------------------------------------------------------------
# sources: each domain is an iterator of documents (str) in a deterministic order

def get_field(row, dotted: str):
    for key in dotted.split("."):
        if not isinstance(row, dict) or key not in row:
            return KeyError
        row = row[key]
    return row


def read_text(path: str, strict: bool = True) -> str:
    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if strict:
            raise PrepareError(f"{path} is not UTF-8 text") from None
        return data.decode("latin-1")  # old Debian changelogs


def read_docs(path: str, text_field: str):
    """A local file's documents: one per row of .jsonl / .jsonl.gz / .parquet; any other file is one document."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        f = pq.ParquetFile(path)
        if text_field not in f.schema_arrow.names:
            raise PrepareError(f"{path}: no column {text_field!r} (it has {f.schema_arrow.names}); use --text-field")
        for batch in f.iter_batches(columns=[text_field], batch_size=1024):
            yield from filter(None, batch.column(0).to_pylist())
    elif path.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                try:
                    text = get_field(json.loads(line), text_field) if line.strip() else None
                except ValueError as e:
                    raise PrepareError(f"{path}:{i}: not valid JSON ({e})") from None
                if text is KeyError or not isinstance(text, (str, type(None))):
                    raise PrepareError(f"{path}:{i}: no string field {text_field!r}; use --text-field")
                if text:
                    yield text
    else:
        yield read_text(path)


def local_source(pattern: str, text_field: str, seed: int):
    files = glob.glob(os.path.join(pattern, "**", "*") if os.path.isdir(pattern) else pattern, recursive=True)
    files = sorted(f for f in files if os.path.isfile(f))
    if not files:
        raise PrepareError(f"no files match {pattern!r}")
    random.Random(seed).shuffle(files)

    def docs():
        for f in files:
            try:
                yield from read_docs(f, text_field)
            except (OSError, EOFError, ValueError) as e:  # unreadable, truncated gzip, broken parquet
                raise PrepareError(f"cannot read {f}: {e}") from None
    return f"{pattern} ({len(files)} files)", docs()


def load_demo_file(path: str) -> str:
    """A demo file as text; man pages rendered without hyphenation or justification, overstrikes removed."""
    try:
        if "/man/" not in path:
            return read_text(path, strict=False)
        env = {**os.environ, "MANWIDTH": "100", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
        out = subprocess.run(["man", "--nh", "--nj", "-l", path], capture_output=True, env=env, timeout=60).stdout
        return re.sub(".\x08", "", out.decode("utf-8", "replace"))
    except (OSError, EOFError, subprocess.TimeoutExpired):
        return ""  # unreadable or unrenderable: skipped


def demo_docs(files, threads):
    """Documents of demo files loaded on a thread pool (rendering a man page waits on subprocesses),
    in order, without duplicate contents (many packages ship identical copyright files and changelogs)."""
    seen = set()
    with cf.ThreadPoolExecutor(threads) as ex:
        for text in ordered_map(ex, load_demo_file, files, depth=2 * threads):
            digest = hashlib.sha1(text.encode()).digest()
            if text.strip() and digest not in seen:
                seen.add(digest)
                yield text


def demo_sources(names, seed: int) -> dict:
    """name -> (description, documents) for the demo domains whose sources exist on this machine."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    man = shutil.which("man") is not None
    found = {
        "code": (f"Python standard library {stdlib}",
                 [str(p) for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts)]),
        "legal": ("/usr/share/common-licenses/*, /usr/share/doc/*/copyright",
                  glob.glob("/usr/share/common-licenses/*") + glob.glob("/usr/share/doc/*/copyright")),
        "changelog": ("/usr/share/doc/**/changelog.Debian.gz",
                      glob.glob("/usr/share/doc/**/changelog.Debian.gz", recursive=True)),
        "man": ("man pages /usr/share/man/man[1-9] without gcloud, rendered with man", [
            p for p in glob.glob("/usr/share/man/man[1-9]/*") if man and not os.path.basename(p).startswith("gcloud")]),
        "man-intl": ("man pages /usr/share/man/<lang>/man[1-9], rendered with man",
                     glob.glob("/usr/share/man/*/man[1-9]/*") if man else []),
    }
    sources = {}
    for name in names:
        desc, files = found[name]
        files = sorted({os.path.realpath(f) for f in files if os.path.isfile(f)})  # links name the same page
        if not files:
            print(f"warning: demo domain {name!r} skipped: no {desc} on this machine", file=sys.stderr)
            continue
        random.Random(seed).shuffle(files)
        sources[name] = (f"{desc} ({len(files)} files)", demo_docs(files, threads=2 * (os.cpu_count() or 1)))
    return sources


def hf_docs(args, stop):
    """(domain, text) pairs streamed from a Hugging Face dataset; ends once every wanted domain is full."""
    import datasets
    for row in datasets.load_dataset(args.hf_dataset, args.hf_config, split=args.hf_split, streaming=True):
        name = get_field(row, args.domain_field)
        if name is KeyError:
            raise PrepareError(f"--domain-field {args.domain_field!r} is not in the rows (fields: {list(row)})")
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))
        if args.domains and all(stop(w) for w in args.domains):
            return
        text = get_field(row, args.text_field)
        if (not args.domains or name in args.domains) and not stop(name) and isinstance(text, str) and text:
            yield name, text


# -----------------------------------------------------------------------------
# tokenize and write

@dataclass
class Domain:
    name: str
    source: str
    optional: bool = False  # demo domains are dropped (with a warning) when they come out empty
    read_bytes: int = 0     # text handed to the tokenizer (for --max-mb-per-domain)
    max_id: int = -1        # the largest token id written (meta.json's max_token_id, checked by data.py)
    text_bytes: int = 0     # text of the documents written
    docs: int = 0           # documents written so far; their index picks the validation documents
    full: bool = False      # train budget and val reached: read no more
    n: dict = field(default_factory=lambda: {"train": [0, 0], "val": [0, 0]})  # split -> [docs, tokens]
    files: dict = field(default_factory=dict, repr=False)


def tokenize(docs, domains: dict, tok: Tokenizer, dtype, args, tmp: Path):
    """Tokenize the (domain, text) pairs of docs(stop) on args.workers processes into each domain's bins in tmp.
    Results are consumed in submission order, so the output does not depend on the number of workers."""
    global _WORKER
    cap = args.max_mb_per_domain * 1e6 if args.max_mb_per_domain else float("inf")
    budget = args.max_tokens_per_domain or 1 << 62

    def stop(name):
        d = domains.get(name)
        return d is not None and (d.full or d.read_bytes >= cap)

    def tasks():  # batches of one domain's texts
        buf, size = collections.defaultdict(list), collections.Counter()
        for name, text in docs(stop):
            d = domains.setdefault(name, Domain(name, f"{args.hf_dataset} where {args.domain_field} = {name}"))
            n = len(text.encode())
            d.read_bytes += n
            size[name] += n
            buf[name].append(text)
            if size[name] >= BATCH_BYTES:
                yield name, buf.pop(name)
                del size[name]
        yield from buf.items()

    ex = None
    if args.workers > 1:  # spawn, not fork: this process runs threads (man rendering, the tokenizer's own)
        ex = cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                    initargs=(args.tokenizer, args.eos_token, dtype.str))
    else:
        _WORKER = (tok, dtype)
    bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, file=sys.stderr, disable=args.quiet)
    try:
        for name, ids, lengths, nbytes in ordered_map(ex, _encode_task, tasks(), depth=2 * args.workers):
            d = domains[name]
            ends = np.cumsum(lengths)
            for start, end, nb in zip(ends - lengths, ends, nbytes):
                if d.full:
                    break
                val_room, train_room = args.val_tokens - d.n["val"][1], budget - d.n["train"][1]
                # every 5th document goes to val until it is full, and all of them once train is full
                to_val = val_room > 0 and (train_room <= 0 or d.docs % VAL_EVERY == VAL_EVERY - 1)
                split = "val" if to_val else "train"
                # the document that fills a split is cut; the rest of it is dropped, so no document is split
                # between train and val
                doc = ids[start:min(end, start + (val_room if to_val else train_room))]
                if split not in d.files:
                    (tmp / name).mkdir(exist_ok=True)
                    d.files[split] = open(tmp / name / f"{split}.bin", "wb", buffering=1 << 20)
                d.files[split].write(doc.tobytes())
                d.max_id = max(d.max_id, int(doc.max())) if len(doc) else d.max_id
                d.n[split][0] += 1
                d.n[split][1] += len(doc)
                d.docs += 1
                d.text_bytes += nb
                d.full = d.n["train"][1] >= budget and d.n["val"][1] >= args.val_tokens
            bar.update(sum(nbytes))
            bar.set_postfix_str(f"{name}: {d.n['train'][1] + d.n['val'][1]:,} tokens")
    finally:
        bar.close()
        if ex is not None:
            ex.shutdown(cancel_futures=True)
        for d in domains.values():
            for f in d.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()


def print_table(meta, out, note=""):
    rows = [(d["name"], d["train"]["docs"], d["train"]["tokens"], d["val"]["docs"], d["val"]["tokens"],
             d["text_bytes"] / 1e6) for d in meta["domains"]]
    rows.append(("total", *(sum(r[i] for r in rows) for i in range(1, 6))))
    print(f"{'domain':<14}{'train docs':>12}{'train tokens':>15}{'val docs':>10}{'val tokens':>13}{'text MB':>10}")
    for i, (name, td, tt, vd, vt, mb) in enumerate(rows):
        if i == len(rows) - 1:
            print("-" * 74)
        print(f"{name:<14}{td:>12,}{tt:>15,}{vd:>10,}{vt:>13,}{mb:>10.2f}")
    bos = f"BOS {meta['bos_id']}" if meta["add_bos"] else "no BOS"
    print(f"{out}: {meta['dtype']}, vocab {meta['vocab_size']}, {bos}, EOS {meta['eos_id']}{note}")


# -----------------------------------------------------------------------------
# main

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise PrepareError(f"{message} (see --help)")


def domain_spec(s: str):
    name, sep, pattern = s.partition("=")
    if not (sep and pattern and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)):
        raise argparse.ArgumentTypeError(f"expected NAME=GLOB, NAME made of letters, digits, '.', '_', '-': {s!r}")
    return name, pattern


def parse_args(argv):
    p = _Parser(prog="prepare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--out", metavar="DIR", help="output dir (default data/demo for the demo corpus; required otherwise)")
    add("--tokenizer", metavar="DIR", default="models/smollm2-135m",
        help="model dir with tokenizer.json or tokenizer.model (default %(default)s)")
    add("--domain", action="append", default=[], type=domain_spec, metavar="NAME=GLOB",
        help="a domain from local files (repeatable): .jsonl, .jsonl.gz, .parquet hold one document per row, "
             "any other file is one document; a directory means every file under it")
    add("--text-field", metavar="FIELD", default="text", help="text field of jsonl/parquet/HF rows (dotted if nested)")
    add("--hf-dataset", metavar="ID", help="a Hugging Face dataset, streamed (needs `pip install datasets`)")
    add("--hf-config", metavar="NAME", help="its configuration name")
    add("--hf-split", metavar="SPLIT", default="train", help="its split (default %(default)s)")
    add("--domain-field", metavar="FIELD", help="the row field that names its domain, e.g. meta.redpajama_set_name")
    add("--domains", metavar="A,B,...", help="comma-separated domains to keep (HF or demo), in this order")
    add("--max-mb-per-domain", metavar="MB", type=float,
        help="stop reading a domain once this much of its text has been read (UTF-8 text after extraction, not "
        "file bytes: JSON escapes, markup and compression are not counted; the document that crosses it is kept "
        "whole; the summary's text MB column). Default 4 for the demo, no cap otherwise")
    add("--max-tokens-per-domain", metavar="N", type=int, help="training tokens per domain (default: no cap)")
    add("--eos-token", metavar="TOKEN", help="token that ends every document (default: the tokenizer's "
        "<|endoftext|> or <|end_of_text|> if it has one, else its configured EOS)")
    add("--val-tokens", metavar="N", type=int, default=32768, help="validation tokens per domain (default %(default)s)")
    add("--workers", metavar="N", type=int, default=1,
        help="tokenizer processes (default 1: encode in this process, on all cores through the tokenizer's own "
             "threads; see bench/data.py to compare on your machine)")
    add("--seed", metavar="N", type=int, default=1234, help="seed of the file order (default %(default)s)")
    add("--force", action="store_true", help="rebuild even if OUT is complete and up to date")
    add("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.domain and args.hf_dataset:
        raise PrepareError("use either --domain or --hf-dataset, not both")
    if (args.domain or args.hf_dataset) and not args.out:
        raise PrepareError("pass --out data/NAME for your own sources (data/demo is the demo corpus)")
    if bool(args.hf_dataset) != bool(args.domain_field):
        raise PrepareError("--hf-dataset and --domain-field (the row field naming the domain) go together")
    for flag in ("max_mb_per_domain", "max_tokens_per_domain", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise PrepareError(f"--{flag.replace('_', '-')} must be positive")
    if args.val_tokens < 0:
        raise PrepareError("--val-tokens must be >= 0")
    if len(names := [n for n, _ in args.domain]) != len(set(names)):
        raise PrepareError(f"a --domain name is given twice: {names}")
    args.domains = [s.strip() for s in (args.domains or "").split(",") if s.strip()]
    if args.domain and args.domains:
        raise PrepareError("--domains selects among demo or HF domains; with --domain, list only the ones you want")
    if not args.domain and not args.hf_dataset:
        if unknown := sorted(set(args.domains) - set(DEMO_DOMAINS)):
            raise PrepareError(f"unknown demo domains {unknown}; the demo domains are {list(DEMO_DOMAINS)}")
        args.domains = args.domains or list(DEMO_DOMAINS)
        args.max_mb_per_domain = args.max_mb_per_domain or 4.0
    if args.hf_dataset:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise PrepareError("--hf-dataset needs the Hugging Face datasets library: pip install datasets") from None
    args.out = Path(args.out or "data/demo")
    if not Path(args.tokenizer).is_dir():
        raise PrepareError(f"tokenizer dir {args.tokenizer} not found: convert the default model there first "
                           "(see convert.py) or pass --tokenizer DIR, a model dir with tokenizer.json or .model")
    if tokenizer_fingerprint(args.tokenizer) is None:
        raise PrepareError(f"{args.tokenizer} has no tokenizer.json or tokenizer.model")
    return args


def run(args) -> int:
    t0, out = time.time(), args.out
    source = ({"local": dict(args.domain)} if args.domain else {"demo": args.domains} if not args.hf_dataset else
              {"hf": [args.hf_dataset, args.hf_config, args.hf_split, args.domain_field, args.domains]})
    settings = dict(format=FORMAT, source=source, text_field=args.text_field, seed=args.seed,
                    max_mb_per_domain=args.max_mb_per_domain, max_tokens_per_domain=args.max_tokens_per_domain,
                    val_tokens=args.val_tokens, eos_token=args.eos_token,
                    tokenizer_fingerprint=tokenizer_fingerprint(args.tokenizer))
    settings = json.loads(json.dumps(settings))  # compared in JSON types
    if (out / "meta.json").exists() and not args.force:
        try:
            old = json.loads((out / "meta.json").read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise PrepareError(f"{out}/meta.json is unreadable; pass --force to rebuild {out}") from None
        if old == settings:
            print_table(json.loads((out / "meta.json").read_text()), out, note=" (up to date; --force rebuilds)")
            return 0
        diff = ", ".join(k for k in settings if settings[k] != old.get(k))
        raise PrepareError(f"{out} was prepared with other settings ({diff}); pass --force to rebuild it "
                           "or choose another --out")
    if out.exists() and not (out / "meta.json").exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepareError(f"{out} exists and is not a prepared dataset (no meta.json); refusing to replace it")

    tok = Tokenizer(args.tokenizer, args.eos_token)
    dtype = np.dtype("<u2" if tok.vocab_size <= 1 << 16 else "<u4")
    if args.hf_dataset:
        domains, docs = {}, lambda stop: hf_docs(args, stop)
    else:
        sources = ({name: local_source(glob_, args.text_field, args.seed) for name, glob_ in args.domain}
                   if args.domain else demo_sources(args.domains, args.seed))
        if not sources:
            raise PrepareError("none of the demo sources exist on this machine; use --domain NAME=GLOB")
        domains = {name: Domain(name, desc, optional=not args.domain) for name, (desc, _) in sources.items()}

        def docs(stop):  # domain after domain, leaving each as soon as it is full
            for name, (_, texts) in sources.items():
                for text in texts:
                    yield name, text
                    if stop(name):
                        break
                texts.close()

    result = {}

    def build(tmp):
        tmp = Path(tmp)
        tokenize(docs, domains, tok, dtype, args, tmp)
        names = []
        for name in (args.domains or sorted(domains)) if args.hf_dataset else domains:
            d = domains.get(name)
            if d is not None and d.n["train"][1] == 0 and d.optional:
                print(f"warning: demo domain {name!r} skipped: no text", file=sys.stderr)
                shutil.rmtree(tmp / name, ignore_errors=True)
                continue
            if d is None or d.n["train"][1] == 0:
                raise PrepareError(f"domain {name!r} produced no training tokens (no text, or too few documents)")
            for split in ("train", "val"):
                (tmp / name / f"{split}.bin").touch()
            if d.n["val"][1] < args.val_tokens:
                print(f"warning: domain {name!r} has {d.n['val'][1]:,} validation tokens (< --val-tokens): "
                      f"every {VAL_EVERY}th of its {d.docs:,} documents is held out", file=sys.stderr)
            names.append(name)
        if not names:
            raise PrepareError("no domain produced any tokens")
        result["meta"] = meta = dict(
            format=FORMAT, dtype=dtype.name, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
            add_bos=tok.add_bos, max_token_id=max(domains[n].max_id for n in names),
            tokenizer_fingerprint=settings["tokenizer_fingerprint"],
            tokenizer=dict(kind=tok.kind, dir=str(args.tokenizer)), settings=settings,
            domains=[dict(name=n, source=domains[n].source, text_bytes=domains[n].text_bytes,
                          train=dict(docs=domains[n].n["train"][0], tokens=domains[n].n["train"][1]),
                          val=dict(docs=domains[n].n["val"][0], tokens=domains[n].n["val"][1]))
                     for n in names])
        with open(tmp / "meta.json", "w") as f:  # written last: a dir without it is never taken for a dataset
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    # the old dataset (--force) goes only once the new one is complete; a kill leaves one or the other
    replace_dir(str(out), build, force=True, lock=False)  # (main holds the lock)
    meta = result["meta"]
    secs = time.time() - t0
    mb = sum(d["text_bytes"] for d in meta["domains"]) / 1e6
    print_table(meta, out, note=f" ({mb:.1f} MB of text in {secs:.1f} s, {mb / secs:.2f} MB/s)")
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        with dir_lock(str(args.out)):  # one prepare.py per OUT; what a killed one left is finished or undone first
            recover_dir(str(args.out))
            return run(args)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. no permission to write OUT, disk full
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare.py: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
