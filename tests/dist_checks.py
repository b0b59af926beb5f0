"""
What FSDP2 holds between the calls of a step, checked in 2 gloo processes with bf16 compute (as on GPUs): the
teacher's blocks are resharded after its forward (each block is its own FSDP root, which FSDP2 would leave
gathered), and the masks reach the student's blocks in fp32 (cast_forward_inputs=False), so their gradients are
fp32. tests/test_fsdp.py runs it.

    torchrun --standalone --nproc_per_node=2 tests/dist_checks.py SRC_HF_DIR
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import convert  # noqa: E402
import train  # noqa: E402
from l0 import L0Module, TargetShape, mask_generator  # noqa: E402


def main(src: str):
    cfg = train.TrainConfig(device="cpu", dtype="bfloat16", compile="false")
    rank, world, device, mesh = train.setup_distributed(cfg)
    mcfg, sd = convert.load_hf(src) if rank == 0 else (convert.load_hf(src)[0], None)
    stage = train.stages_of(train.TrainConfig(prune_steps=2, cpt_steps=0))[0]
    teacher = train.build_model(mcfg, sd, cfg, device, mesh, frozen=True)
    student = train.build_model(mcfg, sd, cfg, device, mesh, stage)
    x = torch.randint(0, mcfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(rank))
    out = {}
    teacher.model.layers[0].register_forward_hook(lambda m, args, y: out.update(dtype=y.dtype))
    with torch.no_grad():
        teacher.hidden(x)
    assert out["dtype"] == torch.bfloat16, out  # its blocks computed in bf16 (from the fp32 embedding's output)
    gathered = [n for n, p in teacher.model.layers.named_parameters() if not isinstance(p, DTensor)]
    assert not gathered, f"teacher weights left gathered after its forward: {gathered}"
    l0 = L0Module(mcfg, TargetShape(hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                    num_key_value_heads=1, intermediate_size=40))
    seen = {}
    student.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update({k: v.dtype for k, v in kwargs.items() if k.endswith("_z")}),
        with_kwargs=True)
    masks = l0(mask_generator(0, 0, rank))
    student(x, x, masks=masks).backward()
    assert seen and all(d == torch.float32 for d in seen.values()), seen
    grads = {k: z.log_alpha.grad for k, z in l0.z.items()}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values()), grads
    if rank == 0:
        print("ok", sorted(seen))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # (as dist_prune.py: no gloo teardown at exit)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
