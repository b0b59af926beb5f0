"""train.py end to end on a tiny random model and tiny synthetic domains (CPU, offline): prune -> compact -> cpt,
exports, exact resume (stopped, killed), 2 processes == 1, domain weights (faults: test_faults.py).

    pytest -q tests/test_train.py
"""

import json
import os
import signal
import subprocess
import sys
import types
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
            if k not in ("stage", "tokens_per_s", "dro/fit_seconds", "stage_seconds", "stage_wall_seconds",
                         "stage_tokens_per_s", "peak_memory_gb"):
                # (atol is relative for large values, e.g. expected_num_params: fp32 rounding)
                assert abs(x[k] - y[k]) <= atol * max(1.0, abs(x[k])), (x["stage"], x["step"], k, x[k], y[k])


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
    assert (masks["masks"]["hidden_z"] != 0).sum() == 24 and masks["log_alpha"]["head"].shape == (3, 2)
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
    assert ends[0]["compaction_final_sparsity"] == pytest.approx(ends[0]["compaction_expected_sparsity"])  # landed
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


# the GPU settings, which change no number: torch.compile'd blocks, HSDP (2 replicas of 1 shard), weights kept
# gathered between forward and backward, one gradient reduce-scatter a step, every other block recomputed
FAST = ["--compile=true", "--dp_replicate=2", *(f"--{s}_{k}" for s in ("prune", "cpt") for k in (
    "reshard_after_forward=false", "defer_grad_sync=true", "activation_checkpointing=2"))]


@pytest.mark.parametrize("options", [[], FAST], ids=["fsdp", "gpu-settings"])
def test_two_processes_match_one_and_resume(setup, tmp_path, options):
    # 2 processes, stopped in pruning and resumed: the 1-process eager run within fp32 rounding; with the GPU
    # settings on, also an uninterrupted 2-process run with them, bit for bit
    root, base, ref = setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *base,
           *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [(tmp_path / "run", ["--stop_at=5"]), (tmp_path / "run", [])] + ([(tmp_path / "one", [])] if options else [])
    for out, extra in runs:  # a sharded checkpoint in pruning, then resumed from it
        r = subprocess.run(cmd + [f"--out_dir={out}", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        if out.name == "run" and not extra:
            assert "resumed prune at step 5" in r.stdout
    a, b = weights(ref), weights(tmp_path / "run")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    same_metrics(ref, tmp_path / "run", atol=1e-4)
    if options:
        c = weights(tmp_path / "one")
        assert all(torch.equal(b[k], c[k]) for k in a)


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


def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch):
    cfg, cpu = train.TrainConfig(), torch.device("cpu")
    for avx512_bf16, amx, want in ((False, False, torch.float32), (True, False, torch.bfloat16),
                                   (False, True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert train.compute_dtype(cfg, cpu) == want
        assert train.compute_dtype(train.TrainConfig(dtype="float32"), cpu) == torch.float32
    assert train.compute_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    assert train.load_config([str(ROOT / "config" / "tiny.py")]).dtype == "float32"  # the tests' exact comparisons


def test_eval_says_its_sequences_and_matches_report_on_the_same_ones(setup, capsys):
    root, base, ref = setup
    c = json.loads((ref / "config.json").read_text())
    capsys.readouterr()
    assert train.main(["report", str(ref)]) == 0
    rep = capsys.readouterr().out
    assert f"{c['eval_batches']} x {c['eval_batch_size']} sequences of {c['cpt_seq_len']} tokens per domain" in rep
    assert train.main(["eval", str(ref / "hf"), f"--data_dir={root / 'data'}", f"--seq_len={c['cpt_seq_len']}",
                       f"--batch_size={c['eval_batch_size']}", f"--batches={c['eval_batches']}"]) == 0
    ev = capsys.readouterr().out
    assert f"{c['eval_batches']} x {c['eval_batch_size']} sequences of {c['cpt_seq_len']} tokens per domain" in ev
    row = lambda text, name: next(ln for ln in text.splitlines() if ln.startswith(name)).split()[1:]  # noqa: E731
    assert row(rep, "final") == row(ev, str(ref / "hf"))


def test_tensorboard_gets_the_numbers(setup, tmp_path, monkeypatch, capsys):
    root, base, ref = setup
    scalars = []

    class SummaryWriter:  # the interface train.py uses, in place of the optional package
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}", f"--tensorboard_dir={tmp_path / 'tb'}"]) == 0
    tags = {t for t, _, _ in scalars}
    assert {"loss", "val/easy", "weight/hard", "expected_sparsity", "stage_seconds"} <= tags
    loss = [(step, v) for t, v, step in scalars if t == "loss"]
    rows = [(r["iter"], r["loss"]) for r in metrics(tmp_path / "run") if "loss" in r]
    assert loss == rows  # every logged step, at the run's step
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed: one line, the run goes on
    assert train.main(base + [f"--out_dir={tmp_path / 'run2'}", "--tensorboard_dir=tb", "--stop_at=1"]) == 0
    assert "tensorboard is not installed (pip install tensorboard)" in capsys.readouterr().out


def test_a_budget_replaces_an_earlier_shape():
    # the target is one setting: --target_params on top of a config's shape replaces it, and the other way round
    demo = str(ROOT / "config" / "demo.py")
    cfg = train.load_config([demo, "--target_params=0.5"])
    assert cfg.target_params == 0.5 and cfg.target_hidden_size == cfg.target_intermediate_size == 0
    cfg = train.load_config([demo, "--target_params=0.5", "--target_hidden_size=384"])
    assert cfg.target_params == 0 and cfg.target_hidden_size == 384 and cfg.target_num_hidden_layers == 0
    assert train.load_config([demo]).target_hidden_size == 480


def test_convert_exports_a_run_checkpoint(setup, tmp_path):
    root, base, ref = setup
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}", "--stop_at=4"]) == 0  # still pruning
    for run in (tmp_path / "run", ref):  # a pruning checkpoint is compacted with its current masks
        out = tmp_path / f"hf-{run.name}"
        r = subprocess.run([sys.executable, str(ROOT / "convert.py"), "to-hf", str(run), str(out)], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr, r.stderr  # (no DCP warning either)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert (hf.config.hidden_size, hf.config.num_hidden_layers, hf.config.num_key_value_heads) == (24, 2, 1)
    # a finished run: its final weights (hf/), which no checkpoint holds
    final, exported = load_file(str(ref / "hf" / "model.safetensors")), load_file(str(tmp_path / "hf-ref" /
                                                                                     "model.safetensors"))
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)


def test_activation_checkpointing_changes_nothing(setup, tmp_path):
    root, base, ref = setup  # every block while pruning, every other one (the first of two) in continued pretraining
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}", "--prune_activation_checkpointing=1",
                              "--cpt_activation_checkpointing=2"]) == 0
    a, b = weights(ref), weights(tmp_path / "run")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)


