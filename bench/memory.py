"""
A memory plan per GPU for train.py under FSDP2 on N GPUs, without a GPU: what each stage holds, for each choice of
activation checkpointing, resharding and gradient sync (config/prune_llama2.py's choices are what this table
shows fits). By default LLaMA-2-7B -> Sheared-LLaMA-2.7B on 8 x 80 GB, sequences of 4096.

    python bench/memory.py                              # the table in docs/operations.md ("Memory plan"), ~1 min
    python bench/memory.py --gpus 16 --cpt_micro_batch 4

How each term is obtained:
- weights, gradients and AdamW state: exact parameter counts (fp32 master weights, fp32 gradients, two fp32 moments:
  16 bytes a parameter), sharded over the GPUs (under HSDP, over the GPUs of a node: --shard);
- gathered bf16 weights: the root's (embedding, final norm, lm_head: FSDP2 keeps a root's weights gathered for the
  backward) and two blocks' (the one computing, the one prefetched), or every block's with reshard_after_forward
  off; with defer_grad_sync, the whole model's fp32 gradients, unsharded, until the step's reduce-scatter;
- activations: the tensors autograd saves in one block's forward, measured here on the CPU with hooks on a block of
  the real shape in bf16 (masks drawn as in pruning), at a short sequence and scaled linearly (SDPA's flash kernels
  save no T x T matrix); a block whose activations are checkpointed saves only its input, and one block's
  activations come back during its backward;
- transients: one block's bf16 gradients and their fp32 copy for the reduce-scatter, the cross-entropy's logits
  chunk (model.LOGITS_CHUNK) and its gradient.
Not counted: the CUDA context and NCCL's buffers (about 1-3 GiB), and the caching allocator's fragmentation (keep
about 10% of the GPU free); bench/gpu.py measures real peaks.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/data.py must not shadow data.py
import model as model_py  # noqa: E402
from l0 import L0Module, mask_generator  # noqa: E402
from model import Block, ModelConfig, rope_cos_sin  # noqa: E402
from speed import SHAPES, TARGETS, pruned_config  # noqa: E402

GIB = 2 ** 30


def block_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Block(cfg).parameters())


def root_params(cfg: ModelConfig) -> int:
    tied = cfg.tie_word_embeddings
    return cfg.vocab_size * cfg.hidden_size * (1 if tied else 2) + cfg.hidden_size


@torch.no_grad()
def _randomise_(module):
    for p in module.parameters():
        p.normal_(std=0.02)


def saved_bytes_per_token(cfg: ModelConfig, masked: bool, T: int = 256) -> tuple[float, float]:
    """(bytes autograd saves in one block's forward per token, of which weight-sized: the masked weight products of
    o_proj and down_proj), measured on the CPU in bf16 at sequence length T, parameters excluded (FSDP2 frees the
    gathered ones after the forward and gathers them again for the backward)."""
    torch.manual_seed(0)
    block = Block(cfg).to(torch.bfloat16)
    _randomise_(block)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x = torch.randn(1, T, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(cfg, T, x.device, x.dtype)
    kw = {}
    if masked:
        l0 = L0Module(cfg, TARGETS[ARGS.source])
        m = l0(mask_generator(0, 0, 0))
        hidden_z = m["hidden_z"]
        kw = dict(head_z=m["head_z"][0], intermediate_z=m["intermediate_z"][0], hidden_z=hidden_z,
                  hidden_n=(hidden_z != 0).sum().clamp(min=1),
                  out_z=m["layer_z"][0] * hidden_z if "layer_z" in m else hidden_z)
    seen, weight_sized = {}, {}
    wsize = {cfg.hidden_size * cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size * cfg.intermediate_size}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr() != 0:
            seen[s.data_ptr()] = s.nbytes()
            if t.numel() in wsize and t.dim() == 2:
                weight_sized[s.data_ptr()] = s.nbytes()
        return t
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin, **kw)
    weights = sum(weight_sized.values())
    return (sum(seen.values()) - weights) / T, weights  # weights: per micro-batch, not per token


def plan(cfg: ModelConfig, shard: int, mb: int, T: int, masked: bool, every: int, reshard: bool, defer: bool,
         teacher: ModelConfig | None = None) -> dict:
    L, Pb, Pr = cfg.num_hidden_layers, block_params(cfg), root_params(cfg)
    P = L * Pb + Pr
    per_tok, weights = SAVED[(cfg.hidden_size, cfg.num_hidden_layers, masked)]
    tokens = mb * T
    full = per_tok * tokens + weights  # one block's saved tensors
    inp = tokens * cfg.hidden_size * 2  # a checkpointed block saves its bf16 input only
    ckpt = 0 if every == 0 else len(range(0, L, every))
    acts = ckpt * inp + (L - ckpt) * full + (full if ckpt else 0)  # (+ one block recomputed in its backward)
    out = {
        "weights, grads, AdamW (fp32, sharded)": 16 * P / shard,
        "gathered bf16 weights": 2 * Pr + 2 * (L * Pb if not reshard else 2 * Pb),
        "unsharded fp32 grads (deferred sync)": 4 * P if defer else 0,
        "activations": acts,
        "transients": 6 * Pb + 2 * 4 * model_py.LOGITS_CHUNK + tokens * cfg.hidden_size * 4,
    }
    if teacher is not None:  # frozen, blocks sharded (fp32) and gathered one at a time; its root whole, fp32
        Pt = teacher.num_hidden_layers * block_params(teacher)
        out["teacher"] = 4 * Pt / shard + 4 * root_params(teacher) + 2 * block_params(teacher)
    out["total"] = sum(out.values())
    return out


def main():
    global ARGS, SAVED
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--source", default="llama2-7b", help="bench/speed.py SHAPES (its TARGETS is the pruned shape)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--shard", type=int, default=0, help="GPUs a model is sharded over (HSDP: a node's); 0 = --gpus")
    ap.add_argument("--gpu_gib", type=float, default=79.6, help="what torch sees of the GPU (an 80 GB H100: 79.6)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--prune_micro_batch", type=int, default=1)
    ap.add_argument("--cpt_micro_batch", type=int, default=2)
    ARGS = args = ap.parse_args()
    src = SHAPES[args.source]
    small = pruned_config(src, TARGETS[args.source])
    shard = args.shard or args.gpus
    SAVED = {(c.hidden_size, c.num_hidden_layers, m): saved_bytes_per_token(c, m) for c, m in ((src, True),
                                                                                                (small, False))}
    for (d, L, m), (tok, w) in SAVED.items():
        print(f"measured: one block (hidden {d}{', masked' if m else ''}) saves {tok / 1024:.1f} KiB a token"
              + (f" + {w / GIB:.2f} GiB of masked weight products" if w else ""))
    rows = []
    for stage, cfg, mb, masked in (("prune", src, args.prune_micro_batch, True), ("cpt", small, args.cpt_micro_batch,
                                                                                   False)):
        opts = [(0, True, False), (2, True, False), (1, True, False)]
        if stage == "cpt":
            opts += [(0, False, False), (0, False, True)]
        for every, reshard, defer in opts:
            r = plan(cfg, shard, mb, args.seq, masked, every, reshard, defer)
            rows.append((stage, mb, every, reshard, defer, "", r))
        if stage == "cpt":
            r = plan(cfg, shard, mb, args.seq, masked, 0, False, True, teacher=src)
            rows.append((stage, mb, 0, False, True, "distilling from the 7B", r))
    keys = list(rows[0][-1])
    print(f"\nper GPU, GiB: {args.source} -> {small.num_hidden_layers} layers, hidden {small.hidden_size}, "
          f"{args.gpus} GPUs sharding over {shard}, sequences of {args.seq}; * = fits in {args.gpu_gib:g} GiB with "
          "10% to spare\n")
    print("| stage | micro-batch | activation checkpointing | reshard after forward | deferred grad sync | "
          + " | ".join(k for k in keys) + " |")
    print("|" + "---|" * (5 + len(keys)))
    for stage, mb, every, reshard, defer, note, r in rows:
        ac = "off" if every == 0 else "every block" if every == 1 else f"1 block in {every}"
        fits = r["total"] <= 0.9 * args.gpu_gib * GIB
        print(f"| {stage}{' (' + note + ')' if note else ''} | {mb} | {ac} | {'yes' if reshard else 'no'} | "
              f"{'yes' if defer else 'no'} | " + " | ".join(
                  f"{r[k] / GIB:.1f}" + ("*" if k == "total" and fits else "") for k in keys) + " |")


if __name__ == "__main__":
    main()
