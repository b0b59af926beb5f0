"""
Overhead of pruning: one masked training step (masks sampled, masked forward + backward, Lagrangian, optimizer
steps for the model and the L0 module) against the dense step of the same model, fp32 on the CPU, measured side by
side (alternating, so both see the same machine state). Goal: masked / dense <= 1.10. Prints a table and writes
bench/results/masked_step.json.

    python bench/masked_step.py                       # SmolLM2-135M's shape (random weights), 4 x 256 tokens
    python bench/masked_step.py --batch 2 --seq 512 --steps 10 --model models/smollm2-135m
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from l0 import L0Module, TargetShape, mask_generator  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

# SmolLM2-135M: the embedded default model
SMOLLM2 = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      rope_theta=100000.0, rms_norm_eps=1e-5)
TARGET = TargetShape(hidden_size=384, num_hidden_layers=20, num_attention_heads=6, num_key_value_heads=2,
                     intermediate_size=1024)


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", default=None, help="a model directory (default: SmolLM2-135M's shape, random weights)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each kind (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model = Transformer.from_pretrained(args.model)
    else:
        model = Transformer(SMOLLM2)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    l0 = L0Module(model.config, TARGET, warmup_steps=100)
    with torch.no_grad():  # mid-pruning gates: fractional samples, not the all-ones start
        for z in l0.z.values():
            z.log_alpha.uniform_(-2, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    opt_l0 = torch.optim.Adam(l0.parameters(), lr=1e-3)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    y = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))

    def dense(step):
        opt.zero_grad(set_to_none=True)
        model(x, y).backward()
        opt.step()

    def masked(step):
        opt.zero_grad(set_to_none=True)
        opt_l0.zero_grad(set_to_none=True)
        masks = l0(mask_generator(0, step, 0))
        (model(x, y, masks=masks) + l0.lagrangian(step)).backward()
        l0.all_reduce_grads_()
        opt.step()
        opt_l0.step()
        l0.constrain_()

    times = {"dense": [], "masked": []}
    for step in range(args.steps + 1):
        for name, fn in (("dense", dense), ("masked", masked)) if step % 2 else (("masked", masked), ("dense", dense)):
            t0 = time.perf_counter()
            fn(step)
            if step:  # the first of each is a warm-up
                times[name].append(time.perf_counter() - t0)
    d, m = statistics.median(times["dense"]), statistics.median(times["masked"])
    tokens = args.batch * args.seq
    print(f"model {args.model or 'SmolLM2-135M shape (random)'}, {args.batch} x {args.seq} tokens, fp32, "
          f"{args.threads} threads, {args.steps} steps each")
    print(f"{'step':<8}{'median s':>10}{'tok/s':>10}")
    print(f"{'dense':<8}{d:>10.3f}{tokens / d:>10.0f}")
    print(f"{'masked':<8}{m:>10.3f}{tokens / m:>10.0f}")
    print(f"masked / dense = {m / d:.3f} (goal <= 1.10)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "masked_step.json").write_text(json.dumps(dict(
        batch=args.batch, seq=args.seq, threads=args.threads, steps=args.steps, model=args.model or "smollm2-shape",
        dense_s=d, masked_s=m, ratio=m / d, cpu=platform.processor() or platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__), indent=1))


if __name__ == "__main__":
    main()