def test_compiled_training_is_one_graph_per_stage(setup, tmp_path):
    # compiled blocks (the GPU default) through importance init, checkpointing, distillation and evaluation: one
    # graph serves every block of a stage (FSDP2's and the importance hooks stay outside it, evaluation runs
    # eagerly), so a 32-layer model stays far below dynamo's recompile limit, past which it would run eagerly
    from torch._dynamo.utils import counters
    root, base, ref = setup
    counters.clear()
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}", "--compile=true", "--mask_init=importance",
                              "--prune_activation_checkpointing=1", "--distill_alpha=0.5"]) == 0
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # prune, cpt


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


def test_the_teacher_is_freed_once_no_stage_needs_it(setup, tmp_path, monkeypatch):
    # references from the teacher without distillation: measured where each stage starts, so the teacher is kept
    # through pruning and dropped when the last stage has measured its own; distilling keeps it to the end
    root, base, ref = setup
    seen, start = [], train.start_stage

    def spy(run, stage, model, resume):
        st = start(run, stage, model, resume)
        seen.append((stage.name, run.teacher is not None))
        return st
    monkeypatch.setattr(train, "start_stage", spy)
    assert train.main(base + [f"--out_dir={tmp_path / 'ref'}", "--reference_loss=teacher"]) == 0
    assert seen == [("prune", True), ("cpt", False)]
    assert all("reference_loss/easy" in r for r in metrics(tmp_path / "ref") if r.get("step") == 0)
    seen.clear()
    assert train.main(base + [f"--out_dir={tmp_path / 'kd'}", "--reference_loss=teacher", "--distill_alpha=0.5"]) == 0
    assert seen == [("prune", True), ("cpt", True)]


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


# -----------------------------------------------------------------------------
# landing on the target, one-shot pruning, the from-scratch control

def val(rows, stage, which):
    ev = [r for r in rows if r["stage"] == stage and "val/easy" in r]
    return {d: ev[which][f"val/{d}"] for d in ("easy", "mid", "hard")}


