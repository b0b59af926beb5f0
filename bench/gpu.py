"""
GPU throughput and memory of the two stages as train.py runs them under torchrun (train.build_model: FSDP2 per
block and root, bf16 compute with fp32 master weights, AdamW state and gradient reduction, fp32 masks; fused
AdamW), random weights.

  prune  the source model with L0 masks drawn per micro-batch, the Lagrangian and both optimizers (LLaMA-2-7B)
  cpt    continued pretraining of the pruned shape, dense (Sheared-LLaMA-2.7B)

Rows (default_rows), per stage: SDPA restricted to its FlashAttention backend, eager and torch.compile'd (train.py's
GPU default), with activation checkpointing as one GPU needs it (every block while pruning 7B, none for 2.7B) and,
for continued pretraining, flipped; then SDPA's cuDNN backend and the flash-attn package's flash_attn_func (if
installed). Prints tokens/s, model-FLOPs utilisation (ModelConfig.flops_per_token against the GPU's dense bf16 peak),
peak allocated and reserved memory, and the warm-up's seconds (compilation); memory is freed between rows. Writes
bench/results/gpu.json after every row; rows not started within --minutes are recorded as skipped.

    bash bench/gpu.sh                                     # one GPU: within 9.5 minutes (--minutes 8.5 of rows)
    torchrun --nproc_per_node=1 bench/gpu.py --steps 3 --seq 2048
    python bench/gpu.py --device cpu --smoke              # the code path on a tiny model, CPU (gloo), for testing
"""

import argparse
import datetime
import json
import gc
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/data.py must not shadow data.py
import model as model_py  # noqa: E402
import train  # noqa: E402
from l0 import L0Module, TargetShape, mask_generator  # noqa: E402
from model import ModelConfig  # noqa: E402
from report import PEAK_FLOPS  # noqa: E402
from speed import SHAPES, TARGETS, pruned_config  # noqa: E402


