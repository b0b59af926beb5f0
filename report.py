"""
Measuring models and runs: per-domain validation loss, the loss table, the plots of a run, and two commands.

    python report.py eval MODEL [MODEL ...] --data_dir=data/demo   # per-domain validation loss / perplexity
    python report.py report out/demo                               # what a run did: source, pruned, final models
    (python train.py eval ... and python train.py report ... hand off to these)

MODEL is anything convert.load_model reads: a Hugging Face directory, a cached hub id, a .gguf file, or a train.py
run directory (its hf/, else its latest checkpoint). `evaluate` is what train.py calls at every eval_interval (with
the L0 masks of the current expected size while pruning), so the report's numbers and the run's are one measure.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

import convert
from checkpoint import STAGES, CheckpointError, RunDir, all_reduce, is_run_dir
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
    w = max(12, *(len(r[0]) for r in rows))
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
    switch = next((r["iter"] for r in rows if r["stage"] == "cpt"), None)

    def series(prefix):
        keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
        return {k[len(prefix):]: [(r["iter"], r[k]) for r in rows if k in r] for k in keys}

    def save(fig, ax, name, ylabel):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(run.file("plots"), f"{name}.png"), dpi=110)
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
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4))
        it, e, t = zip(*pts)
        ax.plot(it, e, label="expected")
        ax.plot(it, t, label="target (warm-up schedule)", ls="--")
        save(fig, ax, "sparsity", "sparsity of the prunable weights")


# -----------------------------------------------------------------------------
# the commands

def eval_main(argv) -> int:
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
            model = convert.load_model(path)
            bins.check_compatible(model.config.vocab_size)
            rows.append((path, sum(p.numel() for p in model.parameters()),
                         evaluate(model, bins, args.seq_len, args.batch_size, args.batches)))
    except (ValueError, OSError, convert.ConvertError, CheckpointError) as e:
        print(f"train.py eval: error: {e}", file=sys.stderr)
        return 1
    print(loss_table(bins.domains, rows))
    return 0


def report_main(argv) -> int:
    """What a run did: the source, the pruned and the final model on the same validation batches, the domain
    weights, the time per stage, and a greedy completion from the exported model loaded with transformers."""
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
            if name == "pruned" and (not c["prune_steps"] or not c["cpt_steps"]) or not os.path.exists(path):
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
    print(loss_table(bins.domains, rows))
    metrics = run.read_metrics()
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
    hf = run.file("hf")
    if os.path.isfile(os.path.join(hf, "tokenizer.json")) or os.path.isfile(os.path.join(hf, "tokenizer.model")):
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(hf)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        prompt = "The GNU General Public License is"
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        print(f"greedy completion by {hf} (transformers): {tok.decode(out[0], skip_special_tokens=True)!r}")
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
