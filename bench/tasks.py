"""
Downstream scoring side by side with lm-evaluation-harness: the same model, examples and threads, scored by
`report.py eval --tasks` and by the harness's `hf` model (lm_eval 0.4) on the same validation files. Prints per task
our acc / acc_norm and the harness's, how many examples agree on the prediction, the largest difference of a
choice's log-likelihood, whether the prompts (context, continuation strings) are the same, and the examples/s of
both whole commands (start-up, loading and tokenising included).

The harness is never a requirement of this project: install it in a venv of its own and point --lm_eval_python at
that venv's python, e.g.

    python3 -m venv /tmp/lme && /tmp/lme/bin/pip install torch==2.13.0 transformers==5.24.0 'lm_eval[hf]==0.4.13'
    python bench/tasks.py models/smollm2-135m --lm_eval_python /tmp/lme/bin/python --limit 200
    python bench/tasks.py out/demo/hf --lm_eval_python /tmp/lme/bin/python --tasks arc_easy,piqa --limit 100

The harness reads the same Arrow files through task configs written to a temporary directory: each includes the
harness's own config of the task and only points it at the local file (boolq: google/boolq's `answer` for the label).
Appends every figure, with the command and commit, to bench/results/tasks.json. --tokens_only prints, without the
harness, the tokens per example that our packed rows compute against one padding-free sequence per choice.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import report  # noqa: E402

HARNESS_CONFIG = {  # our task -> the harness's config of it, under lm_eval/tasks/
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "piqa": "piqa/piqa.yaml", "sciq": "sciq/sciq.yaml",
    "social_iqa": "siqa/siqa.yaml", "winogrande": "winogrande/default.yaml", "copa": "super_glue/copa/default.yaml",
    "commonsense_qa": "commonsense_qa/default.yaml",
}


def harness_configs(py: str, names, tasks_dir: str, out: str):
    pkg = subprocess.run([py, "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    for n in names:
        arrow = os.path.abspath(os.path.join(tasks_dir, report.TASKS[n].path, "validation",
                                             "data-00000-of-00001.arrow"))
        extra = 'doc_to_target: "{{answer|int}}"\n' if n == "boolq" else ""
        Path(out, f"local_{n}.yaml").write_text(
            f"include: {pkg}/tasks/{HARNESS_CONFIG[n]}\ntask: local_{n}\ndataset_path: arrow\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {arrow}\ntraining_split: null\ntest_split: null\n"
            f"validation_split: validation\n{extra}")


def token_counts(model: str, names, tasks_dir: str, limit: int) -> dict:
    """Per task: tokens per example fed by our packed rows, and by one sequence per choice (context + choice)."""
    import convert
    tok = convert.load_tokenizer(model)
    out = {}
    for n in names:
        docs = report.load_docs(n, tasks_dir, limit)
        enc = [[report.encode(tok, c, x) for c, x in report.TASKS[n].requests(d)[0]] for d in docs]
        rows = report.pack(enc, 1 << 30, 256)
        out[n] = (sum(map(len, rows)) / len(docs), sum(len(c) + len(x) - 1 for e in enc for c, x in e) / len(docs))
    return out


def timed(cmd, env) -> float:
    t = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.time() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a Hugging Face directory (both sides read it)")
    ap.add_argument("--lm_eval_python", help="a python with lm_eval[hf] 0.4 installed")
    ap.add_argument("--tokens_only", action="store_true", help="only the tokens per example, ours and unshared")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lm_eval_batch_size", default="16")
    ap.add_argument("--tasks_dir", default=str(ROOT / report.TASKS_DIR))
    ap.add_argument("--out", default=str(ROOT / "bench/results/tasks.json"))
    args = ap.parse_args()
    names = report.task_names(args.tasks)
    if args.tokens_only:
        print(f"{args.model}: tokens per example, first {args.limit} of each task: packed (ours) / one sequence per "
              "choice")
        for n, (ours, plain) in token_counts(args.model, names, args.tasks_dir, args.limit).items():
            print(f"{n:<15} {ours:7.1f} / {plain:7.1f}")
        return
    if not args.lm_eval_python:
        ap.error("--lm_eval_python is required (or --tokens_only)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    model = os.path.abspath(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        ours_json = os.path.join(tmp, "ours.json")
        t_ours = timed([sys.executable, str(ROOT / "report.py"), "eval", model, "--tasks", ",".join(names),
                        "--limit", str(args.limit), "--tasks_dir", args.tasks_dir, "--json", ours_json], env)
        ours = json.load(open(ours_json))["models"][model]
        harness_configs(args.lm_eval_python, names, args.tasks_dir, tmp)
        t_lm = timed([args.lm_eval_python, "-m", "lm_eval", "--model", "hf", "--model_args",
                      f"pretrained={model},dtype=float32", "--tasks", ",".join(f"local_{n}" for n in names),
                      "--include_path", tmp, "--limit", str(args.limit), "--batch_size", args.lm_eval_batch_size,
                      "--device", "cpu", "--output_path", os.path.join(tmp, "lm"), "--log_samples"], env)
        results = json.load(open(glob.glob(os.path.join(tmp, "lm", "*", "results_*.json"))[0]))["results"]
        samples = {n: [json.loads(line) for line in open(glob.glob(os.path.join(tmp, "lm", "*",
                                                                               f"samples_local_{n}_*.jsonl"))[0])]
                   for n in names}
    rows, n_total = [], 0
    print(f"{args.model}: first {args.limit} validation examples per task, {args.threads} threads")
    print(f"{'task':<15} {'n':>5} {'acc ours':>9} {'lm-eval':>8} {'acc_norm ours':>14} {'lm-eval':>8} "
          f"{'same pred':>10} {'max |dll|':>10} {'prompts':>8}")
    for n in names:
        docs = report.load_docs(n, args.tasks_dir, args.limit)
        lm = sorted(samples[n], key=lambda s: s["doc_id"])
        same, same_prompt, dll = 0, 0, 0.0
        for d, s, ll in zip(docs, lm, ours[n]["ll"]):
            theirs = np.array([float(r[0]) for r in s["filtered_resps"]])
            ll = np.array(ll)
            same += int(np.argmax(theirs) == np.argmax(ll))
            dll = max(dll, float(np.abs(theirs - ll).max()))
            reqs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
            same_prompt += int(reqs == report.TASKS[n].requests(d)[0])
        r = results[f"local_{n}"]
        row = {"task": n, "n": ours[n]["n"], "acc": ours[n]["acc"], "lm_eval_acc": r["acc,none"],
               "acc_norm": ours[n].get("acc_norm"), "lm_eval_acc_norm": r.get("acc_norm,none"),
               "same_prediction": same, "max_abs_ll_diff": dll, "same_prompts": same_prompt}
        rows.append(row)
        n_total += row["n"]
        fmt = lambda v: f"{100 * v:.1f}" if v is not None else "-"  # noqa: E731
        print(f"{n:<15} {row['n']:>5} {fmt(row['acc']):>9} {fmt(row['lm_eval_acc']):>8} "
              f"{fmt(row['acc_norm']):>14} {fmt(row['lm_eval_acc_norm']):>8} {same:>10} {dll:>10.2e} "
              f"{same_prompt:>8}")
    print(f"whole commands: ours {t_ours:.0f} s ({n_total / t_ours:.2f} examples/s), lm-eval {t_lm:.0f} s "
          f"({n_total / t_lm:.2f} examples/s): {t_lm / t_ours:.2f}x")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    entry = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
             "command": " ".join(["python", "bench/tasks.py"] + sys.argv[1:]), "machine": platform.processor() or
             platform.machine(), "threads": args.threads, "model": args.model, "limit": args.limit,
             "ours_seconds": t_ours, "lm_eval_seconds": t_lm, "examples": n_total, "tasks": rows}
    past = json.load(open(args.out)) if os.path.isfile(args.out) else []
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    json.dump(past + [entry], open(args.out, "w"), indent=1)
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
