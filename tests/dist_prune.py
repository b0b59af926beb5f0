"""
A few masked training steps of a tiny model, then gather -> prune_state_dict: in one process, or sharded with FSDP2
over N gloo processes. tests/test_fsdp.py runs both and compares.

    torchrun --standalone --nproc_per_node=2 tests/dist_prune.py SRC_HF_DIR OUT.pt
"""

import os
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import convert  # noqa: E402
from l0 import L0Module, TargetShape, mask_generator  # noqa: E402
from model import prune_state_dict  # noqa: E402

STEPS, BATCH, MICRO, SEQ = 3, 4, 1, 12  # global batch 4 rows, micro-batches of 1 row


def train_and_prune(src: str, rank: int = 0, world: int = 1) -> dict:
    model = convert.load_model(src)
    cfg = model.config
    target = TargetShape(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                         intermediate_size=40)
    l0 = L0Module(cfg, target, warmup_steps=2)
    with torch.no_grad():  # spread gates: fractional samples and a mask pattern that training can move
        for z in l0.z.values():
            z.log_alpha.copy_(torch.linspace(-1.0, 3.0, z.log_alpha.numel()).view_as(z.log_alpha))
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    opt_l0 = torch.optim.AdamW(l0.parameters(), lr=0.1, weight_decay=0.0)  # no decay on lambda
    data = torch.randint(0, cfg.vocab_size, (STEPS, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    for step in range(STEPS):
        opt.zero_grad()
        opt_l0.zero_grad()
        lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world  # this rank's rows of the global batch
        for row in range(lo, hi, MICRO):
            x, y = data[step, row:row + MICRO, :-1], data[step, row:row + MICRO, 1:]
            masks = l0(mask_generator(0, step, row))  # keyed by the global row: the same on any world size
            # mean over the global batch's tokens; x world because FSDP averages the gradients over ranks
            (model(x, y, masks=masks, reduction="none").sum() * world / (BATCH * SEQ)).backward()
        l0.lagrangian(step).backward()
        l0.all_reduce_grads_()
        opt.step()
        opt_l0.step()
        l0.constrain_()
    refused = None
    if world > 1:  # the sharded state dict is refused with a clear message
        try:
            prune_state_dict(cfg, model.state_dict(), l0.deterministic_masks())
        except ValueError as e:
            refused = str(e)
    sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    new_cfg, pruned = prune_state_dict(cfg, sd, l0.deterministic_masks())
    return dict(config=asdict(new_cfg), state_dict=pruned, l0=l0.state_dict(), refused=refused)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    out = train_and_prune(sys.argv[1], dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        torch.save(out, sys.argv[2])
    dist.barrier()
    # exit without interpreter teardown: gloo's threads, destroyed at shutdown, occasionally aborted a rank
    # ("terminate called without an active exception") after all the work was done
    sys.stdout.flush()
    os._exit(0)
