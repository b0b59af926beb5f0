"""
A quality study of the method against its baselines on the demo (SmolLM2-135M pruned to config/demo.py's target
shape on the demo corpus), built to tell variants apart: paired seeds, budgets equal in training seconds, a large
held-out set, and 95% confidence intervals from a paired bootstrap.

    python bench/quality.py calibrate                      # seconds per step of each kind of step here (~4 min)
    python bench/quality.py run --budget demo              # the baselines, 3 seeds, the demo's training time
    python bench/quality.py run --budget 4x --seeds 1337   # the same, 4x the time (resumable, in pieces)
    python bench/quality.py run --budget demo-tokens       # the demo's token count instead of its seconds
    python bench/quality.py run --budget demo --sweep weighting --recipe l0+imp   # the data scheduling
    python bench/quality.py report --against oneshot,l0+imp@20   # tables, verdicts and plots of what has been run

Design:
- Variants (VARIANTS; --sweep weighting makes `RECIPE/METHOD` variants of one recipe) are train.py config/demo.py
  with their options. Every variant runs on the same --seeds: a seed fixes the calibration batches, the gate
  samples and the sampler's stream, and every model is scored on the same held-out tokens and downstream examples,
  so differences are paired.
- Budgets are equal in training seconds (the runs' own stage_seconds: steps only, no evaluation or saving): `demo`
  is what config/demo.py's 60 pruning + 60 continued-pretraining steps take on this machine, `4x` four times that;
  each variant gets the steps that fill it at its own measured speed (`calibrate`: a pruning step of the masked
  full model, a continued-pretraining step of the compacted one, with and without distillation). `demo-tokens`
  gives every variant the demo's tokens instead. Seconds and tokens of every run are reported beside each other.
- Measures: per-domain validation loss on the first --val_seqs sequences of --seq_len tokens of each domain's
  validation split (per sequence, so that the bootstrap can resample them), of the compacted model (pruned/) and
  the final one (hf/); the mean over domains and the worst domain; zero-shot accuracy of the final model on --tasks
  (the first --limit validation examples of each, scored as lm-evaluation-harness scores them), averaged over tasks.
- Statistics: every variant against a reference (--against, default the first; more than one: a table each) on the
  seeds both have: the mean over seeds of the per-seed difference, and a 95% interval from a paired bootstrap that resamples seeds and,
  jointly for both variants, held-out sequences (per domain) or task examples (per task). "better" / "worse" when
  the interval excludes 0, else "not distinguishable".

Every run and its scores go into bench/results/quality-study.json as soon as it ends (with command, commit,
machine), so a sweep interrupted anywhere loses at most the run in progress (which train.py resumes from its last
checkpoint, every --save_every seconds of training). Needs `make model`, `make tasks` and the demo data (`make demo`
prepares all three).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import convert  # noqa: E402
import report  # noqa: E402
from checkpoint import RunDir  # noqa: E402
from data import DomainBins  # noqa: E402
from train import ConfigError, load_config  # noqa: E402

# What every run of the study gets, on top of --config: config/demo.py's settings when the study began (the demo has
# been tuned since, by what the study showed), pinned here so that the study does not move with the demo, and one
# continued-pretraining learning rate for every variant (scratch: its own), chosen by a one-seed pilot of the
# one-shot baseline: 6e-4 beat 2e-4 and 1.2e-3 (docs/results.md).
STUDY = dict(mask_init="uniform", prune_batch_size=4, prune_micro_batch_size=2, prune_lr=1e-4, prune_warmup=0.1,
             lag_lr=0.5, lambda_lr=2.0, lagrangian_warmup=0.5, prune_landing=0.25, cpt_batch_size=8,
             cpt_micro_batch_size=4, cpt_lr=6e-4, cpt_warmup=0.1, eval_interval=6, eval_batches=2, eval_batch_size=4)
# name -> (train.py options, pruning steps as a fraction of the demo's (None: no pruning stage), distills)
KD = ["--distill_alpha=1"]  # the KL to the source model alone, T = 1 (as Minitron retrains), in continued pretraining
VARIANTS = {
    "scratch": (["--from_scratch=true", "--cpt_lr=1e-3"], None, False),  # a from-scratch learning rate
    "oneshot": (["--mask_init=importance"], None, False),
    "oneshot+kd": (["--mask_init=importance", *KD], None, True),
    "l0": ([], 1.0, False),  # config/demo.py as it was: uniform init, lag_lr 0.5, the last quarter a landing
    "l0+imp": (["--mask_init=importance"], 1.0, False),  # the same from the importance ranking
    # the demo's recipe now: from the ranking, gates that move slowly (Adam moves every log_alpha by about lag_lr a
    # step, so at 0.5 a few steps reorder a ranking spread over 3), a third of the steps, three quarters of them
    # landing, the weights at the continued-pretraining rate
    "l0+imp@20": (["--mask_init=importance", "--lag_lr=0.02", "--prune_landing=0.75", "--prune_lr=6e-4"], 1 / 3, False),
    "l0+imp@10": (["--mask_init=importance", "--lag_lr=0.02", "--prune_landing=0.75", "--prune_lr=6e-4"], 1 / 6, False),
    "l0+imp@20+kd": (["--mask_init=importance", "--lag_lr=0.02", "--prune_landing=0.75", "--prune_lr=6e-4", *KD],
                     1 / 3, True),
}
WEIGHTING = {"constant": ["--domain_weighting=constant"], "sheared": ["--domain_weighting=sheared"],
             "dro+eval": ["--domain_weighting=dro+eval"], "dro+dy+dyall": ["--domain_weighting=dro+dy+dyall"],
             "dro+teacher": ["--domain_weighting=dro+eval", "--reference_loss=teacher"]}
BUDGETS = {"demo": ("seconds", 1), "4x": ("seconds", 4), "demo-tokens": ("tokens", 1)}


def variants(args) -> dict:
    if args.sweep == "baselines":
        return dict(VARIANTS)
    if args.recipe not in VARIANTS or VARIANTS[args.recipe][1] is None:
        sys.exit(f"--recipe must be one of the learned-mask variants {[k for k, v in VARIANTS.items() if v[1]]}")
    opts, prune, kd = VARIANTS[args.recipe]
    return {f"{args.recipe}/{m}": (opts + w, prune, kd) for m, w in WEIGHTING.items()}


def load(args) -> dict:
    p = Path(args.results)
    return json.loads(p.read_text()) if p.is_file() else {"calibration": None, "source": None, "runs": {}}


def save(args, res: dict):
    p = Path(args.results)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, p)  # whole or not at all: a kill mid-write leaves the previous results


def cpu_name() -> str:
    try:  # Linux; the budgets' seconds depend on it
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(), cpu=cpu_name(),
                cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads())


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


def study_config(args) -> dict:
    """The config's values with the study's (its batch shapes give the budgets' tokens)."""
    cfg = {}
    exec((ROOT / args.config).read_text(), {}, cfg)
    return {**cfg, **(STUDY if args.pin else {})}


def command(args, out_dir: Path, options: list[str], seed: int, prune_steps: int, cpt_steps: int) -> list[str]:
    # fp32 on every CPU (dtype=auto would take bf16 where it is native): the recorded runs and the calibration are fp32
    return [sys.executable, "train.py", args.config, f"--init_from={args.model}", f"--data_dir={args.data_dir}",
            f"--out_dir={out_dir}", f"--seed={seed}", f"--prune_steps={prune_steps}", f"--cpt_steps={cpt_steps}",
            f"--save_interval={args.save_interval}", "--keep_checkpoints=1", "--eval_tasks=", "--dtype=float32",
            *([f"--{k}={v}" for k, v in STUDY.items()] if args.pin else []), *args.extra.split(),
            *options]  # the variant's options last: they win


def same_config(cmd: list[str]) -> dict:
    """What a run trains: its train.py config, less where it writes (and the saving that does not change it)."""
    ignore = {"out_dir", "save_interval", "keep_checkpoints"}
    try:
        return {k: v for k, v in asdict(load_config(cmd[2:])).items() if k not in ignore}
    except ConfigError:  # a run of an older train.py, with options since renamed: not comparable
        return {}


def train(args, out_dir: Path, options: list[str], seed: int, prune_steps: int, cpt_steps: int) -> list[str]:
    cmd = command(args, out_dir, options, seed, prune_steps, cpt_steps)
    if not (out_dir / "done.json").is_file():
        print(f"\n== {' '.join(cmd[1:])}", flush=True)
        r = subprocess.run(cmd, cwd=ROOT)
        if r.returncode:
            sys.exit(f"train.py exited with {r.returncode}; the same command resumes the sweep")
    return cmd[1:]


# ---- calibration: seconds per step on this machine ----

def calibrate(args):
    """Short runs of each kind of step; the seconds per step the budgets are converted with."""
    res, steps = load(args), args.calibrate_steps
    per_step = {}
    for name, options in (("ce", []), ("kd", KD)):
        d = Path(args.out) / f"calibrate-{name}"
        shutil.rmtree(d, ignore_errors=True)
        train(args, d, options + ["--eval_interval=100000"], 1337, steps, steps)
        ends = {r["stage"]: r for r in RunDir(str(d)).read_metrics() if "stage_seconds" in r}
        if name == "ce":
            per_step["prune"] = ends["prune"]["stage_seconds"] / steps
        per_step[f"cpt{'+kd' if name == 'kd' else ''}"] = ends["cpt"]["stage_seconds"] / steps
        shutil.rmtree(d, ignore_errors=True)
    res["calibration"] = dict(seconds_per_step=per_step, steps=steps, date=datetime.date.today().isoformat(),
                              commit=commit(), machine=machine())
    save(args, res)
    print("seconds per step: " + ", ".join(f"{k} {v:.3f}" for k, v in per_step.items()))


def plan(args, budget: str, prune_share: float | None, kd: bool, cal: dict) -> tuple[int, int]:
    """(pruning steps, continued-pretraining steps) of a variant at a budget: its pruning steps (the demo's, scaled
    with the budget), then continued pretraining for the rest of the budget's seconds (or tokens)."""
    kind, factor = BUDGETS[budget]
    cfg, s = study_config(args), cal["seconds_per_step"]
    demo = [int(x) for x in args.demo_steps.split(",")]  # the reference: config/demo.py's steps of the recipe's time
    tok = {"prune": cfg["prune_batch_size"] * cfg["prune_seq_len"], "cpt": cfg["cpt_batch_size"] * cfg["cpt_seq_len"]}
    prune = 0 if prune_share is None else round(factor * prune_share * demo[0])
    if kind == "seconds":
        total = factor * (demo[0] * s["prune"] + demo[1] * s["cpt"])
        return prune, max(0, round((total - prune * s["prune"]) / (s["cpt+kd"] if kd else s["cpt"])))
    total = factor * (demo[0] * tok["prune"] + demo[1] * tok["cpt"])
    return prune, max(0, round((total - prune * tok["prune"]) / tok["cpt"]))


# ---- scoring ----

@torch.no_grad()
def val_losses(model, bins: DomainBins, seq_len: int, n: int) -> list[list[float]]:
    """Per domain, the mean loss of each of the first n validation sequences (the same for every model)."""
    model.eval()
    out = []
    for d in range(len(bins.domains)):
        per_seq = []
        b = min(8, n)
        for x, y in bins.val_batches(d, seq_len, b, -(-n // b)):
            per_seq += model(x, y, reduction="none").double().mean(-1).tolist()  # (B, T) -> (B,)
        if len(per_seq) < n:
            sys.exit(f"domain {bins.domains[d]} has {len(per_seq)} validation sequences of {seq_len}, not {n}: "
                     "lower --val_seqs or rerun prepare.py with more --val-tokens")
        out.append([round(v, 5) for v in per_seq[:n]])
    return out


def task_correct(path: str, args) -> dict:
    """{task: "0110..."}: whether each example's highest-scoring choice is the gold one (acc_norm where the harness
    reports it, else acc), per example, so that the bootstrap can resample examples."""
    if not args.tasks:
        return {}
    model = convert.load_model(path)
    res = report.score_tasks(model, convert.load_tokenizer(path), report.task_names(args.tasks), limit=args.limit,
                             progress=False)
    out = {}
    for name, r in res.items():
        norm = "acc_norm" in r
        out[name] = "".join(str(int(np.argmax(np.asarray(ll) / (np.asarray(n) if norm else 1)) == g))
                            for ll, n, g in zip(r["ll"], r["lengths"], r["gold"]))
        assert abs(out[name].count("1") / len(out[name]) - r["acc_norm" if norm else "acc"]) < 1e-9
    return out


def scores(path: str, bins: DomainBins, args, tasks: bool) -> dict:
    t0 = time.time()
    model = convert.load_model(path)
    bins.check_compatible(model.config.vocab_size)
    out = dict(val=val_losses(model, bins, args.seq_len, args.val_seqs))
    if tasks:
        out["tasks"] = task_correct(path, args)
    print(f"scored {path}: mean {np.mean([np.mean(v) for v in out['val']]):.4f}"
          + (f", tasks {np.mean([c.count('1') / len(c) for c in out['tasks'].values()]):.3f}" if out.get("tasks")
             else "") + f" ({time.time() - t0:.0f} s)", flush=True)
    return out


def scoring(args) -> dict:
    return dict(seq_len=args.seq_len, val_seqs=args.val_seqs, tasks=args.tasks, limit=args.limit)


def run(args):
    res = load(args)
    if res["calibration"] is None:
        sys.exit("no calibration yet: run `python bench/quality.py calibrate` first (on the machine of the sweep)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bins = DomainBins(str(ROOT / args.data_dir))
    if res["source"] is None or res["source"]["scoring"] != scoring(args):
        res["source"] = dict(scoring=scoring(args), **scores(str(ROOT / args.model), bins, args, True))
        save(args, res)
    vs = variants(args)
    only = [m.strip() for m in args.only.split(",") if m.strip()] or list(vs)
    if unknown := [m for m in only if m not in vs]:
        sys.exit(f"unknown variants {unknown}: {list(vs)}")
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed-major: a partial sweep already compares all
        for name in only:
            options, prune_share, kd = vs[name]
            prune, cpt = plan(args, args.budget, prune_share, kd, res["calibration"])
            key = f"{name}|{prune}+{cpt}|s{seed}"  # a run is its steps: budgets that agree share it
            old = res["runs"].get(key)
            if old and old["scoring"] == scoring(args) and old["options"] == options:
                res["runs"][key]["budgets"] = sorted(set(res["runs"][key]["budgets"]) | {args.budget})
                save(args, res)
                continue
            d = Path(args.out) / key.replace("|", "-").replace("+", "_").replace("/", "_")
            # a variant that trains what a finished run of another trained (RECIPE/dro+eval is RECIPE when
            # config/demo.py's weighting is dro+eval) is that run: its record, not a second run of it
            cfg = same_config(command(args, d, options, seed, prune, cpt))
            twin = next((k for k, r in res["runs"].items() if cfg and r["seed"] == seed and "same_as" not in r
                         and r["scoring"] == scoring(args) and same_config(r["command"].split()) == cfg), None)
            if twin is not None:
                res["runs"][key] = {**res["runs"][twin], "variant": name, "options": options, "same_as": twin,
                                    "budgets": sorted({args.budget} | set(res["runs"][twin]["budgets"]))}
                save(args, res)
                print(f"{key}: trains what {twin} trained; its record", flush=True)
                continue
            t0 = time.time()
            cmd = train(args, d, options, seed, prune, cpt)
            wall = time.time() - t0
            rows = RunDir(str(d)).read_metrics()
            ends = {r["stage"]: r for r in rows if "stage_seconds" in r}
            r = dict(variant=name, seed=seed, prune_steps=prune, cpt_steps=cpt, options=options,
                     command="python " + " ".join(cmd),
                     budgets=sorted({args.budget} | set(res["runs"].get(key, {}).get("budgets", []))),
                     seconds={k: v["stage_seconds"] for k, v in ends.items()},
                     tokens={k: v["stage_tokens"] for k, v in ends.items()}, wall_seconds=wall,
                     commit=commit(), date=datetime.date.today().isoformat(), machine=machine(),
                     scoring=scoring(args),
                     pruned=scores(str(d / "pruned"), bins, args, False) if (d / "pruned").is_dir() else None,
                     final=scores(str(d / "hf"), bins, args, True))
            res["runs"][key] = r
            save(args, res)
            if args.clean:  # its models are in pruned/ and hf/ (scored); a checkpoint of pruning is 1.6 GB
                shutil.rmtree(d / "checkpoints", ignore_errors=True)


# ---- statistics ----

def metrics(val: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """val (..., D, N) per-sequence losses, idx (R, D, N) resampled sequence indices -> (..., [R,] 2): the mean over
    domains and the worst domain of the per-domain mean loss."""
    if idx is None:
        dom = val.mean(-1)  # (..., D)
    else:
        dom = np.stack([val[..., d, idx[:, d]].mean(-1) for d in range(val.shape[-2])], -1)  # (..., R, D)
    return np.stack([dom.mean(-1), dom.max(-1)], -1)


def accuracy(tasks: list[np.ndarray], idx: list | None = None) -> np.ndarray:
    """tasks: per task (..., n_t) 0/1 -> (..., [R]) the average over tasks of the accuracy."""
    if idx is None:
        return np.mean([t.mean(-1) for t in tasks], 0)
    return np.mean([t[..., i].mean(-1) for t, i in zip(tasks, idx)], 0)


def paired(a: dict, b: dict, reps: int) -> dict:
    """a, b: {seed: scores} -> per measure: the mean over seeds of a - b, each seed's, and a 95% paired bootstrap
    interval over seeds and held-out sequences / task examples. Every comparison draws its resamples from a fresh
    generator, so that its interval depends on its data alone (not on which comparisons a report made before it)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:  # nothing paired: no difference to report
        return {m: dict(diff=None, per_seed=[], ci=None, seeds=[]) for m in ("mean", "worst")}
    rng = np.random.default_rng(0)
    va = np.array([a[s]["val"] for s in seeds])  # (S, D, N)
    vb = np.array([b[s]["val"] for s in seeds])
    S, D, N = va.shape
    si = rng.integers(0, S, (reps, S))  # (R, S) resampled seeds
    qi = rng.integers(0, N, (reps, D, N))  # (R, D, N) resampled sequences, the same for both variants
    per_seed = metrics(va) - metrics(vb)  # (S, 2)
    boot = metrics(va, qi) - metrics(vb, qi)  # (S, R, 2)
    boot = boot[si, np.arange(reps)[:, None]].mean(1)  # (R, 2): seeds resampled
    out = {}
    for k, m in enumerate(("mean", "worst")):
        out[m] = dict(diff=float(per_seed[:, k].mean()), per_seed=per_seed[:, k].tolist(),
                      ci=np.percentile(boot[:, k], [2.5, 97.5]).tolist(), seeds=seeds)
    names = sorted(set.intersection(*[set(x[s].get("tasks", {})) for x in (a, b) for s in seeds])) if seeds else []
    if names:
        ta = [np.array([[int(c) for c in a[s]["tasks"][n]] for s in seeds]) for n in names]  # per task (S, n)
        tb = [np.array([[int(c) for c in b[s]["tasks"][n]] for s in seeds]) for n in names]
        ti = [rng.integers(0, t.shape[1], (reps, t.shape[1])) for t in ta]
        per_seed = accuracy(ta) - accuracy(tb)  # (S,)
        boot = (accuracy(ta, ti) - accuracy(tb, ti))[si, np.arange(reps)[:, None]].mean(1)  # (R,)
        out["tasks"] = dict(diff=float(per_seed.mean()), per_seed=per_seed.tolist(),
                            ci=np.percentile(boot, [2.5, 97.5]).tolist(), seeds=seeds)
    return out


def verdict(ci, lower_is_better: bool) -> str:
    lo, hi = ci
    if lo > 0 or hi < 0:
        return "better" if (hi < 0) == lower_is_better else "worse"
    return "not distinguishable"


def standard_error(val: np.ndarray) -> float:
    """The held-out set's own standard error of a model's mean-over-domains loss (sequences as independent)."""
    return float(np.sqrt(sum(v.var(ddof=1) / len(v) for v in val)) / len(val))


# ---- report ----

def cell(c, scale=1.0, lower=True) -> str:
    """A paired comparison as a table cell: mean difference (per seed) [95% interval] verdict."""
    if c is None or not c["seeds"]:
        return ""
    return (f"{scale * c['diff']:+.3f} ({', '.join(f'{scale * v:+.3f}' for v in c['per_seed'])}) "
            f"[{scale * c['ci'][0]:+.3f}, {scale * c['ci'][1]:+.3f}] {verdict(c['ci'], lower)}")


def report_main(args):
    res, results = load(args), Path(args.results)
    if not res["runs"]:
        sys.exit(f"{results} holds no runs yet: python bench/quality.py run ...")
    bins = DomainBins(str(ROOT / args.data_dir))
    src = res["source"]
    lines = [f"# Quality study: results so far", "",
             f"Written by `python bench/quality.py report{' --against ' + args.against if args.against else ''}` from [{results.name}]({results.name}) at commit "
             f"{commit()}. Held-out set: the first {src['scoring']['val_seqs']} sequences of "
             f"{src['scoring']['seq_len']} tokens of each domain's validation split "
             f"({src['scoring']['val_seqs'] * src['scoring']['seq_len']:,} tokens per domain)"
             + (f"; downstream: the first {src['scoring']['limit']} validation examples of {src['scoring']['tasks']} "
                "(zero-shot, acc_norm where the harness reports it, else acc), averaged over the tasks"
                if src["tasks"] else "") + ". Losses in nats/token. Intervals: 95%, paired bootstrap over seeds and "
             f"held-out sequences / task examples ({args.reps} resamples).", ""]
    sv = np.array(src["val"])
    m = metrics(sv)
    lines += [f"Source model: mean {m[0]:.3f}, worst {bins.domains[int(sv.mean(-1).argmax())]} {m[1]:.3f}"
              + (f", downstream {100 * accuracy([np.array([int(c) for c in t]) for t in src['tasks'].values()]):.1f}%"
                 if src["tasks"] else "") +
              f"; the held-out set's own standard error of a model's mean loss: {standard_error(sv):.4f}.", ""]
    cal = res["calibration"]
    cpu = lambda m: m.get("cpu", m["processor"])  # noqa: E731
    lines += [f"Calibration (`python bench/quality.py calibrate`, commit {cal['commit']}, {cal['date']}, "
              f"{cpu(cal['machine'])}, {cal['machine']['cpus']} CPUs, torch {cal['machine']['torch']}): seconds per "
              "step " + ", ".join(f"{k} {v:.2f}" for k, v in cal["seconds_per_step"].items()) + ": a budget's steps "
              "follow from these, so runs on another machine train the same steps (their own seconds are shown).", ""]
    where = {}
    for r in res["runs"].values():
        where.setdefault(cpu(r["machine"]), set()).add(r["commit"])
    lines += ["Runs: " + "; ".join(f"{len([r for r in res['runs'].values() if cpu(r['machine']) == c])} on {c} "
                                   f"(commits {', '.join(sorted(cs))})" for c, cs in where.items()) + ".", ""]
    summary = {}
    for budget in BUDGETS:
        runs = [r for r in res["runs"].values() if budget in r["budgets"]]
        if not runs:
            continue
        names = list(dict.fromkeys(r["variant"] for r in sorted(runs, key=lambda r: order(r["variant"]))))
        refs = [a for a in args.against.split(",") if a in names] or names[:1]
        ref = refs[0]
        by = {n: {r["seed"]: r for r in runs if r["variant"] == n} for n in names}
        kind, factor = BUDGETS[budget]
        lines += [f"## Budget `{budget}`: {'equal training seconds' if kind == 'seconds' else 'equal tokens'}, "
                  f"{factor}x the demo's", "",
                  f"Against `{ref}`, the difference (variant - {ref}) as the mean over the seeds both have, each "
                  "seed's in brackets, and its 95% interval; loss: lower is better, accuracy: higher. The final "
                  "scores are over all of a variant's seeds.", "",
                  "| variant | steps (prune + cpt) | training s | tokens | seeds | final mean | final worst | "
                  f"downstream % | mean vs {ref} | worst vs {ref} | downstream vs {ref} |", "|---" * 11 + "|"]
        summary[budget] = {}
        for n in names:
            rs = by[n]
            r0 = next(iter(rs.values()))
            fm = np.array([metrics(np.array(r["final"]["val"])) for r in rs.values()])  # (S, 2)
            acc = [100 * accuracy([np.array([int(c) for c in t]) for t in r["final"]["tasks"].values()])
                   for r in rs.values() if r["final"].get("tasks")]
            cmp = paired({s: r["final"] for s, r in rs.items()}, {s: r["final"] for s, r in by[ref].items()},
                         args.reps) if n != ref else None
            summary[budget][n] = dict(mean=fm[:, 0].tolist(), worst=fm[:, 1].tolist(), acc=acc, vs=cmp, ref=ref,
                                      pruned=[metrics(np.array(r["pruned"]["val"]))[0] for r in rs.values()
                                              if r["pruned"]])

            sec = np.mean([sum(r["seconds"].values()) for r in rs.values()])
            tok = np.mean([sum(r["tokens"].values()) for r in rs.values()])
            lines.append(
                f"| {n} | {r0['prune_steps']} + {r0['cpt_steps']} | {sec:.0f} | {tok:,.0f} | {len(rs)} | "
                f"{fm[:, 0].mean():.3f} ({', '.join(f'{v:.3f}' for v in fm[:, 0])}) | "
                f"{fm[:, 1].mean():.3f} ({', '.join(f'{v:.3f}' for v in fm[:, 1])}) | "
                + (f"{np.mean(acc):.1f} ({', '.join(f'{v:.1f}' for v in acc)})" if acc else "") + " | "
                + (" | ".join([cell(cmp["mean"]), cell(cmp["worst"]),
                               cell(cmp.get("tasks"), 100, lower=False) if cmp.get("tasks") else ""])
                   if cmp else "| |") + " |")
        for other in refs[1:]:  # further references (--against A,B): the variants of the sweep against B
            lines += ["", f"Against `{other}` (variant - {other}, as above):", "",
                      f"| variant | seeds | mean vs {other} | worst vs {other} | downstream vs {other} |",
                      "|---" * 5 + "|"]
            for n in [n for n in names if n != other and "/" not in n]:
                c = paired({s: r["final"] for s, r in by[n].items()}, {s: r["final"] for s, r in by[other].items()},
                           args.reps)
                lines.append(f"| {n} | {len(c['mean']['seeds'])} | {cell(c['mean'])} | {cell(c['worst'])} | "
                             + (cell(c["tasks"], 100, lower=False) if c.get("tasks") else "") + " |")
        # the data scheduling on one recipe: against its constant mixture, the paper's claim being a lower worst
        # domain at no cost in the mean
        for base in dict.fromkeys(n.split("/")[0] for n in names if "/" in n):
            null = f"{base}/constant"
            if null not in by:
                continue
            lines += ["", f"The data scheduling of `{base}` against `{null}` (variant - constant, as above):", "",
                      "| variant | seeds | mean vs constant | worst vs constant | downstream vs constant |",
                      "|---" * 5 + "|"]
            for n in [n for n in names if n.startswith(base + "/") and n != null]:
                c = paired({s: r["final"] for s, r in by[n].items()}, {s: r["final"] for s, r in by[null].items()},
                           args.reps)
                twins = sorted(str(r["seed"]) for r in by[n].values() if "same_as" in r)
                lines.append(f"| {n}" + (f" (seed {', '.join(twins)}: the run of `{base}`)" if twins else "")
                             + f" | {len(c['mean']['seeds'])} | {cell(c['mean'])} | {cell(c['worst'])} | "
                             + (cell(c["tasks"], 100, lower=False) if c.get("tasks") else "") + " |")
        lines += ["", "After compaction (before continued pretraining), mean over domains: " + "; ".join(
            f"`{n}` {np.mean(s['pruned']):.3f}" for n, s in summary[budget].items() if s["pruned"]) + ".", ""]
    lines += ["Every run's command, seconds, tokens and scores are in the JSON (`runs`)."]
    md = "\n".join(lines) + "\n"
    results.with_suffix(".md").write_text(md)
    print(md)
    for sweep, keep in (("study", lambda n: "/" not in n), ("weighting", lambda n: "/" in n)):
        part = {b: {n: s for n, s in v.items() if keep(n)} for b, v in summary.items()}
        if part := {b: v for b, v in part.items() if v}:
            plot(part, Path(args.plots) / f"quality-{sweep}.png")


def order(name: str) -> int:
    base = name.split("/")[0]
    return list(VARIANTS).index(base) * 10 + (list(WEIGHTING).index(name.split("/")[1]) if "/" in name else 0)


def plot(summary: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    budgets = list(summary)
    for ax, k, title in zip(axes, ("mean", "worst"), ("mean over domains", "worst domain")):
        names = list(dict.fromkeys(n for b in budgets for n in summary[b]))
        width = 0.8 / max(len(budgets), 1)
        for j, b in enumerate(budgets):
            x = np.arange(len(names)) + (j - (len(budgets) - 1) / 2) * width
            vals = [np.mean(summary[b][n][k]) if n in summary[b] else np.nan for n in names]
            ax.bar(x, vals, width, label=f"budget {b}")
            for xi, n in zip(x, names):  # every seed as a dot
                if n in summary[b]:
                    ax.plot([xi] * len(summary[b][n][k]), summary[b][n][k], "k.", ms=3)
        ax.set_xticks(np.arange(len(names)), names, rotation=25, fontsize=8, ha="right")
        ax.set_title(f"final validation loss, {title}")
        ax.set_ylabel("nats/token")
        lo = np.nanmin([v for b in budgets for s in summary[b].values() for v in s[k]])
        ax.set_ylim(lo * 0.9, None)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M -> the demo's target shape, equal compute (bars: mean over seeds, dots: seeds)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("command", choices=("calibrate", "run", "report"))
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="demo")
    ap.add_argument("--sweep", choices=("baselines", "weighting"), default="baselines")
    ap.add_argument("--recipe", default="l0+imp", help="--sweep weighting: the variant whose data scheduling varies")
    ap.add_argument("--only", default="", help="comma-separated variants of the sweep (default: all)")
    ap.add_argument("--seeds", default="1337,1338,1339")
    ap.add_argument("--config", default="config/demo.py")
    ap.add_argument("--demo_steps", default="60,60", help="the demo budget: the time (or tokens) of this many "
                    "pruning and continued-pretraining steps of the config (config/demo.py's when the study began)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="give every run the study's settings (STUDY; default: on)")
    ap.add_argument("--extra", default="", help="more train.py options for every run (before the variant's)")
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--data_dir", default="data/demo")
    ap.add_argument("--save_interval", type=int, default=100, help="train.py's: steps between checkpoints")
    ap.add_argument("--calibrate_steps", type=int, default=12)
    ap.add_argument("--seq_len", type=int, default=128, help="scoring: tokens per held-out sequence")
    ap.add_argument("--val_seqs", type=int, default=128, help="scoring: held-out sequences per domain")
    ap.add_argument("--tasks", default="arc_easy,hellaswag,piqa,sciq,winogrande")
    ap.add_argument("--limit", type=int, default=100, help="downstream: the first N validation examples of each")
    ap.add_argument("--against", default="", help="report: the reference variant (default: the first); more, "
                    "comma-separated, add a table against each")
    ap.add_argument("--reps", type=int, default=2000, help="report: bootstrap resamples")
    ap.add_argument("--out", default="out/quality-study", help="the runs' out_dirs")
    ap.add_argument("--results", default="bench/results/quality-study.json", help="every run's numbers (and .md)")
    ap.add_argument("--plots", default="docs", help="where quality-study.png and quality-weighting.png go")
    ap.add_argument("--clean", action=argparse.BooleanOptionalAction, default=True,
                    help="delete a finished run's checkpoints once scored (default: on)")
    args = ap.parse_args()
    os.chdir(ROOT)
    {"calibrate": calibrate, "run": run, "report": report_main}[args.command](args)


if __name__ == "__main__":
    main()