def sdpa_backend(backend):
    from torch.nn.attention import sdpa_kernel

    def attention(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return attention


def flash_attn_package():
    from flash_attn import flash_attn_func

    def attention(q, k, v):  # flash_attn_func takes (B, T, nh, hs) and handles GQA itself
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    return attention


def kernels(device) -> dict:
    if device.type != "cuda":
        return {"sdpa": model_py.attention}
    from torch.nn.attention import SDPBackend
    out = {"sdpa-flash": sdpa_backend(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": sdpa_backend(SDPBackend.CUDNN_ATTENTION)}
    try:
        out["flash-attn"] = flash_attn_package()
    except ImportError:
        print("flash-attn is not installed: its row is skipped (pip install flash-attn)")
    return out


def build(cfg: ModelConfig, device, mesh, stage: str, compiled: bool, checkpointing: int):
    """train.build_model's model for the stage (FSDP2 per block and root, bf16 compute, fp32 masks, the stage's
    activation checkpointing), with random fp32 weights on the device."""
    tc = train.TrainConfig(device=device.type, compile="true" if compiled else "false", prune_steps=1, cpt_steps=1,
                           **{f"{stage}_activation_checkpointing": checkpointing})
    st = next(s for s in train.stages_of(tc) if s.name == stage)
    model = train.build_model(cfg, None, tc, device, mesh, st)
    torch.manual_seed(dist.get_rank())
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.normal_(std=0.02) if p.dim() > 1 else local.fill_(1.0)
    return model


def run(row: dict, cfg, target, args, device, mesh) -> dict:
    """One row: warm-up steps (compilation included), then the timed ones, as train.py's train_step does them
    (micro-batches with one mask sample each, the Lagrangian, fused AdamW for the model, AdamW for the masks)."""
    stage = row["stage"]
    model = build(cfg, device, mesh, stage, row["compiled"], row["activation_checkpointing"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)  # train.py's
    l0 = l0_opt = None
    if stage == "prune":
        l0 = L0Module(cfg, target, warmup_steps=100).to(device)
        l0_opt = torch.optim.AdamW(l0.parameters(), lr=1e-3, weight_decay=0.0)
    B, T, mb = args.batch, args.seq, args.micro_batch
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)

    def step(n):
        for i in range(0, B, mb):
            masks = l0(mask_generator(0, n, i)) if l0 is not None else None
            (model(x[i:i + mb], y[i:i + mb], masks=masks, reduction="none").sum() / (B * T)).backward()
        if l0 is not None:
            l0.lagrangian(n).backward()
            l0.all_reduce_grads_()
            l0_opt.step()
            l0_opt.zero_grad(set_to_none=True)
            l0.constrain_()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for n in range(args.warmup):
        step(n)
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for n in range(args.steps):
        step(args.warmup + n)
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tps = B * T * dist.get_world_size() / dt
    peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None) \
        if device.type == "cuda" else None
    gib = 2 ** 30
    return dict(step_seconds=dt, warmup_seconds=warm, tokens_per_s=tps,
                mfu=cfg.flops_per_token(T) * tps / (peak * dist.get_world_size()) if peak else None,
                peak_memory_gb=torch.cuda.max_memory_allocated() / gib if device.type == "cuda" else None,
                peak_reserved_gb=torch.cuda.max_memory_reserved() / gib if device.type == "cuda" else None)


def free(device):
    """What a row left behind: FSDP2 modules hold reference cycles (hooks, states), so their memory goes only
    after a collection; then the caching allocator gives it back and the next row's peak starts from zero."""
    gc.collect()
    torch._dynamo.reset()  # and the compiled graphs: each row compiles its own, within dynamo's recompile limit
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def default_rows(names: list[str]) -> list[dict]:
    """Per stage: the kernels eager, SDPA-flash compiled, and activation checkpointing flipped. One 141 GB GPU
    holds 7B pruning (16 bytes a parameter of weights, gradients and AdamW state: 108 GB) only with checkpointing
    on every block; the 2.7B continued pretraining runs without."""
    rows = []
    for stage, ac, flipped in (("prune", 1, None), ("cpt", 0, 1)):
        base = dict(stage=stage, compiled=False, activation_checkpointing=ac)
        rows += [dict(base, attention="sdpa-flash"), dict(base, attention="sdpa-flash", compiled=True)]
        if flipped is not None:
            rows.append(dict(base, attention="sdpa-flash", activation_checkpointing=flipped))
        rows += [dict(base, attention=n) for n in names if n != "sdpa-flash"]
    return rows


def describe(c: ModelConfig) -> str:
    return (f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads}/{c.num_key_value_heads} "
            f"heads, intermediate {c.intermediate_size}, {c.matmul_params() / 1e9:.2f}B matmul weights")


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--source", default="llama2-7b", help="the pruning stage's model (bench/speed.py SHAPES)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step per GPU")
    ap.add_argument("--micro_batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (compilation happens here)")
    ap.add_argument("--stages", default="prune,cpt")
    ap.add_argument("--minutes", type=float, default=8.5, help="rows not started by then are skipped (and say so)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and sequence: checks the code path only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu.py: error: no GPU is visible; for a CPU check of the code path use --device cpu --smoke")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    source, target = SHAPES[args.source], TARGETS[args.source]
    if args.smoke:
        source = replace(source, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=0)
        target = TargetShape(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=64)
        args.seq, args.batch, args.steps, args.warmup = 32, 2, 1, 1
    attentions = kernels(device)
    todo = [r for r in default_rows(list(attentions)) if r["stage"] in args.stages.split(",")
            and r["attention"] in attentions and (device.type == "cuda" or not r["compiled"])]  # (CPU: no compile)
    rows, started, master = [], time.perf_counter(), dist.get_rank() == 0
    for spec in todo:
        cfg = source if spec["stage"] == "prune" else pruned_config(source, target)
        r = dict(spec, shape=describe(cfg))
        if time.perf_counter() - started > 60 * args.minutes:
            r["error"] = f"skipped: past --minutes {args.minutes:g}"
        else:
            model_py.attention = attentions[spec["attention"]]
            try:
                r.update(run(spec, cfg, target, args, device, mesh))
            except torch.OutOfMemoryError as e:
                if args.smoke:
                    raise
                r["error"] = f"out of memory: {str(e).splitlines()[0]}"
            except Exception as e:  # a kernel that does not support this GPU or shape: record it, go on
                if args.smoke:
                    raise
                r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            free(device)
        rows.append(r)
        if master:
            print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
                  flush=True)
            if not args.smoke:  # after every row: a run cut short keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(dict(
                    command=" ".join(["bench/gpu.py"] + sys.argv[1:]), date=datetime.date.today().isoformat(),
                    commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=ROOT).stdout.strip(),
                    machine=dict(platform=platform.platform(), torch=torch.__version__, world=dist.get_world_size(),
                                 gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                                 gpu_memory_gb=torch.cuda.get_device_properties(device).total_memory / 2 ** 30
                                 if device.type == "cuda" else None),
                    batch=args.batch, micro_batch=args.micro_batch, seq=args.seq, steps=args.steps, rows=rows),
                    indent=1))
    if master and not args.smoke:
        print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
