"""train.py end to end on a tiny random model and tiny synthetic domains (CPU, offline): prune -> compact -> cpt,
exports, exact resume (stopped, killed), 2 processes == 1, domain weights, config errors.

    pytest -q tests/test_train.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import make_hf
from safetensors.torch import load_file

import train
from model import Transformer

ROOT = Path(__file__).resolve().parents[1]
TARGET = ["--target_hidden_size=24", "--target_num_hidden_layers=2", "--target_num_key_value_heads=1",
          "--target_intermediate_size=40"]


def make_data(path: Path, V: int = 256):
    """Three domains of different difficulty: a repeated ramp (easy), 32 symbols (mid), all 256 (hard)."""
    rng = np.random.default_rng(0)
    doms = {"easy": np.tile(np.arange(64), 400), "mid": rng.integers(0, 32, 20000), "hard": rng.integers(0, V, 20000)}
    domains = []
    for name, toks in doms.items():
        (path / name).mkdir(parents=True)
        toks = toks.astype(np.uint16)
        toks[:-2000].tofile(path / name / "train.bin")
        toks[-2000:].tofile(path / name / "val.bin")
        domains.append({"name": name, "source": "synthetic", "text_bytes": 0,
                        "train": {"docs": 1, "tokens": len(toks) - 2000}, "val": {"docs": 1, "tokens": 2000}})
    (path / "meta.json").write_text(json.dumps({
        "format": 1, "dtype": "uint16", "vocab_size": V, "bos_id": None, "eos_id": 0, "add_bos": False,
        "tokenizer_fingerprint": "sha256:test", "domains": domains, "settings": {}}))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_hf("llama_gqa", root / "model")  # GQA (6 query / 2 key-value heads), tied embeddings
    make_data(root / "data")
    base = ["config/tiny.py", f"--init_from={root / 'model'}", f"--data_dir={root / 'data'}", *TARGET,
            "--reference_loss=1,2,5"]
    ref = root / "ref"
    assert train.main(base + [f"--out_dir={ref}"]) == 0  # the uninterrupted 1-process run, shared by the tests
    return root, base, ref


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
        torch.testing.assert_close(hf.eval()(idx).logits, Transformer.from_pretrained(str(ref / "hf"))(idx),
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


@pytest.mark.parametrize("args,msg", [
    (["--prune_lrr=1"], "unknown config key 'prune_lrr'; did you mean 'prune_lr'?"),
    (["--prune_steps=abc"], "--prune_steps=abc: expected a number (int)"),
    (["--prune_steps=0", "--cpt_steps=0"], "nothing to do"),
    (["--domain_weighting=dro+fast"], "unknown option in method"),
    (["--reference_loss=1,2"], "need one value per domain"),
    (["--reference_loss={'easy': 1, 'mid': 2, 'hrad': 3}"], "reference_loss names ['easy', 'hrad', 'mid'] but"),
    (["--target_num_key_value_heads=3"], "target_num_key_value_heads=3 must be in [1, 2]"),
    (["--target_hidden_size=25"], "target shape: a LLaMA config needs hidden_size divisible by num_attention_heads"),
    (["--prune_micro_batch_size=3"], "prune_batch_size=4 must be a multiple of world size 1 x prune_micro_batch_size=3"),
    (["--init_from=/nonexistent/model"], "/nonexistent/model"),
    (["--cpt_seq_len=30000"], "cpt stage: domain 'easy' has 23600 training tokens, fewer than seq_len+1 = 30001"),
    (["--data_dir=/nonexistent/data"], "no dataset at /nonexistent/data"),
])
def test_bad_configs_fail_with_one_line(setup, tmp_path, capsys, args, msg):
    root, base, ref = setup
    code = train.main(base + [f"--out_dir={tmp_path / 'run'}"] + args)
    err = capsys.readouterr().err.strip()
    assert code != 0 and msg in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("run/checkpoints/*"))


def test_other_config_in_out_dir_is_refused(setup, tmp_path, capsys):
    root, base, ref = setup
    out = [f"--out_dir={tmp_path / 'run'}", "--stop_at=2"]
    assert train.main(base + out) == 0
    assert train.main(base + out + ["--prune_lr=0.5", "--seed=3"]) == 2
    assert "another config (prune_lr, seed differ)" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "0-prune-00000002" / "state.pt").exists()  # untouched
    assert train.main(base + out + ["--prune_lr=0.5", "--overwrite=true"]) == 0  # asked to start over


def test_out_dir_in_use_is_refused(setup, tmp_path, capsys):
    # a second run on the same out_dir while the first holds its lock: refused, nothing touched
    import fcntl
    root, base, ref = setup
    out = [f"--out_dir={tmp_path / 'run'}", "--stop_at=2"]
    assert train.main(base + out) == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with open(tmp_path / "run" / ".lock", "a+") as f:  # as a running train.py holds it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert train.main(base + [f"--out_dir={tmp_path / 'run'}", "--stop_at=4"]) == 2
        assert "is in use by another train.py run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}", "--stop_at=4"]) == 0  # released: it resumes


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


def test_nan_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch, capsys):
    root, base, ref = setup
    forward, calls = Transformer.forward, []

    def poisoned(self, idx, targets=None, masks=None, reduction="mean"):
        out = forward(self, idx, targets, masks, reduction)
        calls.append(torch.is_grad_enabled())
        return out * float("nan") if sum(calls) > 12 else out  # from the 4th training step (4 micro-batches each)

    monkeypatch.setattr(Transformer, "forward", poisoned)
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "prune step 3: the training loss is nan" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["0-prune-00000002"]
    assert not (tmp_path / "run" / "done.json").exists()
