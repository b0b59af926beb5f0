"""train.py end to end on a tiny random model and tiny synthetic domains (CPU, offline): prune -> compact -> cpt,
exports, exact resume (stopped, killed), 2 processes == 1, domain weights (faults: test_faults.py).

    pytest -q tests/test_train.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import convert
import report
import train

ROOT = Path(__file__).resolve().parents[1]


def weights(run):
    return load_file(str(Path(run) / "hf" / "model.safetensors"))


def metrics(run):
    return [json.loads(line) for line in open(Path(run) / "metrics.jsonl")]


def same_metrics(a, b, atol=0.0):
    ra, rb = metrics(a), metrics(b)
    assert [(r["stage"], r["step"]) for r in ra] == [(r["stage"], r["step"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            if k not in ("stage", "tokens_per_s", "dro/fit_seconds", "stage_seconds", "stage_tokens_per_s",
                         "peak_memory_gb"):
                assert abs(x[k] - y[k]) <= atol, (x["stage"], x["step"], k, x[k], y[k])


def test_end_to_end(setup, capsys):
    root, base, ref = setup
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(ref / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (24, 2, 3, 1, 40)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, convert.load_model(str(ref / "hf"))(idx),
                                   atol=1e-5, rtol=1e-5)
    pruned = transformers.AutoConfig.from_pretrained(ref / "pruned")
    assert (pruned.hidden_size, pruned.num_hidden_layers, pruned.num_key_value_heads) == (24, 2, 1)
    masks = torch.load(ref / "masks.pt")
    assert masks["masks"]["hidden_z"].sum() == 24 and masks["log_alpha"]["head"].shape == (3, 2)
    for p in ("weights", "val_loss", "sparsity"):
        assert (ref / "plots" / f"{p}.png").stat().st_size > 1000
    rows = metrics(ref)
    assert [r["step"] for r in rows if r["stage"] == "prune" and "val/easy" in r] == [0, 2, 4, 6]
    assert {"loss", "lr", "tokens_per_s", "expected_sparsity", "target_sparsity", "final_sparsity",
            "lambda_1_hidden", "train/hard"} <= rows[1].keys()
    last_eval = [r for r in rows if "val/easy" in r][-1]
    assert {"weight/hard", "reference_loss/mid"} <= last_eval.keys() and last_eval["stage"] == "cpt"
    ends = [r for r in rows if "stage_seconds" in r]  # one row per stage: time, throughput, memory, gates' gap
    assert [(r["stage"], r["step"], r["stage_tokens"]) for r in ends] == [("prune", 6, 6 * 4 * 32), ("cpt", 4, 4 * 4 * 32)]
    assert ends[0]["compaction_final_sparsity"] > ends[0]["compaction_expected_sparsity"] > 0
    assert json.loads((ref / "config.json").read_text())["prune_steps"] == 6
    ckpts = sorted(os.listdir(ref / "checkpoints"))
    assert ckpts == ["1-cpt-00000000", "1-cpt-00000002"]  # keep_checkpoints = 2
    capsys.readouterr()
    assert train.main(base + [f"--out_dir={ref}"]) == 0  # finished: says so, changes nothing
    assert "finished run" in capsys.readouterr().out


def test_stopped_and_resumed_is_exact(setup, tmp_path):
    root, base, ref = setup
    out = [f"--out_dir={tmp_path / 'run'}"]
    assert train.main(base + out + ["--stop_at=3"]) == 0  # in pruning, between checkpoints
    assert not (tmp_path / "run" / "done.json").exists()
    assert train.main(base + out + ["--stop_at=9"]) == 0  # in continued pretraining
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[-1] == "1-cpt-00000003"
    assert train.main(base + out) == 0
    a, b = weights(ref), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    same_metrics(ref, tmp_path / "run")


def test_killed_run_resumes(setup, tmp_path):
    root, base, ref = setup
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *base, f"--out_dir={run}", "--save_interval=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(run.glob("checkpoints/0-prune-*/state.pt")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "done.json").exists(), "the run finished before it could be killed"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed prune at step" in r.stdout
    a, b = weights(ref), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one_and_resume(setup, tmp_path):
    root, base, ref = setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *base,
           f"--out_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--stop_at=5"], []):  # sharded checkpoint in pruning, then resume it
        r = subprocess.run(cmd + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed prune at step 5" in r.stdout
    a, b = weights(ref), weights(tmp_path / "run")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    same_metrics(ref, tmp_path / "run", atol=1e-4)


def test_domain_weights_move_toward_the_harder_domain(setup, tmp_path):
    root, base, ref = setup
    out = tmp_path / "run"
    assert train.main(base + [f"--out_dir={out}", "--prune_steps=0", "--cpt_steps=8", "--reference_loss=3,3,3",
                              "--domain_proportions={'hard': 0.3, 'mid': 0.3, 'easy': 0.4}"]) == 0
    rows = [r for r in metrics(out) if "weight/hard" in r]
    first, last = rows[0], rows[-1]
    assert first["weight/hard"] == pytest.approx(0.3)
    # the uniform-token domain stays near ln 256 while the others get easier: it has the largest excess loss
    assert last["val/hard"] > max(last["val/easy"], last["val/mid"])
    assert last["weight/hard"] > 0.4 and last["weight/hard"] / 0.3 > max(last["weight/easy"] / 0.4,
                                                                         last["weight/mid"] / 0.3)
    assert not (out / "pruned").exists() and (out / "hf" / "config.json").exists()  # cpt only: no compaction


def test_shipped_configs_load():
    for name in ("prune_llama2", "prune_qwen2", "prune_pythia", "tiny"):
        cfg = train.load_config([str(ROOT / "config" / f"{name}.py")])
        assert cfg.prune_steps > 0
    llama = train.load_config([str(ROOT / "config" / "prune_llama2.py"), "--cpt_steps=0"])
    assert llama.target_hidden_size == 2560 and len(llama.reference_loss) == 7 and llama.cpt_steps == 0


def test_convert_exports_a_run_checkpoint(setup, tmp_path):
    root, base, ref = setup
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}", "--stop_at=4"]) == 0  # still pruning
    for run in (tmp_path / "run", ref):  # a pruning checkpoint is compacted with its current masks
        out = tmp_path / f"hf-{run.name}"
        r = subprocess.run([sys.executable, str(ROOT / "convert.py"), "to-hf", str(run), str(out)], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        hf = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert (hf.config.hidden_size, hf.config.num_hidden_layers, hf.config.num_key_value_heads) == (24, 2, 1)


def test_activation_checkpointing_changes_nothing(setup, tmp_path):
    root, base, ref = setup
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}", "--activation_checkpointing=true"]) == 0
    a, b = weights(ref), weights(tmp_path / "run")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)


KD = ["--distill_alpha=0.6", "--distill_temperature=2", "--distill_prune=true", "--reference_loss=teacher",
      "--mask_init=importance"]


def test_reference_loss_from_the_teacher_is_its_validation_loss(setup, tmp_path):
    from data import DomainBins
    root, base, ref = setup
    out = tmp_path / "run"
    assert train.main(base + [f"--out_dir={out}", "--prune_steps=0", "--cpt_steps=2", "--reference_loss=teacher"]) == 0
    first = next(r for r in metrics(out) if "reference_loss/easy" in r)
    teacher = convert.load_model(str(root / "model"))  # init_from: the source model
    measured = report.evaluate(teacher, DomainBins(root / "data"), 32, 4, 2)  # tiny.py's cpt_seq_len, eval batches
    assert [first[f"reference_loss/{d}"] for d in ("easy", "mid", "hard")] == pytest.approx(measured, abs=1e-9)


def test_distillation_resumes_exactly_and_two_processes_match(setup, tmp_path):
    # distillation in both stages, references from the teacher, importance init: stopped and resumed == one go,
    # bit for bit; 2 FSDP processes (teacher blocks sharded too) == 1
    root, base, ref = setup
    one, stopped = tmp_path / "one", tmp_path / "stopped"
    assert train.main(base + KD + [f"--out_dir={one}"]) == 0
    for extra in (["--stop_at=3"], ["--stop_at=8"], []):
        assert train.main(base + KD + [f"--out_dir={stopped}"] + extra) == 0
    a, b = weights(one), weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    same_metrics(one, stopped)
    rows = metrics(one)
    assert all("distill_loss" in r for r in rows if "loss" in r)  # distilled in both stages
    assert not any(torch.equal(a[k], weights(ref)[k]) for k in a if k.endswith("proj.weight"))  # not the plain run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *base, *KD,
           f"--out_dir={tmp_path / 'two'}"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    c = weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=2e-5, rtol=2e-5, msg=k)
