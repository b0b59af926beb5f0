"""The pruning core under FSDP2: 2 gloo processes shard a tiny model, train a few masked steps, gather, prune, and
match one process.

    pytest -q tests/test_fsdp.py
"""

import os
import subprocess
import sys

import torch
from conftest import make_hf
from dist_prune import train_and_prune

HERE = os.path.dirname(os.path.abspath(__file__))


def test_fsdp2_two_processes_match_one(tmp_path):
    make_hf("llama_gqa", tmp_path / "src")  # GQA and tied embeddings
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        f"{HERE}/dist_prune.py", str(tmp_path / "src"), str(tmp_path / "two.pt")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    one = train_and_prune(str(tmp_path / "src"))
    assert "gather the sharded state dict first" in two["refused"]
    assert two["config"] == one["config"]
    assert two["config"]["hidden_size"] == 24 and two["config"]["num_key_value_heads"] == 1
    for k, v in one["l0"].items():  # the replicated L0 module took the same steps
        torch.testing.assert_close(two["l0"][k], v, atol=1e-5, rtol=1e-5, msg=k)
    assert two["state_dict"].keys() == one["state_dict"].keys()
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, atol=1e-5, rtol=1e-5, msg=k)
    # training moved the gates away from their start, so the comparison is not of untouched values
    start = torch.linspace(-1.0, 3.0, 48)
    assert (one["l0"]["z.hidden.log_alpha"] - start).abs().max() > 0.05


def test_teacher_reshards_and_masks_stay_fp32_under_bf16(tmp_path):
    make_hf("llama_gqa", tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        f"{HERE}/dist_checks.py", str(tmp_path / "src")], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