def test_landing_puts_every_mask_on_its_target(setup, tmp_path):
    """The tiny run lands (prune_landing=0.1: its last step): every mask's expected sparsity is its target at
    compaction, and the compacted model's first validation losses are the pruning stage's last (the same masks, soft
    values folded into the weights). Without the landing, the same run misses and the losses jump."""
    root, base, ref = setup
    for run, landed in ((ref, True), (tmp_path / "off", False)):
        if not landed:
            assert train.main(base + [f"--out_dir={run}", "--prune_landing=0", "--cpt_steps=1"]) == 0
        rows = metrics(run)
        end = next(r for r in rows if "compaction_final_sparsity" in r)
        gaps = [v for k, v in end.items() if k.startswith("compaction_") and k.endswith("_gap")]
        assert len(gaps) == 4
        jump = max(abs(a - b) for a, b in zip(val(rows, "prune", -1).values(), val(rows, "cpt", 0).values()))
        if landed:
            assert max(map(abs, gaps)) < 1e-6 and jump < 1e-4, (gaps, jump)
        else:
            assert max(map(abs, gaps)) > 0.1 and jump > 1e-3, (gaps, jump)


def test_gradient_clipping_is_one_norm_over_model_masks_and_lambdas():
    from l0 import L0Module, TargetShape
    from model import ModelConfig
    cfg = ModelConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    l0 = L0Module(cfg, TargetShape(8, 1, 1, 1, 16))
    model = torch.nn.Linear(3, 4)
    g = torch.Generator().manual_seed(0)
    for p in [*model.parameters(), *l0.parameters()]:
        p.grad = torch.randn(p.shape, generator=g)
    norm = lambda ps: torch.sqrt(sum((p.grad ** 2).sum() for p in ps))  # noqa: E731

    def clip(model, l0, max_norm):  # as train_step: the parts' norms on the device, then to the host, then clip
        grads, norms = train.grad_norms(model, l0)
        return train.clip_(grads, [float(n) for n in norms], max_norm)
    total = float(norm([*model.parameters(), *l0.parameters()]))
    assert clip(model, l0, 1.0) == pytest.approx(total, rel=1e-6)
    assert float(norm([*model.parameters(), *l0.parameters()])) == pytest.approx(1.0, rel=1e-5)
    assert clip(model, None, 0.0) == pytest.approx(float(norm(model.parameters())), rel=1e-6)


def test_one_shot_pruning_compacts_by_importance_resumes_and_exports(setup, tmp_path):
    """prune_steps=0 with mask_init=importance: the importance ranking alone picks the units (binary kept values,
    the largest log_alpha of each row), then continued pretraining; stopped and resumed == one go; HF loads it."""
    root, base, ref = setup
    args = base + ["--prune_steps=0", "--mask_init=importance"]
    one, stopped = tmp_path / "one", tmp_path / "stopped"
    assert train.main(args + [f"--out_dir={one}"]) == 0
    m = torch.load(one / "masks.pt")
    for name, la in m["log_alpha"].items():
        z = m["masks"][f"{name}_z"].reshape(-1, la.shape[-1])
        la = la.reshape(z.shape)
        assert set(z.unique().tolist()) == {0.0, 1.0}
        assert all(la[i][z[i] == 1].min() >= la[i][z[i] == 0].max() for i in range(len(z)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(one / "hf")
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size) == (24, 2, 1, 40)
    assert [(r["stage"], r["step"]) for r in metrics(one) if "stage_seconds" in r] == [("prune", 0), ("cpt", 4)]
    for extra in (["--stop_at=2"], []):
        assert train.main(args + [f"--out_dir={stopped}"] + extra) == 0
    a, b = weights(one), weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    same_metrics(one, stopped)


def test_from_scratch_control(setup, tmp_path):
    """from_scratch: the target shape of the source's family, initialised as Hugging Face initialises it (a Linear's
    weights N(0, initializer_range), norms 1, biases 0), trained on the same data; resumes exactly; HF loads it."""
    from model import Transformer
    root, base, ref = setup
    args = base + ["--prune_steps=0", "--from_scratch=true"]
    one, stopped = tmp_path / "one", tmp_path / "stopped"
    assert train.main(args + [f"--out_dir={one}"]) == 0
    c = transformers.AutoConfig.from_pretrained(one / "hf")
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size) == (24, 2, 1, 40)
    assert not (one / "pruned").exists()
    for extra in (["--stop_at=2"], []):
        assert train.main(args + [f"--out_dir={stopped}"] + extra) == 0
    a, b = weights(one), weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the init against transformers' own for the same config
    src = convert.load_model(str(root / "model"))
    small = train.replace(src.config, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                          head_dim=src.config.head_dim)
    ours = Transformer(small).init_weights(torch.Generator().manual_seed(0)).state_dict()
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**small.to_hf())).state_dict()
    std = small.extra.get("initializer_range", 0.02)
    for k, v in theirs.items():
        w = ours[k]
        if "norm" in k:
            assert torch.equal(w, torch.ones_like(w)) and torch.equal(v, torch.ones_like(v)), k
        else:
            assert abs(w.std() / std - 1) < 0.1 and abs(v.std() / std - 1) < 0.1 and abs(w.mean()) < 0.01, k
