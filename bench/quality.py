"""
What the data scheduling and the recovery options buy, measured on the demo (SmolLM2-135M pruned to the demo's target
shape on the demo corpus, then continued pretraining): one run per variant and seed at equal token budgets, every
model scored on the same 4,096 validation tokens of every domain and on the same downstream examples (zero-shot, the
first --limit validation examples of each of --tasks, scored as lm-evaluation-harness scores them). Two sweeps:

    weighting  constant | sheared | dro | dro+dy+dyall          (--domain_weighting)
    recovery   ce: the demo as it is (dro+eval, plain cross-entropy) | kd: + distillation from the source model in
               continued pretraining | kd+teacher: + the DRO reference losses measured on the teacher | kd+teacher+
               importance: + log_alpha initialised from activation importance

Writes bench/results/quality[-recovery].json (every number, the command and the machine), .md (the tables) and
docs/quality[-recovery].png (the plot). The recovery tables also give the continued-pretraining tokens each variant
needs to reach the first variant's final mean loss (on the runs' own evaluations, every eval_interval steps).

    python bench/quality.py                                  # weighting: 4 methods x 2 seeds, ~70 min on 2 cores
    python bench/quality.py --sweep recovery                 # 4 variants x 2 seeds, ~80 min on 2 cores
    python bench/quality.py --only constant,dro --seeds 1 --prune_steps 20 --cpt_steps 20

Each run is `train.py config/demo.py` with the variant's options, --seed and the budget overridden, in
out/quality/<variant>-s<seed>; an interrupted sweep picks up where it stopped (train.py resumes its runs, and
scores already computed are kept in out/quality/scores.json). Needs `make model`, `make tasks` and the demo data
(`make demo` prepares all three).
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
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import convert  # noqa: E402
import report  # noqa: E402
from checkpoint import RunDir  # noqa: E402
from data import DomainBins  # noqa: E402


KD = ["--distill_alpha=ALPHA"]  # set from --distill_alpha
SWEEPS = {
    "weighting": {m: [f"--domain_weighting={m}"] for m in ("constant", "sheared", "dro", "dro+dy+dyall")},
    "recovery": {"ce": [], "kd": KD, "kd+teacher": KD + ["--reference_loss=teacher"],
                 "kd+teacher+importance": KD + ["--reference_loss=teacher", "--mask_init=importance"]},
}


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{method.replace('+', '_')}-s{seed}"


def train_run(args, method: str, options: list[str], seed: int) -> Path:
    d = run_dir(Path(args.out), method, seed)
    options = [o.replace("ALPHA", str(args.distill_alpha)) for o in options]
    cmd = [sys.executable, str(ROOT / "train.py"), args.config, f"--init_from={args.model}",
           f"--data_dir={args.data_dir}", f"--out_dir={d}", f"--seed={seed}",
           f"--prune_steps={args.prune_steps}", f"--cpt_steps={args.cpt_steps}",
           f"--eval_interval={args.eval_interval}", f"--save_interval={args.save_interval}", "--keep_checkpoints=1",
           "--eval_tasks=", *args.extra.split(), *options]  # the variant's options last: they win
    # (--eval_tasks=: the runs score no tasks themselves; this script scores their exports, with its own --limit)
    if not (d / "done.json").is_file():
        print(f"\n== {method}, seed {seed}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        print(f"== {method}, seed {seed}: {time.time() - t0:.0f} s", flush=True)
    if args.clean:  # a finished run needs no checkpoints (1.6 GB each here); its models are in pruned/ and hf/
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
    return d


def score(bins, path, args) -> list[float]:
    model = convert.load_model(str(path))
    bins.check_compatible(model.config.vocab_size)
    return [float(x) for x in report.evaluate(model, bins, args.seq_len, args.batch_size, args.batches)]


def task_scores(path, args) -> dict:
    model = convert.load_model(str(path))
    return report.task_summary(report.score_tasks(model, convert.load_tokenizer(str(path)),
                                                  report.task_names(args.tasks), limit=args.limit, progress=False))


def headline(scores: dict) -> dict:
    """report.headline's {task: accuracy} and their mean."""
    acc = report.headline(scores)
    return {**acc, "average": float(np.mean(list(acc.values())))}


