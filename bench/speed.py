"""
Speed, measured side by side in one run: our training step against Hugging Face transformers' implementation of
the same config, the pruning step against the dense one, the compacted model's forward against its source's, and
how close each training step comes to this machine's own limit (model FLOP/s over the FLOP/s of one large matmul).
Every row runs its candidates in rotating order (ABC, BCA, ...) and reports medians, and the range of each ratio over
the rounds, so a busy machine slows both sides alike and its noise shows. Prints a table and writes
bench/results/speed-<device>.json.

    python bench/speed.py                                # CPU, fp32, 4 x 256 tokens, SmolLM2-135M and ~0.5B shapes
    python bench/speed.py --shapes smollm2-135m --reps 3 --no-memory
    python bench/speed.py --device cuda --dtype bfloat16 --batch 8 --seq 2048   # on a GPU
    python bench/speed.py --matmul       # this machine's fp32 2048^3 matmul rate alone (seconds): the README's
                                         # demo times scale about inversely with it

Rows (random weights, shared by both implementations, one AdamW over them, so only the model code differs):
  train      forward + backward + AdamW step (the AdamW train.py uses), ours vs transformers' LlamaForCausalLM (SDPA
             attention); with --compile also ours with torch.compile'd blocks (train.py --compile=true)
  forward    forward with the loss, no gradients, ours vs transformers'
  loss       the lm_head and the loss alone, forward and backward: our LinearCrossEntropy vs F.cross_entropy
  distill    distillation's loss alone (student and teacher heads, forward and backward): our LinearDistill vs
             the same formula in torch.nn.functional autograd, and vs the plain cross-entropy (what it adds)
  adamw      the optimizer step alone over the model's weights: torch's for-loop AdamW vs its fused kernel
  prune      masked step (masks drawn per micro-batch, Lagrangian, L0 optimizer) vs the dense step, 2 micro-batches
  compact    forward of the compacted model (pruned to the target shape) vs its source, next to the ratio of the
             weights used per token
  roofline   model FLOP/s of the dense and pruning steps (ModelConfig.flops_per_token: 6 per matmul weight
             + 12 L H hs T per token, PaLM's count) over the FLOP/s of
             a large matmul in the step's dtype, measured interleaved with them
Peak memory of the train, forward and prune candidates: each once more in a fresh process (CPU: the process's
peak resident set during two calls, model and optimizer state included; GPU: peak allocated), unless --no-memory.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from l0 import L0Module, TargetShape, mask_generator  # noqa: E402
from model import LinearCrossEntropy, ModelConfig, Transformer  # noqa: E402

SHAPES = {
    # the embedded default
    "smollm2-135m": ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
    # a LLaMA-2-style ~0.5B (558M) model: MHA, untied embeddings
    "llama-0.5b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=1280, intermediate_size=3456,
                              num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=20),
    # LLaMA-2-7B, the source of Sheared-LLaMA, and the Sheared-LLaMA-2.7B shape (for the GPU)
    "llama2-7b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama-2.7b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=2560, intermediate_size=6912,
                              num_hidden_layers=32, num_attention_heads=20, num_key_value_heads=20),
    # for the tests: every row in seconds
    "tiny": ModelConfig(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
TARGETS = {  # about 40% of the weights: the compaction row and the pruning row's target
    "smollm2-135m": TargetShape(hidden_size=384, num_hidden_layers=20, num_attention_heads=6, num_key_value_heads=2,
                                intermediate_size=1024),
    "llama-0.5b": TargetShape(hidden_size=896, num_hidden_layers=16, num_attention_heads=14, num_key_value_heads=14,
                              intermediate_size=2048),
    "llama2-7b": TargetShape(hidden_size=2560, num_hidden_layers=32, num_attention_heads=20, num_key_value_heads=20,
                             intermediate_size=6912),
    "llama-2.7b": TargetShape(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                              intermediate_size=5504),
    "tiny": TargetShape(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=64),
}


def make_model(cfg: ModelConfig, device, dtype) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model.to(dtype)


def share_parameters(dst: torch.nn.Module, src: torch.nn.Module) -> torch.nn.Module:
    """Point dst's parameters (built on meta, same names) at src's very Parameter objects: one optimizer steps both,
    and no memory is duplicated."""
    for name, p in src.named_parameters(remove_duplicate=False):
        mod, _, attr = name.rpartition(".")
        setattr(dst.get_submodule(mod), attr, p)
    return dst.train()


def hf_twin(model: Transformer):
    """transformers' LlamaForCausalLM of the same config, sharing the model's weights (the names match)."""
    import transformers
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in model.config.to_hf().items() if k != "architectures"})
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    device = model.lm_head.weight.device
    with torch.device(device):  # the rotary embedding's buffers, off meta
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)
    assert not any(b.is_meta for b in hf.buffers())
    return share_parameters(hf, model)


def compiled_twin(model: Transformer):
    """Our model with each block torch.compile'd, as train.py --compile=true, sharing the model's weights."""
    with torch.device("meta"):
        twin = Transformer(model.config)
    for block in twin.model.layers:
        block.compile_()
    return share_parameters(twin, model)


def interleave(fns: dict, reps: int, warmup: int = 1, sync=lambda: None) -> dict:
    """Seconds of each call of each fn (warm-up calls not counted), the fns run in rotating order."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(warmup + reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def candidates(shape: str, args, device, dtype) -> dict:
    """name -> (setup() -> step fn, tokens per call, group); built lazily so a memory probe builds only one."""
    cfg, B, T = SHAPES[shape], args.batch, args.seq
    V = cfg.vocab_size
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and args.autocast)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, V, (B, T), generator=g).to(device), torch.randint(0, V, (B, T), generator=g).to(device)

    state = {}

    def base():
        if "model" not in state:
            state["model"] = make_model(cfg, device, torch.float32 if args.autocast else dtype)  # eager
            cpu = device.type == "cpu"  # the optimizer train.py uses
            state["opt"] = torch.optim.AdamW(state["model"].parameters(), lr=1e-5, weight_decay=0.0,
                                             fused=cpu or None, foreach=None if cpu else True)
            state["x"], state["y"] = batch(0)
        return state["model"], state["opt"], state["x"], state["y"]

    def twin(kind):
        model = base()[0]
        if kind not in state:
            state[kind] = model if kind == "ours" else hf_twin(model) if kind == "hf" else compiled_twin(model)
        return state[kind]

    def call(kind, x, y):
        if kind == "hf":  # transformers shifts the labels itself (and pads the last): the same targets as ours
            return twin("hf")(input_ids=x, labels=torch.cat([x[:, :1], y[:, :-1]], 1)).loss
        return twin(kind)(x, y)

    def train_step(kind):
        def setup():
            _, opt, x, y = base()
            twin(kind)

            def step():
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = call(kind, x, y)
                loss.backward()
                opt.step()
            return step
        return setup

    def forward(kind):
        def setup():
            _, _, x, y = base()
            twin(kind)

            def fwd():
                with torch.no_grad(), autocast:
                    call(kind, x, y)
            return fwd
        return setup

    micro = max(1, B // 2)

    def dense_accum():
        model, opt, x, y = base()

        def step():
            opt.zero_grad(set_to_none=True)
            for i in range(0, B, micro):
                with autocast:
                    loss = model(x[i:i + micro], y[i:i + micro]) * (micro / B)
                loss.backward()
            opt.step()
        return step

    def prune_step():
        model, opt, x, y = base()
        if "l0" not in state:
            l0 = L0Module(cfg, TARGETS[shape], warmup_steps=100).to(device)
            with torch.no_grad():  # mid-pruning gates: fractional samples, not the all-ones start
                for z in l0.z.values():
                    z.log_alpha.uniform_(-2, 4)
            state["l0"], state["l0_opt"] = l0, torch.optim.Adam(l0.parameters(), lr=1e-3)
        l0, l0_opt = state["l0"], state["l0_opt"]
        n = [0]

        def step():
            opt.zero_grad(set_to_none=True)
            l0_opt.zero_grad(set_to_none=True)
            for row, i in enumerate(range(0, B, micro)):
                masks = l0(mask_generator(0, n[0], row))
                with autocast:
                    loss = model(x[i:i + micro], y[i:i + micro], masks=masks) * (micro / B)
                loss.backward()
            l0.lagrangian(n[0]).backward()
            l0.all_reduce_grads_()
            opt.step()
            l0_opt.step()
            l0.constrain_()
            n[0] += 1
        return step

    def compact_forward():
        model, _, x, y = base()
        if "pruned" not in state:
            l0 = L0Module(cfg, TARGETS[shape]).to(device)
            with torch.no_grad():  # a random valid mask of the target shape
                for z in l0.z.values():
                    z.log_alpha.normal_()
            state["pruned"] = model.prune(l0.deterministic_masks())
        pruned = state["pruned"]

        def fwd():
            with torch.no_grad(), autocast:
                pruned(x, y)
        return fwd

    def matmul():
        n = args.matmul_size
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        reps = args.matmul_reps

        def mm():
            for _ in range(reps):
                torch.mm(a, b)
        return mm

    def loss(ours):
        def setup():  # the lm_head and the loss alone, forward and backward, on random final hidden states
            g = torch.Generator().manual_seed(1)
            h = torch.randn(B * T, cfg.hidden_size, generator=g).to(device, dtype).requires_grad_()
            w = (torch.randn(V, cfg.hidden_size, generator=g) * 0.02).to(device, dtype).requires_grad_()
            t = torch.randint(0, V, (B * T,), generator=g).to(device)
            import model as model_py
            chunk = max(1, model_py.LOGITS_CHUNK // V)

            def step():
                h.grad = w.grad = None
                with autocast:
                    if ours:
                        out = LinearCrossEntropy.apply(h, w, t, chunk, True)
                    else:
                        out = F.cross_entropy(F.linear(h, w).float(), t, reduction="none")
                out.sum().backward()
            return step
        return setup

    def distill(kind):
        def setup():  # distillation's loss alone (student and teacher heads), forward and backward
            g = torch.Generator().manual_seed(2)
            h, ht = (torch.randn(B * T, cfg.hidden_size, generator=g).to(device, dtype) for _ in range(2))
            h.requires_grad_()
            w, wt = ((torch.randn(V, cfg.hidden_size, generator=g) * 0.02).to(device, dtype) for _ in range(2))
            w.requires_grad_()
            t = torch.randint(0, V, (B * T,), generator=g).to(device)
            import model as model_py
            chunk = max(1, model_py.LOGITS_CHUNK // V)

            def step():
                h.grad = w.grad = None
                with autocast:
                    if kind == "ours":
                        out = model_py.LinearDistill.apply(h, w, ht, wt, t, 0.5, 2.0, chunk, True)[0]
                    elif kind == "autograd":  # the formula as one writes it with torch.nn.functional
                        zs, zt = F.linear(h, w).float(), F.linear(ht, wt).float()
                        kl = F.kl_div(F.log_softmax(zs / 2, -1), F.log_softmax(zt / 2, -1), log_target=True,
                                      reduction="none").sum(-1)
                        out = 0.5 * F.cross_entropy(zs, t, reduction="none") + 0.5 * 4 * kl
                    else:
                        out = LinearCrossEntropy.apply(h, w, t, chunk, True)
                out.sum().backward()
            return step
        return setup

    def adamw(fused):
        def setup():
            model = base()[0]
            params = [p for p in model.parameters()]
            for p in params:
                if p.grad is None:
                    p.grad = torch.randn_like(p) * 1e-3
            opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=fused or None, foreach=False)
            return opt.step
        return setup

    tok = B * T
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    mm_flops = 2 * args.matmul_size ** 3 * args.matmul_reps
    kinds = {"ours": "ours", "transformers": "hf"} | ({"ours+compile": "compiled"} if args.compile else {})
    out = {f"{row}/{name}": (make(kind), tok, row) for row, make in (("train", train_step), ("forward", forward))
           for name, kind in kinds.items()}
    return out | {
        "loss/ours": (loss(True), tok, "loss"), "loss/F.cross_entropy": (loss(False), tok, "loss"),
        "distill/ours": (distill("ours"), tok, "distill"), "distill/autograd": (distill("autograd"), tok, "distill"),
        "distill/cross-entropy": (distill("ce"), tok, "distill"),
        "adamw/for-loop": (adamw(False), n_params, "adamw"), "adamw/fused": (adamw(True), n_params, "adamw"),
        "prune/dense": (dense_accum, tok, "prune"), "prune/masked": (prune_step, tok, "prune"),
        "prune/matmul": (matmul, mm_flops, "prune"),
        "compact/source": (forward("ours"), tok, "compact"), "compact/pruned": (compact_forward, tok, "compact"),
    }


def vm_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20  # kB -> GB


def memory_probe(shape, name, args, device, dtype):
    """Run one candidate twice in this (fresh) process; print its peak memory in GB as JSON: on the GPU the peak
    allocated, on the CPU the peak resident set of the process (model, optimizer state, activations, runtime)."""
    fn = candidates(shape, args, device, dtype)[name][0]()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn(), fn()
        torch.cuda.synchronize()
        print(json.dumps({"peak_gb": torch.cuda.max_memory_allocated() / 2**30}))
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS: the peak of the calls only
            f.write("5")
        fn(), fn()
        print(json.dumps({"peak_gb": vm_gb("VmHWM")}))


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def matmul_rate(args, device, dtype):
    """The roofline's matmul alone: the median of 7 timed calls of matmul_reps products, after a warm-up."""
    n, reps = args.matmul_size, args.matmul_reps
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(8):
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t)
    rate = 2 * n ** 3 * reps / statistics.median(times[1:]) / 1e9
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {args.threads} threads"
    print(f"{rate:,.0f} GFLOP/s: {n}^3 {str(dtype).removeprefix('torch.')} matmul on {where} (torch {torch.__version__})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--shapes", default="smollm2-135m,llama-0.5b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--rows", default="train,forward,loss,distill,adamw,prune,compact")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5, help="timed calls of each candidate (plus one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--autocast", action="store_true", help="fp32 weights with autocast to --dtype, as train.py on "
                    "one process (default: weights in --dtype)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our blocks, as train.py --compile=true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--matmul_size", type=int, default=0, help="roofline matmul size (default: 2048 CPU, 8192 GPU)")
    ap.add_argument("--matmul_reps", type=int, default=0, help="matmuls per timed call (default: 4 CPU, 50 GPU)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--probe", nargs=2, metavar=("SHAPE", "NAME"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/speed-<device>.json)")
    ap.add_argument("--matmul", action="store_true", help="only the matmul rate, printed (seconds)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gpu = device.type == "cuda"
    args.matmul_size = args.matmul_size or (8192 if gpu else 2048)
    args.matmul_reps = args.matmul_reps or (50 if gpu else 4)
    if args.matmul:
        return matmul_rate(args, device, dtype)
    if args.probe:
        return memory_probe(*args.probe, args, device, dtype)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    rows_wanted = args.rows.split(",")
    results = []
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            sys.exit(f"speed.py: error: unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
        cfg = SHAPES[shape]
        cands = candidates(shape, args, device, dtype)
        for group in rows_wanted:
            names = [k for k, v in cands.items() if v[2] == group]
            print(f"{shape} {group}: {', '.join(names)} ...", flush=True)
            runs = interleave({k: cands[k][0]() for k in names}, args.reps, sync=sync)
            t = {k: statistics.median(v) for k, v in runs.items()}

            def spread(a, b):  # the ratio a / b within each round of the rotation: its range over the rounds
                r = [x / y for x, y in zip(runs[a], runs[b])]
                return [min(r), max(r)]
            row = dict(shape=shape, group=group, seconds=t, seconds_each=runs,
                       tokens_per_s={k: cands[k][1] / t[k] for k in names if per_token(k)})
            fpt = cfg.flops_per_token(args.seq)
            if group == "prune":
                mm = cands["prune/matmul"][1] / t["prune/matmul"]
                row["matmul_flops_per_s"] = mm
                row["roofline"] = {k: fpt * row["tokens_per_s"][k] / mm for k in ("prune/dense", "prune/masked")}
                row["ratio"] = t["prune/masked"] / t["prune/dense"]  # step time, masked / dense
                row["ratio_range"] = spread("prune/masked", "prune/dense")
            elif group == "compact":
                row["speedup"] = t["compact/source"] / t["compact/pruned"]
                row["ratio_range"] = spread("compact/source", "compact/pruned")
                row["weight_ratio"] = cfg.matmul_params() / pruned_config(cfg, TARGETS[shape]).matmul_params()
            elif group == "adamw":
                row["ratio"] = t["adamw/for-loop"] / t["adamw/fused"]
            elif group == "loss":
                row["ratio"] = t["loss/F.cross_entropy"] / t["loss/ours"]
                row["ratio_range"] = spread("loss/F.cross_entropy", "loss/ours")
            elif group == "distill":
                row["ratio"] = t["distill/autograd"] / t["distill/ours"]
                row["ratio_range"] = spread("distill/autograd", "distill/ours")
                row["over_cross_entropy"] = t["distill/ours"] / t["distill/cross-entropy"]
            else:  # our tokens/s over theirs
                row["ratio"] = t[f"{group}/transformers"] / t[f"{group}/ours"]
                row["ratio_range"] = spread(f"{group}/transformers", f"{group}/ours")
                if f"{group}/ours+compile" in t:
                    row["ratio_compiled"] = t[f"{group}/transformers"] / t[f"{group}/ours+compile"]
                    row["ratio_compiled_range"] = spread(f"{group}/transformers", f"{group}/ours+compile")
            if args.memory:
                # (not for compact: its probe holds the source model beside the compacted one)
                row["peak_memory_gb"] = {k: probe(shape, k) for k in names
                                         if per_token(k) and group in ("train", "forward", "prune")}
            results.append(row)
            print("   " + describe(row), flush=True)
    out = Path(args.out or ROOT / "bench" / "results" / f"speed-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        command=" ".join(["python", "bench/speed.py"] + sys.argv[1:]), date=datetime.date.today().isoformat(),
        machine=machine(device), batch=args.batch, seq=args.seq, dtype=args.dtype, autocast=args.autocast,
        compile=args.compile, threads=args.threads, reps=args.reps, rows=results), indent=1))
    print(f"wrote {out}")


def per_token(name: str) -> bool:  # a candidate that processes tokens (not the matmul or the optimizer alone)
    return not (name.startswith("adamw/") or name == "prune/matmul")


def pruned_config(cfg: ModelConfig, t: TargetShape) -> ModelConfig:
    from dataclasses import replace
    return replace(cfg, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                   num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                   intermediate_size=t.intermediate_size, head_dim=cfg.head_dim)


def probe(shape, name) -> float:
    cmd = [sys.executable, __file__, "--probe", shape, name] + [a for a in sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_gb"]


def describe(row) -> str:
    tps = ", ".join(f"{k.split('/')[1]} {v:,.0f} tok/s" for k, v in row["tokens_per_s"].items())
    if "roofline" in row:
        extra = (f"masked/dense step time {row['ratio']:.3f}x; of the matmul roofline "
                 f"({row['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s): dense {100 * row['roofline']['prune/dense']:.1f}%,"
                 f" masked {100 * row['roofline']['prune/masked']:.1f}%")
    elif "speedup" in row:
        extra = f"compacted forward {row['speedup']:.2f}x faster for {row['weight_ratio']:.2f}x fewer matmul weights"
    elif row["group"] == "loss":
        extra = f"F.cross_entropy / ours: {row['ratio']:.3f}x"
    elif row["group"] == "distill":
        extra = (f"autograd / ours: {row['ratio']:.3f}x; ours / cross-entropy alone: "
                 f"{row['over_cross_entropy']:.2f}x")
    elif row["group"] == "adamw":
        tps = ", ".join(f"{k.split('/')[1]} {1e3 * v:.0f} ms" for k, v in row["seconds"].items())
        extra = f"for-loop / fused: {row['ratio']:.2f}x"
    else:
        extra = f"ours / transformers: {row['ratio']:.3f}x" + (
            f" (compiled: {row['ratio_compiled']:.3f}x)" if "ratio_compiled" in row else "")
    if "ratio_range" in row:
        extra += " [rounds {:.3f}-{:.3f}]".format(*row["ratio_range"])
    mem = row.get("peak_memory_gb")
    mem = "; peak GB " + ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in mem.items()) if mem else ""
    return f"{tps}; {extra}{mem}"


def machine(device) -> dict:
    m = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
             cpus=os.cpu_count(), torch=torch.__version__)
    try:
        import transformers
        m["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name()
    return m


if __name__ == "__main__":
    main()
