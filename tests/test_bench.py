"""The benchmark scripts run (on tiny shapes, CPU): their figures are measured by hand, not asserted here."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_speed_rows(tmp_path):
    out = tmp_path / "speed.json"
    text = run("bench/speed.py", "--shapes", "tiny", "--batch", "2", "--seq", "16", "--reps", "2",
               "--rows", "train,adamw,prune,compact", "--matmul_size", "64", "--out", str(out))
    res = json.loads(out.read_text())
    rows = {r["group"]: r for r in res["rows"]}
    assert set(rows) == {"train", "adamw", "prune", "compact"}
    assert rows["train"]["ratio"] > 0 and "ours / transformers" in text and rows["adamw"]["ratio"] > 0
    assert 0 < rows["prune"]["roofline"]["prune/dense"] and rows["prune"]["ratio"] > 0
    assert rows["compact"]["weight_ratio"] > 1
    assert all(v > 0 for v in rows["train"]["peak_memory_gb"].values())  # from the memory probes
    assert len(rows["train"]["seconds_each"]["train/ours"]) == 2


def test_gpu_script_code_path_on_cpu():
    # bench/gpu.py is meant for GPUs; --device cpu --smoke runs its FSDP2 + masks + optimizer path on a tiny model
    text = run("bench/gpu.py", "--device", "cpu", "--smoke")
    assert "stage prune" in text and "stage cpt" in text and "error" not in text
