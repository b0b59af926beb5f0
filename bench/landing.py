"""
What compaction keeps: per-mask gap between the gates' expected sparsity and the target at compaction, and the jump
of the mean validation loss at compaction (the pruning stage's last evaluation, with masks of the expected size ->
the compacted model's first), over weighting methods, seeds and the kept values (soft | binary), on the demo.

    python bench/landing.py                                   # the demo's grid below, about 50 min on 2 CPU cores
    python bench/landing.py --methods dro+eval --seeds 1337 --values soft,binary --cpt_steps 60
    python bench/landing.py --report                          # the table of what bench/results/landing.json holds

Each variant is `train.py config/demo.py` with --seed, --domain_weighting, --mask_values (and any --set key=value),
in its own out_dir under --runs (a finished one is read, an unfinished one resumes); its numbers go into the JSON as
soon as it ends, so an interrupted sweep loses at most the variant in progress. --cpt_steps 1 measures the jump
alone (the compacted model's first evaluation comes before any step of continued pretraining).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import RunDir  # noqa: E402

MASKS = ("layer", "head", "intermediate", "hidden")


def mean_val(row: dict) -> float:
    v = [x for k, x in row.items() if k.startswith("val/")]
    return sum(v) / len(v)


def summarise(run_dir: str) -> dict:
    """The numbers of one finished run, from its metrics.jsonl."""
    rows = RunDir(run_dir).read_metrics()
    evals = [r for r in rows if any(k.startswith("val/") for k in r)]
    prune = [r for r in evals if r["stage"] == "prune"]
    cpt = [r for r in evals if r["stage"] == "cpt"]
    end = next(r for r in rows if "compaction_final_sparsity" in r)
    steps = [r for r in rows if r["stage"] == "prune" and "expected_layer_sparsity" in r and "loss" in r]
    out = dict(gap={m: end[f"compaction_{m}_gap"] for m in MASKS if f"compaction_{m}_gap" in end},
               expected_sparsity=end["compaction_expected_sparsity"], final_sparsity=end["compaction_final_sparsity"],
               last_prune_val=mean_val(prune[-1]), first_cpt_val=mean_val(cpt[0]) if cpt else None,
               last_prune_train=steps[-1]["loss"] if steps else None)
    out["jump"] = out["first_cpt_val"] - out["last_prune_val"] if cpt else None
    out["per_domain_jump"] = ({k[4:]: cpt[0][k] - prune[-1][k] for k in cpt[0] if k.startswith("val/")} if cpt
                              else None)
    if len(cpt) > 1:
        out["final_val"] = mean_val(cpt[-1])
        out["final_per_domain"] = {k[4:]: v for k, v in cpt[-1].items() if k.startswith("val/")}
    return out


def table(results: dict):
    print(f"{'variant':44s} {'gap layer/head/int/hidden':>30s} {'prune end':>9s} {'compacted':>9s} {'jump':>7s} "
          f"{'final':>7s}")
    for name, r in results.items():
        gap = "/".join(f"{r['gap'].get(m, 0):+.3f}" for m in MASKS)
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{name:44s} {gap:>30s} {f(r['last_prune_val']):>9s} {f(r['first_cpt_val']):>9s} "
              f"{'-' if r['jump'] is None else format(r['jump'], '+.3f'):>7s} {f(r.get('final_val')):>7s}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", default="dro+eval,constant,sheared")
    ap.add_argument("--seeds", default="1337,1338")
    ap.add_argument("--values", default="soft")
    ap.add_argument("--cpt_steps", type=int, default=1, help="1: the jump alone; 60: the demo's continued pretraining")
    ap.add_argument("--set", action="append", default=[], help="another train.py key=value for every variant")
    ap.add_argument("--tag", default="", help="a suffix for the variants' names (e.g. what --set changes)")
    ap.add_argument("--runs", default="out/landing")
    ap.add_argument("--json", default="bench/results/landing.json")
    ap.add_argument("--report", action="store_true", help="print the table of --json and exit")
    args = ap.parse_args()
    results = json.load(open(args.json)) if os.path.exists(args.json) else {}
    if args.report:
        return table(results)
    for method in args.methods.split(","):
        for seed in args.seeds.split(","):
            for values in args.values.split(","):
                name = f"{method}-seed{seed}-{values}-cpt{args.cpt_steps}" + (f"-{args.tag}" if args.tag else "")
                out = os.path.join(args.runs, name)
                cmd = [sys.executable, "train.py", "config/demo.py", f"--out_dir={out}", f"--seed={seed}",
                       f"--domain_weighting={method}", f"--mask_values={values}", f"--cpt_steps={args.cpt_steps}",
                       "--eval_tasks=", *[f"--{kv}" for kv in args.set]]
                print(" ".join(cmd), flush=True)
                r = subprocess.run(cmd, cwd=ROOT)
                if r.returncode != 0:
                    sys.exit(f"{name}: train.py exited with {r.returncode}; run the same command again to resume it")
                results[name] = dict(command=" ".join(cmd[1:]), **summarise(os.path.join(ROOT, out)))
                os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
                with open(args.json + ".tmp", "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(args.json + ".tmp", args.json)
                table({name: results[name]})
    table(results)


if __name__ == "__main__":
    main()