def summarize(losses) -> dict:
    a = np.asarray(losses)
    return dict(mean=float(a.mean()), worst=float(a.max()), spread=float(a.max() - a.min()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--sweep", choices=sorted(SWEEPS), default="weighting")
    ap.add_argument("--only", default="", help="comma-separated variants of the sweep (default: all)")
    ap.add_argument("--distill_alpha", type=float, default=1.0, help="recovery sweep: the kd variants' distill_alpha")
    ap.add_argument("--seeds", default="1337,1338")
    ap.add_argument("--config", default="config/demo.py")
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--data_dir", default="data/demo")
    ap.add_argument("--prune_steps", type=int, default=60, help="the demo's: at 40 the gates reach only half the "
                    "target sparsity before compaction (measured: expected 0.25 vs 0.514)")
    ap.add_argument("--cpt_steps", type=int, default=40)
    ap.add_argument("--eval_interval", type=int, default=3, help="weight updates: every 3 steps gives +dy the 11 "
                    "evaluations its scaling-law fit needs before the end of a 40-step stage")
    ap.add_argument("--save_interval", type=int, default=30, help="a checkpoint of the pruning stage is 1.6 GB")
    ap.add_argument("--extra", default="--prune_micro_batch_size=4 --eval_batches=1",
                    help="more train.py overrides for every run (default: one micro-batch per pruning step, and "
                    "the weights updated from 4 validation sequences per domain: half the demo's evaluation cost)")
    ap.add_argument("--seq_len", type=int, default=128, help="scoring: sequence length")
    ap.add_argument("--batch_size", type=int, default=8, help="scoring: sequences per batch")
    ap.add_argument("--batches", type=int, default=4, help="scoring: batches per domain (4 x 8 x 128 = the first "
                    "4,096 tokens of each domain's validation split, the same for every model; the runs' own "
                    "evaluations use its first 512)")
    ap.add_argument("--tasks", default="arc_easy,hellaswag,piqa,sciq,winogrande",
                    help="downstream tasks scored (\"\": none)")
    ap.add_argument("--limit", type=int, default=200, help="downstream: the first N validation examples of each")
    ap.add_argument("--out", default="out/quality")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "quality.png"))
    ap.add_argument("--clean", action=argparse.BooleanOptionalAction, default=True,
                    help="delete finished runs' checkpoints (default: on)")
    args = ap.parse_args()
    variants = SWEEPS[args.sweep]
    methods = [m.strip() for m in args.only.split(",") if m.strip()] or list(variants)
    if unknown := [m for m in methods if m not in variants]:
        ap.error(f"unknown variants {unknown} of sweep {args.sweep}: {list(variants)}")
    suffix = "" if args.sweep == "weighting" else f"-{args.sweep}"
    seeds = [int(s) for s in args.seeds.split(",")]
    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bins = DomainBins(args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    setting = [args.seq_len, args.batch_size, args.batches]

    def cached_score(key, path):
        if cache.get(key, {}).get("setting") != setting:
            t0 = time.time()
            cache[key] = dict(setting=setting, losses=score(bins, path, args))
            cache_path.write_text(json.dumps(cache, indent=1))
            print(f"scored {key}: mean {np.mean(cache[key]['losses']):.4f} ({time.time() - t0:.0f} s)", flush=True)
        return cache[key]["losses"]

    def cached_tasks(key, path):
        if not args.tasks:
            return None
        key, task_setting = f"{key}/tasks", [args.tasks, args.limit]
        if cache.get(key, {}).get("setting") != task_setting:
            t0 = time.time()
            cache[key] = dict(setting=task_setting, scores=task_scores(path, args))
            cache_path.write_text(json.dumps(cache, indent=1))
            print(f"scored {key}: average {headline(cache[key]['scores'])['average']:.3f} ({time.time() - t0:.0f} s)",
                  flush=True)
        return cache[key]["scores"]

    source = cached_score("source", args.model)
    source_tasks = cached_tasks("source", args.model)
    runs = []
    for seed in seeds:  # seed-major, so that a partial sweep already compares every method
        for method in methods:
            d = train_run(args, method, variants[method], seed)
            metrics = RunDir(str(d)).read_metrics()
            end = [r for r in metrics if "stage_seconds" in r]
            weights = {st: [r for r in metrics if r["stage"] == st and f"weight/{bins.domains[0]}" in r]
                       for st in ("prune", "cpt")}
            runs.append(dict(
                method=method, seed=seed,
                pruned=cached_score(f"{d.name}/pruned", d / "pruned"),
                final=cached_score(f"{d.name}/final", d / "hf"),
                pruned_tasks=cached_tasks(f"{d.name}/pruned", d / "pruned"),
                final_tasks=cached_tasks(f"{d.name}/final", d / "hf"),
                weights={st: {"first": [w[0][f"weight/{n}"] for n in bins.domains],
                              "last": [w[-1][f"weight/{n}"] for n in bins.domains],
                              "mean": [float(np.mean([r[f"weight/{n}"] for r in w])) for n in bins.domains]}
                         for st, w in weights.items() if w},
                compaction_expected_sparsity=next((r["compaction_expected_sparsity"] for r in end
                                                   if "compaction_expected_sparsity" in r), None),
                seconds={r["stage"]: r["stage_seconds"] for r in end},
                cpt_tokens_per_s=next((r["stage_tokens_per_s"] for r in end if r["stage"] == "cpt"), None),
                peak_memory_gb={r["stage"]: r["peak_memory_gb"] for r in end},
                cpt_curve=cpt_curve(d, bins.domains)))

    # aggregate over seeds
    table = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        table[method] = {}
        for when in ("pruned", "final"):
            per_seed = [summarize(r[when]) for r in rs]
            table[method][when] = dict(
                domains=np.mean([r[when] for r in rs], axis=0).tolist(),
                **{k: float(np.mean([s[k] for s in per_seed])) for k in ("mean", "worst", "spread")},
                **{f"{k}_seeds": [s[k] for s in per_seed] for k in ("mean", "worst")},
                **(dict(tasks={k: float(np.mean([headline(r[f"{when}_tasks"])[k] for r in rs]))
                               for k in headline(rs[0][f"{when}_tasks"])},
                        tasks_average_seeds=[headline(r[f"{when}_tasks"])["average"] for r in rs])
                   if args.tasks else {}))
    base = table[methods[0]]
    for r in runs:  # continued-pretraining tokens to reach the first variant's final mean loss, same seed
        goal = next(b for b in runs if b["method"] == methods[0] and b["seed"] == r["seed"])["cpt_curve"]
        if goal and r["cpt_curve"]:
            r["cpt_tokens_to_baseline"] = t = next((t for t, v in r["cpt_curve"] if v <= goal[-1][1]), None)
            r["baseline_final_run_eval"] = goal[-1][1]
            # at this run's own training speed (evaluations excluded): what the tokens cost in time
            r["cpt_seconds_to_baseline"] = None if t is None else t / r["cpt_tokens_per_s"]
    result = dict(
        command=" ".join([sys.executable.split("/")[-1], "bench/quality.py"] + sys.argv[1:]),
        date=datetime.date.today().isoformat(),
        machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                     cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads()),
        commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        budget=dict(prune_steps=args.prune_steps, cpt_steps=args.cpt_steps, eval_interval=args.eval_interval,
                    config=args.config, extra=args.extra),
        sweep=args.sweep, variants={m: [o.replace("ALPHA", str(args.distill_alpha)) for o in variants[m]]
                                    for m in methods},
        scoring=dict(seq_len=args.seq_len, batch_size=args.batch_size, batches=args.batches, tasks=args.tasks,
                     limit=args.limit),
        domains=bins.domains, source=source, source_tasks=source_tasks, runs=runs, table=table)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"quality{suffix}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result, methods[0])
    (results / f"quality{suffix}.md").write_text(md)
    print("\n" + md)
    plot(result, args.plot.replace(".png", f"{suffix}.png"))


