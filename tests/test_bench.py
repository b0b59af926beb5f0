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


def test_quality_sweep_on_the_tiny_model(setup, tmp_path):
    # the recovery sweep end to end on the test model: runs, scores, tokens-to-baseline, tables, plot
    from conftest import TARGET
    root, base, ref = setup
    text = run("bench/quality.py", "--sweep", "recovery", "--only", "ce,kd+teacher+importance", "--seeds", "1",
               "--config", "config/tiny.py", "--model", str(root / "model"), "--data_dir", str(root / "data"),
               "--prune_steps", "4", "--cpt_steps", "4", "--eval_interval", "2", "--save_interval", "2",
               "--extra", " ".join(TARGET + ["--reference_loss=1,2,5"]),
               "--seq_len", "32", "--batch_size", "4", "--batches", "2", "--tasks", "",  # (no tokenizer here)
               "--out", str(tmp_path / "q"), "--results", str(tmp_path / "res"), "--plot", str(tmp_path / "q.png"))
    res = json.loads((tmp_path / "res" / "quality-recovery.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["ce", "kd+teacher+importance"]
    assert res["variants"]["kd+teacher+importance"] == ["--distill_alpha=1.0", "--reference_loss=teacher",
                                                         "--mask_init=importance"]
    ce = res["runs"][0]
    assert ce["cpt_tokens_to_baseline"] == ce["cpt_curve"][-1][0]  # the baseline reaches its own final loss last
    assert "tokens to reach ce's final mean" in text and (tmp_path / "q-recovery.png").stat().st_size > 1000