def cpt_curve(d: Path, domains) -> list:
    """[(continued-pretraining tokens so far, mean validation loss over the domains)] at the run's evaluations."""
    cfg = json.loads((d / "config.json").read_text())
    per_step = cfg["cpt_batch_size"] * cfg["cpt_seq_len"]
    return [(r["step"] * per_step, float(np.mean([r[f"val/{n}"] for n in domains])))
            for r in RunDir(str(d)).read_metrics() if r["stage"] == "cpt" and f"val/{domains[0]}" in r]


def markdown(res, base_name) -> str:
    base = res["table"][base_name]
    doms, n_seeds = res["domains"], len({r["seed"] for r in res["runs"]})
    tokens = res["scoring"]["batches"] * res["scoring"]["batch_size"] * res["scoring"]["seq_len"]
    lines = [f"Validation loss (nats/token) on {tokens:,} validation tokens per domain, mean over {n_seeds} "
             f"seed(s) (each seed's value in brackets for mean and worst). Budget: {res['budget']['prune_steps']} "
             f"pruning + {res['budget']['cpt_steps']} continued-pretraining steps of the demo config, weights "
             f"updated every {res['budget']['eval_interval']} steps, `{res['budget'].get('extra', '')}`. "
             f"`{res['command']}`, commit {res['commit']}, {res['date']}, {res['machine']['cpus']} CPUs, "
             f"torch {res['machine']['torch']}.", ""]
    src = res["source"]
    for when, title in (("pruned", "after pruning (compacted, before continued pretraining)"),
                        ("final", "after continued pretraining")):
        lines += [f"**{title}**", "", "| method | " + " | ".join(doms) + " | mean | worst | spread | "
                  f"worst vs {base_name} | mean vs {base_name} |", "|---" * (len(doms) + 6) + "|"]
        if when == "pruned":
            s = summarize(src)
            lines.append("| source model | " + " | ".join(f"{v:.3f}" for v in src) +
                         f" | {s['mean']:.3f} | {s['worst']:.3f} | {s['spread']:.3f} | | |")
        for m, t in res["table"].items():
            t = t[when]
            rel = (f"| {100 * (t['worst'] / base[when]['worst'] - 1):+.1f}% "
                   f"| {100 * (t['mean'] / base[when]['mean'] - 1):+.1f}% ")
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in t["domains"]) +
                         f" | {t['mean']:.3f} ({', '.join(f'{v:.3f}' for v in t['mean_seeds'])}) "
                         f"| {t['worst']:.3f} ({', '.join(f'{v:.3f}' for v in t['worst_seeds'])}) "
                         f"| {t['spread']:.3f} {rel}|")
        lines.append("")
    if res["source_tasks"]:  # (--tasks "": none scored)
        names = list(headline(res["source_tasks"]))
        lines += [f"**downstream accuracy** (%, zero-shot, the first {res['scoring']['limit']} validation examples of "
                  "each task, acc_norm where lm-evaluation-harness reports it, else acc; mean over seeds, each seed's "
                  "average in brackets)", "", "| method | model | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 2) + "|", "| source model | | " +
                  " | ".join(f"{100 * v:.1f}" for v in headline(res["source_tasks"]).values()) + " |"]
        for m, t in res["table"].items():
            for when in ("pruned", "final"):
                lines.append(f"| {m} | {when} | " + " | ".join(f"{100 * v:.1f}" for v in t[when]["tasks"].values()) +
                             f" ({', '.join(f'{100 * v:.1f}' for v in t[when]['tasks_average_seeds'])}) |")
        lines.append("")
    if any("cpt_tokens_to_baseline" in r for r in res["runs"]):
        seeds = sorted({r["seed"] for r in res["runs"]})
        lines += [f"**continued-pretraining tokens to reach {base_name}'s final mean validation loss** (on the runs' "
                  f"own evaluations every {res['budget']['eval_interval']} steps: the first "
                  "`eval_batch_size` sequences of each domain; same seed), and in brackets the seconds of training "
                  "they took at the run's own speed", "",
                  "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
        for m in res["table"]:
            cells = []
            for s in seeds:
                r = next((r for r in res["runs"] if r["method"] == m and r["seed"] == s), None)
                t = None if r is None else r.get("cpt_tokens_to_baseline")
                budget = r["cpt_curve"][-1][0] if r and r.get("cpt_curve") else 0
                sec = None if r is None else r.get("cpt_seconds_to_baseline")
                cells.append(f"{t:,} ({sec:.0f} s)" if t is not None else f"not reached in {budget:,}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**mean domain weights over the evaluations of each stage** (first seed)", "",
              "| method | stage | " + " | ".join(doms) + " |", "|---" * (len(doms) + 2) + "|"]
    for m in res["table"]:
        r = next(r for r in res["runs"] if r["method"] == m)
        for st, w in r["weights"].items():
            lines.append(f"| {m} | {st} | " + " | ".join(f"{v:.3f}" for v in w["mean"]) + " |")
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doms, methods = res["domains"], list(res["table"])
    labels = doms + ["mean", "worst"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=False)
    width = 0.8 / len(methods)
    for ax, when in zip(axes, ("pruned", "final")):
        for i, m in enumerate(methods):
            rs = [r for r in res["runs"] if r["method"] == m]
            vals = np.array([r[when] + [np.mean(r[when]), np.max(r[when])] for r in rs])  # (seeds, domains + 2)
            x = np.arange(len(labels)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, vals.mean(0), width, label=m)
            if len(rs) > 1:  # the seeds' range
                ax.errorbar(x, vals.mean(0), yerr=[vals.mean(0) - vals.min(0), vals.max(0) - vals.mean(0)],
                            fmt="none", ecolor="black", capsize=2, lw=0.8)
        lo = min(min(r[when]) for r in res["runs"])
        ax.set_ylim(lo * 0.9, None)
        ax.set_xticks(np.arange(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_title("after pruning" if when == "pruned" else "after continued pretraining")
        ax.set_ylabel("validation loss (nats/token)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M -> demo target, {res['budget']['prune_steps']} + {res['budget']['cpt_steps']} steps, "
                 f"{len({r['seed'] for r in res['runs']})} seeds (bars: mean, whiskers: range)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
