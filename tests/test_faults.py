"""The fault suite: bad input, interruptions and damaged files across prepare.py, train.py and convert.py.

Every case expects a non-zero exit, one line on stderr that names the problem and the fix, no traceback, and every
earlier good output unchanged (compared by hash); interrupted or failed runs, run again, end with the same weights as
the uninterrupted run.

    pytest -q tests/test_faults.py
"""

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import killed_after_rename, make_hf
from safetensors.torch import load_file
from test_data import make_tokenizer, run_prepare, write_sources

import convert
import report
import train
from checkpoint import RunDir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def tree(path) -> dict:
    """{relative path: sha256} of every file under path (the lock file aside): 'unchanged' means equal trees."""
    path = Path(path)
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"} if path.exists() else {}


def one_line(err: str, *needles) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def weights(run):
    return load_file(str(Path(run) / "hf" / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def flip_byte(path: Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def train_cli(base, out, *extra, preexec=None, timeout=300):
    cmd = [sys.executable, str(ROOT / "train.py"), *base, f"--out_dir={out}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)


@pytest.fixture(scope="module")
def stopped(setup, tmp_path_factory):
    """A good run stopped at step 4 (checkpoints at steps 2 and 4): the out_dir the out_dir faults must not touch."""
    root, base, ref = setup
    run = tmp_path_factory.mktemp("faults") / "stopped"
    assert train.main(base + [f"--out_dir={run}", "--stop_at=4"]) == 0
    return run


# -----------------------------------------------------------------------------
# train.py: bad configs, data and models, each with a fresh out_dir; inputs unchanged, no checkpoint written

def _config_file(text):
    def make(root, tmp):
        (tmp / "c.py").write_text(text)
        return [str(tmp / "c.py")]
    return make


def _damaged(name, key, edit):
    """A copy of the fixture's `name` directory, damaged by edit(copy), passed as --key."""
    def make(root, tmp):
        shutil.copytree(root / name, tmp / name)
        edit(tmp / name)
        return [f"--{key}={tmp / name}"]
    return make


def _data(edit):
    return _damaged("data", "data_dir", edit)


def _model(edit):
    return _damaged("model", "init_from", edit)


def _meta(change):
    def edit(d):
        meta = json.loads((d / "meta.json").read_text())
        change(meta)
        (d / "meta.json").write_text(json.dumps(meta))
    return edit


def _poke(path: Path, index: int, token: int):  # one uint16 token id, deep in a bin (a batch hours into a run)
    data = bytearray(path.read_bytes())
    data[2 * index:2 * index + 2] = token.to_bytes(2, "little")
    path.write_bytes(bytes(data))


def _neox(root, tmp):  # GPT-NeoX: 3 heads x 16 = hidden 48; 2 heads need hidden 32
    make_hf("neox_sequential", tmp / "neox")
    return [f"--init_from={tmp / 'neox'}", "--target_num_key_value_heads=2", "--target_hidden_size=40"]


def _gguf(damage, dtype="float32"):
    def make(root, tmp):
        import transformers
        from test_model import write_gguf
        write_gguf(transformers.AutoModelForCausalLM.from_pretrained(root / "model"), tmp / "m.gguf", dtype=dtype)
        damage(tmp / "m.gguf")
        return [f"--init_from={tmp / 'm.gguf'}"]
    return make


def _gpt2(root, tmp):
    import transformers
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "gpt2")
    return [f"--init_from={tmp / 'gpt2'}"]


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


TRAIN_CASES = {
    "key_typo": (["--prune_lrr=1"], "unknown config key 'prune_lrr'; did you mean 'prune_lr'?"),
    "key_typo_in_file": (_config_file("prune_steps = 6\ncpt_stpes = 4\n"),
                         "unknown config key 'cpt_stpes'; did you mean 'cpt_steps'?"),
    "config_file_missing": (["config/no_such.py"], "config file config/no_such.py not found"),
    "config_file_syntax": (_config_file("prune_steps = = 3\n"), "SyntaxError"),
    "int_type": (["--prune_steps=abc"], "--prune_steps=abc: expected a number (int)"),
    "float_type_in_file": (_config_file("prune_lr = 'fast'\n"), "prune_lr='fast': expected float"),
    "bool_type": (["--overwrite=maybe"], "--overwrite=maybe: expected true or false"),
    "no_equals": (["--prune_steps"], "--prune_steps: write --key=value"),
    "negative_steps": (["--cpt_steps=-1"], "cpt_steps=-1 must be >= 0"),
    "nothing_to_do": (["--prune_steps=0", "--cpt_steps=0"], "nothing to do"),
    "unknown_weighting": (["--domain_weighting=dro+fast"], "unknown option in method"),
    "proportions_sum": (["--domain_proportions=0.3,0.3,0.3"], "must be >= 0 and sum to 1 (they sum to 0.9)"),
    "proportions_negative": (["--domain_proportions=1.2,-0.1,-0.1"], "must be >= 0 and sum to 1"),
    "proportions_length": (["--domain_proportions=0.5,0.5"], "domain_proportions has 2 values but"),
    "proportions_names": (["--domain_proportions={'easy': 0.5, 'mid': 0.25, 'hrad': 0.25}"],
                          "domain_proportions names ['easy', 'hrad', 'mid'] but"),
    "reference_length": (["--reference_loss=1,2"], "need one value per domain"),
    "reference_names": (["--reference_loss={'easy': 1, 'mid': 2, 'hrad': 3}"],
                        "reference_loss names ['easy', 'hrad', 'mid'] but"),
    "reference_negative": (["--reference_loss=1,-2,5"], "every value must be a positive finite loss"),
    "target_hidden_too_large": (["--target_hidden_size=96"], "hidden_size=96 must be an integer in [1, 48]"),
    "target_layers_too_large": (["--target_num_hidden_layers=4"], "num_hidden_layers=4 must be an integer in [1, 3]"),
    "target_groups_too_large": (["--target_num_key_value_heads=3"], "target_num_key_value_heads=3 must be in [1, 2]"),
    "target_mlp_too_large": (["--target_intermediate_size=81"], "intermediate_size=81 must be an integer in [1, 80]"),
    "llama_hidden_not_divisible": (["--target_hidden_size=25"], "hidden_size divisible by num_attention_heads"),
    "neox_heads_times_head_dim": (_neox, "target shape"),
    "micro_batch": (["--prune_micro_batch_size=3"], "prune_batch_size=4 must be a multiple of world size 1"),
    "seq_len_beyond_data": (["--cpt_seq_len=30000"], "cpt stage: domain 'easy' has 23600 training tokens"),
    "data_missing": (["--data_dir=/nonexistent/data"], "no dataset at /nonexistent/data"),
    "data_meta_corrupted": (_data(lambda d: (d / "meta.json").write_text("{not json")), "meta.json is corrupted"),
    "data_meta_field_missing": (_data(_meta(lambda m: m.pop("vocab_size"))), "meta.json is corrupted (KeyError"),
    "data_bin_missing": (_data(lambda d: (d / "mid" / "train.bin").unlink()), "mid/train.bin is missing"),
    "data_bin_truncated": (_data(lambda d: _truncate(d / "hard" / "val.bin")), "hard/val.bin holds 2000 bytes but"),
    "data_ids_beyond_the_vocab": (_data(lambda d: _poke(d / "hard" / "train.bin", 5000, 300)),
                                  "holds token id 300, beyond the 256-token vocabulary"),
    "data_larger_vocab": (_data(_meta(lambda m: m.update(vocab_size=300))),
                          "tokenized with a 300-token vocabulary but the model has 256 embeddings"),
    "data_other_tokenizer": (_model(lambda m: (m / "tokenizer.json").write_text('{"model": {"vocab": {}}}')),
                             "was tokenized with another tokenizer"),
    "model_missing": (["--init_from=/nonexistent/model"], "/nonexistent/model"),
    "model_config_corrupted": (_model(lambda m: (m / "config.json").write_text("{")), "config.json"),
    "model_weights_truncated": (_model(lambda m: _truncate(m / "model.safetensors")), "truncated or corrupted"),
    "model_weights_garbage": (_model(lambda m: (m / "model.safetensors").write_bytes(os.urandom(4096))),
                              "not a readable safetensors file"),
    "gguf_truncated": (_gguf(lambda p: _truncate(p, 0.75)), "truncated or corrupted"),
    "gguf_f64_tensors": (_gguf(lambda p: None, dtype="float64"), "of GGUF type F64, which the gguf package cannot"),
    "gguf_garbage": (_gguf(lambda p: p.write_bytes(b"GGUF" + os.urandom(2000))),
                     "m.gguf is not a readable GGUF file"),
    "model_no_weights": (_model(lambda m: (m / "model.safetensors").unlink()), "has no *.safetensors"),
    "out_dir_unwritable": (["--out_dir=/proc/drpruning-run"], "cannot write in out_dir=/proc/drpruning-run"),
    "model_unsupported_family": (_gpt2, "model_type 'gpt2' is not supported; expected one of"),
    "distill_alpha_out_of_range": (["--distill_alpha=1.5"], "distill_alpha=1.5 must be in [0, 1]"),
    "mask_init_unknown": (["--mask_init=random"], "mask_init='random': choose one of uniform, importance"),
    "mask_values_unknown": (["--mask_values=half"], "mask_values='half': choose one of soft, binary"),
    "landing_out_of_range": (["--prune_landing=1.5"], "prune_landing=1.5 must be in [0, 1]"),
    "scratch_while_pruning": (["--from_scratch=true"], "from_scratch trains the target shape directly: set prune_steps=0"),
    "budget_and_shape": (_config_file("target_params = 0.5\ntarget_hidden_size = 24\n"),
                         "give either target_params or the target_* shape fields, not both, in one config file"),
    "budget_too_small": (["--target_params=0.01"], "target_params=0.01 asks for 840 parameters, but"),
    "budget_beyond_the_model": (["--target_params=2e6"], "asks for 2,000,000 parameters, but a parameter budget for"),
    "budget_of_the_source": (["--target_params=0.9999"], "rounds to the source's own shape: nothing to prune"),
    "teacher_missing": (["--distill_alpha=0.5", "--teacher=/nonexistent/teacher"], "/nonexistent/teacher"),
    "reference_word": (["--reference_loss=source"], "expected comma-separated numbers"),
    "out_dir_is_a_file": (lambda root, tmp: (tmp / "run").write_text("x") and [], "is not a directory"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_bad_input(case, setup, tmp_path, capsys):
    root, base, ref = setup
    args, msg = TRAIN_CASES[case]
    inputs = {p: tree(root / p) for p in ("model", "data")}
    if callable(args):
        args = args(root, tmp_path)
    capsys.readouterr()
    code = train.main(base + [f"--out_dir={tmp_path / 'run'}"] + args)
    assert code != 0
    one_line(capsys.readouterr().err, "train.py: error: ", msg)
    assert not list(tmp_path.glob("run/checkpoints/*")) and not (tmp_path / "run" / "hf").exists()
    assert {p: tree(root / p) for p in inputs} == inputs
    if case == "out_dir_is_a_file":
        assert (tmp_path / "run").read_text() == "x"


def test_ctrl_c_keeps_the_checkpoints(setup, stopped, tmp_path, monkeypatch, capsys):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    before = tree(run / "checkpoints")

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "evaluate", interrupted)  # Ctrl-C at the first evaluation after resuming
    assert train.main(base + [f"--out_dir={run}"]) == 130
    one_line(capsys.readouterr().err, "train.py: interrupted; checkpoint 0-prune-00000004 is intact",
             "run the same command again")
    assert tree(run / "checkpoints") == before


def test_gates_far_from_the_target_are_named_before_compaction(setup, tmp_path, capsys):
    # six steps from uniform gates: the Lagrangian is nowhere near the target when compaction (or the landing) acts
    root, base, ref = setup
    assert train.main(base + [f"--out_dir={tmp_path / 'a'}", "--prune_landing=0", "--cpt_steps=0"]) == 0
    out = capsys.readouterr().out
    assert "warning: when compaction the gates' expected sparsity is 0.0" in out and "target 0.833" in out
    assert "mask_init=importance" in out and "lambda_lr" in out
    assert train.main(base + [f"--out_dir={tmp_path / 'b'}", "--cpt_steps=0"]) == 0  # the default landing
    assert "warning: when the landing begins" in capsys.readouterr().out
    # from the importance ranking, landing on it is the design (config/demo.py): no warning
    assert train.main(base + [f"--out_dir={tmp_path / 'c'}", "--mask_init=importance", "--cpt_steps=0"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_failed_start_does_not_block_the_corrected_command(setup, tmp_path, capsys):
    # an attempt that saved no checkpoint is not a run to protect: the corrected command starts, no --overwrite
    root, base, ref = setup
    out = [f"--out_dir={tmp_path / 'run'}"]
    assert train.main(base + out + ["--target_hidden_size=25"]) == 2
    assert train.main(base + out + ["--stop_at=2"]) == 0
    assert "another config" not in capsys.readouterr().err


# -----------------------------------------------------------------------------
# train.py: an out_dir holding a run

def test_other_config_is_refused_listing_the_keys(setup, stopped, tmp_path, capsys):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    before = tree(run)
    assert train.main(base + [f"--out_dir={run}", "--prune_lr=0.5", "--seed=3"]) == 2
    one_line(capsys.readouterr().err, "another config (prune_lr, seed differ)", "--allow_changes=prune_lr,seed",
             "--overwrite=true")
    assert tree(run) == before
    # seed is what the checkpoint's data order follows from: not even allowed explicitly
    assert train.main(base + [f"--out_dir={run}", "--seed=3", "--allow_changes=seed"]) == 2
    one_line(capsys.readouterr().err, "seed cannot change when resuming")
    assert tree(run) == before


def test_resume_where_auto_precision_differs_is_refused(setup, stopped, tmp_path, capsys, monkeypatch):
    # config.json records what dtype=auto resolved to (the stopped run: float32), so a CPU with native bf16 refuses
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    before = tree(run)
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert train.main(base + [f"--out_dir={run}", "--dtype=auto"]) == 2
    one_line(capsys.readouterr().err, "another config (dtype differ)", "--allow_changes=dtype")
    assert tree(run) == before
    monkeypatch.setattr(train, "native_bf16", lambda device: False)  # where auto is float32, as recorded: resumes
    assert train.main(base + [f"--out_dir={run}", "--dtype=auto"]) == 0
    assert json.loads((run / "config.json").read_text())["dtype"] == "float32"


def test_resumed_past_a_shortened_stage_goes_on_to_the_next(setup, stopped, tmp_path):
    # stopped at prune step 4; prune_steps lowered to 3 on resume: the stage is over, compaction and cpt follow
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    r = train_cli(base, run, "--prune_steps=3", "--allow_changes=prune_steps", timeout=120)
    assert r.returncode == 0 and "resumed prune at step 4" in r.stdout, r.stderr[-2000:]
    ends = [(x["stage"], x["step"]) for x in RunDir(run).read_metrics() if "stage_seconds" in x]
    assert ends == [("prune", 4), ("cpt", 4)] and (run / "hf" / "model.safetensors").exists()


def test_resume_refuses_to_drop_the_stage_it_stopped_in(setup, stopped, tmp_path, capsys):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    capsys.readouterr()
    assert train.main(base + [f"--out_dir={run}", "--prune_steps=0", "--allow_changes=prune_steps"]) == 2
    one_line(capsys.readouterr().err, "train.py: error: ", "checkpoint of the prune stage, which prune_steps=0 removes")
    assert tree(run / "checkpoints") == tree(stopped / "checkpoints") and not (run / "hf").exists()
    assert train.main(base + [f"--out_dir={run}", "--allow_changes=prune_steps"]) == 0  # as it says: resumes


def test_allowed_change_resumes_with_the_new_value(setup, stopped, tmp_path, capsys):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    assert train.main(base + [f"--out_dir={run}", "--cpt_lr=5e-4", "--allow_changes=cpt_lr"]) == 0
    out = capsys.readouterr().out
    assert "with a changed config: cpt_lr 0.001 -> 0.0005" in out and "resumed prune at step 4" in out
    assert json.loads((run / "config.json").read_text())["cpt_lr"] == 5e-4
    rows = [r for r in RunDir(run).read_metrics() if r["stage"] == "cpt" and "lr" in r]
    assert rows[0]["lr"] == pytest.approx(5e-4)  # cpt_warmup 0.25 of 4 steps: step 1 is at the peak


def test_overwrite_starts_over(setup, stopped, tmp_path):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    assert train.main(base + [f"--out_dir={run}", "--prune_lr=0.5", "--overwrite=true", "--stop_at=2"]) == 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["0-prune-00000002"]
    assert json.loads((run / "config.json").read_text())["prune_lr"] == 0.5


def test_corrupted_run_config_is_refused(setup, stopped, tmp_path, capsys):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    (run / "config.json").write_text('{"prune_lr": ')
    before = tree(run)
    assert train.main(base + [f"--out_dir={run}"]) == 2
    one_line(capsys.readouterr().err, "config.json is corrupted", "--overwrite=true")
    assert tree(run) == before
    assert train.main(base + [f"--out_dir={run}", "--overwrite=true", "--stop_at=2"]) == 0  # as it says: over
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["0-prune-00000002"]


def test_out_dir_in_use_is_refused(setup, stopped, tmp_path, capsys):
    import fcntl
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    before = tree(run)
    with open(run / ".lock", "a+") as f:  # as a running train.py holds it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert train.main(base + [f"--out_dir={run}"]) == 2
        one_line(capsys.readouterr().err, "is in use by another train.py run", "use another out_dir")
    assert tree(run) == before
    assert train.main(base + [f"--out_dir={run}"]) == 0  # released: it resumes and finishes
    same_weights(ref, run)


def test_init_from_an_unfinished_run(setup, stopped, tmp_path, capsys):
    root, base, ref = setup
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}", f"--init_from={stopped}"]) == 2
    one_line(capsys.readouterr().err, "is a run directory without a final model (hf/)")


# -----------------------------------------------------------------------------
# train.py: failures while running, and damaged checkpoints

def test_nan_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch, capsys):
    from model import Transformer
    root, base, ref = setup
    forward, calls = Transformer.forward, []

    def poisoned(self, idx, targets=None, masks=None, reduction="mean"):
        out = forward(self, idx, targets, masks, reduction)
        calls.append(torch.is_grad_enabled())
        return out * float("nan") if sum(calls) > 12 else out  # from the 4th training step (4 micro-batches each)

    monkeypatch.setattr(Transformer, "forward", poisoned)
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}"]) == 1
    one_line(capsys.readouterr().err, "prune step 3: the training loss is nan", "--prune_lr=0.0005 "
             "--allow_changes=prune_lr")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["0-prune-00000002"]
    assert not (tmp_path / "run" / "done.json").exists()


def _file_size_limit(limit):
    def preexec():  # writes past `limit` bytes fail with EFBIG, as they would with ENOSPC on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_failed_plot_redraw_keeps_the_previous_plot(setup, tmp_path):
    # a write error while redrawing (RLIMIT_FSIZE below a plot's size): the old plots stay whole, no .tmp is left
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    before = tree(run / "plots")
    code = f"import report; from checkpoint import RunDir; report.plot_metrics(RunDir({str(run)!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
                       preexec_fn=_file_size_limit(4000))
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr[-2000:]
    assert tree(run / "plots") == before and not list((run / "plots").glob("*.tmp"))


def test_full_disk_while_saving_a_checkpoint(setup, stopped, tmp_path):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    ckpts = tree(run / "checkpoints")
    # the checkpoint shard (weights + Adam moments, ~400 kB) no longer fits, everything else does: the first save after
    # step 4 (the one right after compaction) fails
    r = train_cli(base, run, preexec=_file_size_limit(300_000))
    assert r.returncode == 1
    one_line(r.stderr, "could not write checkpoint 1-cpt-00000000", "File too large",
             "0-prune-00000004 is intact", "run the same command again")
    assert tree(run / "checkpoints") == ckpts  # no partial directory, the earlier checkpoints untouched
    r = train_cli(base, run)  # space again: resumes from step 4
    assert r.returncode == 0 and "resumed prune at step 4" in r.stdout, r.stderr[-2000:]
    same_weights(ref, run)


def test_full_disk_while_exporting(setup, stopped, tmp_path, monkeypatch, capsys):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "save_file", full)  # pruned/ cannot be written at compaction
    assert train.main(base + [f"--out_dir={run}"]) == 1
    one_line(capsys.readouterr().err, "No space left on device", "checkpoints", "are intact",
             "run the same command again")
    assert not (run / "pruned").exists() and hidden(run) == []
    monkeypatch.undo()
    assert train.main(base + [f"--out_dir={run}"]) == 0
    same_weights(ref, run)


def _edit_config(edit):
    def make(run):
        c = json.loads((run / "config.json").read_text())
        edit(c)
        (run / "config.json").write_text(json.dumps(c, indent=1))  # (as the run writes it)
    return make


REPORT_CASES = {  # train.py report on what is not (or no longer) a whole run: one line, exit 1
    "config_corrupted": (lambda run: (run / "config.json").write_text("{"), "Expecting property name"),
    "not_a_train_config": (lambda run: (run / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}'),
                           "has no 'data_dir' (not a train.py config?)"),
    "data_moved": (_edit_config(lambda c: c.update(data_dir="/nonexistent/data")), "no dataset at /nonexistent/data"),
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report_bad_run(case, setup, tmp_path, capsys):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    edit, msg = REPORT_CASES[case]
    edit(run)
    capsys.readouterr()
    assert report.main(["report", str(run)]) == 1
    one_line(capsys.readouterr().err, "train.py report: error: ", msg)


def _reorder_domains(d):
    meta = json.loads((d / "meta.json").read_text())
    meta["domains"] = meta["domains"][::-1]
    (d / "meta.json").write_text(json.dumps(meta))


def _shrink_domain(d):  # "mid" rebuilt with less text: a consistent dataset, but not the one the run began on
    meta = json.loads((d / "meta.json").read_text())
    m = next(x for x in meta["domains"] if x["name"] == "mid")
    (d / "mid" / "train.bin").write_bytes((d / "mid" / "train.bin").read_bytes()[:20000])
    m["train"]["tokens"] = 10000
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change", [(_reorder_domains, "its domains were ['easy', 'mid', 'hard'], now ['hard', 'mid', "
                                                        "'easy']"),
                                    (_shrink_domain, "domain 'mid' had 562 training windows of 32 tokens, now "
                                                     "312")], ids=["reordered", "rebuilt"])
def test_resume_on_a_changed_dataset_is_one_line(setup, stopped, tmp_path, capsys, change):
    root, base, ref = setup
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(stopped, run)
    shutil.copytree(root / "data", data)
    _edit_config(lambda c: c.update(data_dir=str(data)))(run)  # (the run began on this copy)
    edit, msg = change
    edit(data)
    before = {k: v for k, v in tree(run).items() if k != "config.json"}  # (rewritten with the new out_dir)
    capsys.readouterr()
    assert train.main(base + [f"--out_dir={run}", f"--data_dir={data}"]) == 2
    one_line(capsys.readouterr().err, "cannot resume from", "the dataset", "changed since it was written", msg,
             "--overwrite=true")
    assert {k: v for k, v in tree(run).items() if k != "config.json"} == before


def test_report_of_a_half_finished_run_whose_source_is_gone(setup, stopped, tmp_path, capsys):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    _edit_config(lambda c: c.update(init_from="/nonexistent/model"))(run)
    capsys.readouterr()
    assert report.main(["report", str(run)]) == 0
    out = capsys.readouterr()
    assert "no model to measure: the source /nonexistent/model is not there" in out.out and not out.err


def hidden(path) -> list[str]:
    """What a run directory (or a folder of exports) holds besides its files: temp copies, old copies, locks."""
    return sorted(p.name for p in Path(path).iterdir() if p.name.startswith(".") and p.name != ".lock")


def test_a_real_full_disk_while_exporting(setup, stopped, tmp_path):
    # RLIMIT_FSIZE between a plot's size and the compacted weights': safetensors' own error (not an OSError) while
    # pruned/ is written, as on a full disk: one line, nothing half-written, and the same command resumes
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    limit = max(p.stat().st_size for p in (ref / "plots").iterdir()) + 4096
    assert (ref / "pruned" / "model.safetensors").stat().st_size > limit
    r = train_cli(base, run, preexec=_file_size_limit(limit))
    assert r.returncode == 1, r.stderr[-2000:]
    one_line(r.stderr, "train.py: error: could not write the weights in", "File too large", "are intact")
    assert not (run / "pruned").exists() and hidden(run) == []
    r = train_cli(base, run)
    assert r.returncode == 0 and "resumed prune at step 4" in r.stdout, r.stderr[-2000:]
    same_weights(ref, run)
    # and convert.py to-hf, the same way
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), "to-hf", str(ref), str(tmp_path / "out")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, preexec_fn=_file_size_limit(limit))
    assert r.returncode == 1, r.stderr[-2000:]
    one_line(r.stderr, "convert.py: error: could not write the weights", "File too large")
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_a_failure_only_rank_0_sees_ends_every_rank_with_one_line(setup, stopped, tmp_path):
    # two processes, resumed from the one-process checkpoint: rank 0 alone writes pruned/, and fails (a real write
    # error); rank 1 must not wait in the next collective and die with gloo's "Connection closed by peer"
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    limit = max(p.stat().st_size for p in (ref / "plots").iterdir()) + 4096
    cmd = [sys.executable, str(ROOT / "train.py"), "--nproc_per_node=2", *base, f"--out_dir={run}"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                       preexec_fn=_file_size_limit(limit))
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-3000:])
    one_line(r.stderr, "train.py: error: could not write the weights in", "File too large", "are intact")
    assert "Traceback" not in r.stdout and "Connection closed" not in r.stdout
    assert not (run / "pruned").exists() and hidden(run) == []


@pytest.mark.parametrize("at", ["out_aside", "new_in_place"])
def test_export_force_killed_between_the_renames(setup, tmp_path, at):
    # SIGKILL inside the --force swap of an export: OUT is, or becomes on the next run, the complete new copy
    root, base, ref = setup
    out = tmp_path / "out"
    assert convert_cli("to-hf", root / "model", out).returncode == 0
    target = str(tmp_path / ".out.old") if at == "out_aside" else str(out)
    code = killed_after_rename(target, "convert.main(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, "to-hf", str(ref), str(out), "--force"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert hidden(tmp_path)  # the swap was cut: the old copy, or the complete new one, waits beside OUT
    r = convert_cli("to-hf", ref, out, "--force")  # the same command again
    assert r.returncode == 0, r.stderr
    assert hidden(tmp_path) == []
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(ref / "hf" / "model.safetensors")).keys()


def test_sigkill_during_a_checkpoint_write(setup, stopped, tmp_path):
    # killed after the shards of cpt checkpoint 2 are written but before it is complete: cpt 1 is resumed
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    code = ("import os, signal, sys, torch, train\n"
            "save = torch.save\n"
            "def killed(obj, f, *a, **k):  # the loop state of checkpoint cpt 2, its last file before the manifest\n"
            "    if '.tmp-1-cpt-00000002' in str(getattr(f, 'name', '')):\n"
            "        save(obj, f, *a, **k); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            "    save(obj, f, *a, **k)\n"
            "torch.save = killed\n"
            f"sys.exit(train.main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, *base, f"--out_dir={run}", "--save_interval=1"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (run / "checkpoints" / ".tmp-1-cpt-00000002" / "state.pt").exists()  # half a checkpoint on disk
    assert [os.path.basename(p) for p in RunDir(run).checkpoints()] == ["1-cpt-00000000", "1-cpt-00000001"]
    r = train_cli(base, run)
    assert r.returncode == 0 and "resumed cpt at step 1" in r.stdout, r.stderr[-2000:]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    same_weights(ref, run)


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated_shard", "missing_state", "bad_manifest"])
def test_damaged_latest_checkpoint_falls_back(setup, stopped, tmp_path, capsys, damage):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    latest = run / "checkpoints" / "0-prune-00000004"
    if damage == "flipped_byte":
        flip_byte(latest / "__0_0.distcp", 1000)
    elif damage == "truncated_shard":
        _truncate(latest / "__0_0.distcp", 0.9)
    elif damage == "missing_state":
        (latest / "state.pt").unlink()
    else:
        (latest / "manifest.json").write_text("{")
    assert train.main(base + [f"--out_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "is damaged" in out and "resumed prune at step 2" in out
    assert (run / "checkpoints" / ".damaged-0-prune-00000004").is_dir()  # kept for inspection, never loaded again
    same_weights(ref, run)


def test_every_checkpoint_damaged(setup, stopped, tmp_path, capsys):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    for ckpt in RunDir(run).checkpoints():
        flip_byte(Path(ckpt) / "__0_0.distcp", 500)
    assert train.main(base + [f"--out_dir={run}"]) == 1
    one_line(capsys.readouterr().err, "no undamaged checkpoint", "0-prune-00000002: __0_0.distcp does not match its "
             "sha256", "run the same command again to start the run over")
    assert train.main(base + [f"--out_dir={run}"]) == 0  # as it said: started over
    same_weights(ref, run)


def test_killed_at_random_moments_ends_with_the_same_weights(setup, tmp_path):
    # SIGKILL at moments drawn at random (a fresh draw each session: the seed is printed), saving every step so that
    # many kills land inside a save; every rerun resumes, and the last one finishes with the uninterrupted weights
    root, base, ref = setup
    run = tmp_path / "run"
    seed = random.randrange(1 << 30)
    print(f"kill moments seed {seed}")
    rng = random.Random(seed)
    cmd = [sys.executable, str(ROOT / "train.py"), *base, f"--out_dir={run}", "--save_interval=1"]
    kills = 0
    for _ in range(4):
        p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not (run / "checkpoints").exists() and p.poll() is None:  # past the imports and model loading
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.5))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 2, f"the run finished before it could be killed often enough (seed {seed})"
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    same_weights(ref, run)
    assert RunDir(run).read_metrics()[-1]["stage"] == "cpt"


# -----------------------------------------------------------------------------
# convert.py

def convert_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert.py"), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_convert_run_with_a_damaged_latest_checkpoint(setup, stopped, tmp_path):
    root, base, ref = setup
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    flip_byte(run / "checkpoints" / "0-prune-00000004" / "state.pt", 100)
    before = tree(run)
    r = convert_cli("to-hf", run, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "0-prune-00000004 is damaged" in r.stderr and (tmp_path / "out" / "config.json").exists()
    assert tree(run) == before  # convert reads a run, never changes it (it may be running)
    for ckpt in RunDir(run).checkpoints():
        flip_byte(Path(ckpt) / "__0_0.distcp", 100)
    r = convert_cli("to-hf", run, tmp_path / "out2")
    assert r.returncode == 1 and "holds no complete, undamaged checkpoint" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "out2").exists()


def test_convert_refuses_to_replace_a_model(setup, tmp_path):
    root, base, ref = setup
    before = tree(ref / "hf")
    r = convert_cli("to-hf", root / "model", ref / "hf")
    assert r.returncode == 1
    one_line(r.stderr, "convert.py: error:", "exists and is not empty; pass --force")
    assert tree(ref / "hf") == before


def test_convert_verify_of_a_corrupted_model(setup, tmp_path):
    root, base, ref = setup
    shutil.copytree(ref / "hf", tmp_path / "hf")
    _truncate(tmp_path / "hf" / "model.safetensors", 0.7)
    r = convert_cli("verify", tmp_path / "hf")
    assert r.returncode == 1
    one_line(r.stderr, "convert.py: error:", "model.safetensors is not a readable safetensors file")


def test_convert_bad_max_shard_size(setup, tmp_path):
    root, base, ref = setup
    r = convert_cli("to-hf", root / "model", tmp_path / "out", "--max-shard-size", "lots")
    assert r.returncode == 1
    one_line(r.stderr, "bad size 'lots'; use e.g. 500MB or 5GB")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# prepare.py

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    tok = make_tokenizer(root / "tok")
    write_sources(root / "src")
    assert run_prepare(tok, root / "ds", "--workers", 1, root=root / "src") == 0
    return root, tok


def test_prepare_tokenizer_files_missing(prepared, tmp_path, capsys):
    root, tok = prepared
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert run_prepare(tmp_path / "model", tmp_path / "ds", root=root / "src") == 2
    one_line(capsys.readouterr().err, "prepare.py: error:", "has no tokenizer.json or tokenizer.model")
    assert not (tmp_path / "ds").exists()


def test_prepare_other_settings_keep_the_dataset(prepared, tmp_path, capsys):
    root, tok = prepared
    before = tree(root / "ds")
    assert run_prepare(tok, root / "ds", "--val-tokens", 77, root=root / "src") == 2
    one_line(capsys.readouterr().err, "was prepared with other settings (val_tokens)", "--force")
    assert tree(root / "ds") == before


def test_prepare_corrupted_meta_is_not_replaced_silently(prepared, tmp_path, capsys):
    root, tok = prepared
    shutil.copytree(root / "ds", tmp_path / "ds")
    (tmp_path / "ds" / "meta.json").write_text("{oops")
    before = tree(tmp_path / "ds")
    assert run_prepare(tok, tmp_path / "ds", root=root / "src") == 2
    one_line(capsys.readouterr().err, "meta.json is unreadable; pass --force to rebuild")
    assert tree(tmp_path / "ds") == before


def test_prepare_will_not_replace_other_files(prepared, tmp_path, capsys):
    root, tok = prepared
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    assert run_prepare(tok, tmp_path / "ds", root=root / "src") == 2
    one_line(capsys.readouterr().err, "is not a prepared dataset (no meta.json); refusing to replace it")
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"


def test_prepare_full_disk_keeps_the_old_dataset(prepared, tmp_path):
    root, tok = prepared
    shutil.copytree(root / "ds", tmp_path / "ds")
    before = tree(tmp_path / "ds")
    cmd = [sys.executable, str(ROOT / "prepare.py"), "--tokenizer", str(tok), "--out", str(tmp_path / "ds"),
           "--quiet", "--workers", "1", "--force", "--domain", f"code={root}/src/code",
           "--domain", f"prose={root}/src/*.jsonl*", "--domain", f"log={root}/src/*.parquet",
           "--text-field", "meta.text"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                       preexec_fn=_file_size_limit(1000))
    assert r.returncode == 1
    one_line(r.stderr, "prepare.py: error:", "File too large")
    assert tree(tmp_path / "ds") == before and not list(tmp_path.glob(".ds.tmp-*"))


def test_train_on_a_dataset_of_another_tokenizer(prepared, setup, tmp_path, capsys):
    # data prepared with one tokenizer, a model directory holding another one of a similar vocabulary size
    root, tok = prepared
    sroot, base, ref = setup
    make_hf("llama_gqa", tmp_path / "model", vocab_size=512)
    make_tokenizer(tmp_path / "model", extra_tokens=1)
    capsys.readouterr()
    assert train.main(base + [f"--init_from={tmp_path / 'model'}", f"--data_dir={root / 'ds'}",
                              f"--out_dir={tmp_path / 'run'}", "--reference_loss=1,2,3"]) == 2
    one_line(capsys.readouterr().err, "was tokenized with another tokenizer", "prepare.py --tokenizer")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signals_under_the_launcher_end_with_one_line(setup, tmp_path, sig):
    # python train.py --nproc_per_node=2: a scheduler's SIGTERM to the launcher, or Ctrl-C in a terminal (SIGINT to
    # the whole process group): the workers checkpoint, one line, 143 / 130, no traceback; the same command resumes
    root, base, ref = setup
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--nproc_per_node=2", *base, f"--out_dir={run}",
           "--save_interval=100"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while not any(r.get("step", 0) >= 2 for r in RunDir(run).read_metrics()) and time.time() < deadline:
        time.sleep(0.01)
    if sig == "SIGTERM":
        p.send_signal(signal.SIGTERM)
    else:
        os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == (143 if sig == "SIGTERM" else 130), (out[-2000:], err[-3000:])
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    lines = (out + err).splitlines()
    assert not [ln for ln in lines if "death signal" in ln or "ChildFailedError" in ln], err[-3000:]
    ends = [ln for ln in lines if "terminated" in ln or "interrupted" in ln]
    if sig == "SIGTERM":  # checkpointed at the step boundary
        assert len(ends) == 1 and "run the same command again" in ends[0] and RunDir(run).checkpoints(), lines
    else:  # Ctrl-C stops where it is: the checkpoints there are (none yet) stay as they were
        assert ends == ["train.py: interrupted"], lines
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and ("resumed prune at step" in r.stdout) == (sig == "SIGTERM"), r.stderr[-3000:]
    wa, wb = weights(ref), weights(run)  # two processes, resumed: the one-process reference, within fp32 rounding
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-5, msg=k)


def test_sigterm_saves_and_resumes(setup, tmp_path):
    # a scheduler's SIGTERM (before its SIGKILL): the step in progress finishes, a checkpoint is written at the next
    # step boundary (not only at save_interval), exit 143; the same command resumes to the uninterrupted weights
    root, base, ref = setup
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *base, f"--out_dir={run}", "--save_interval=100"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(r.get("step", 0) >= 2 for r in RunDir(run).read_metrics()) and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM) at step" in out and "run the same command again" in out
    ckpts = [os.path.basename(c) for c in RunDir(run).checkpoints()]
    assert len(ckpts) == 1 and ckpts[0].startswith("0-prune-")  # saved where it stopped, not at save_interval
    # in the grace period: every file's size, no sha256 (reading 81 GB back for it would outlast the grace)
    files = json.loads((run / "checkpoints" / ckpts[0] / "manifest.json").read_text())["files"]
    assert files and all(size > 0 and digest is None for size, digest in files.values()), files
    assert "sizes only" in out
    r = train_cli(base, run, "--save_interval=100")
    assert r.returncode == 0 and f"resumed prune at step {int(ckpts[0].split('-')[-1])}" in r.stdout, r.stderr[-2000:]
    same_weights(ref, run)


@pytest.mark.parametrize("what", ["export", "hang"])
def test_collective_timeout_ends_hangs_not_rank0_phases(setup, tmp_path, what):
    # collective_timeout bounds the training loop's collectives (a hang costs that much of every GPU): a rank 12 s
    # late in a step ends the run with one line per rank after 6 s; the other ranks wait longer for rank 0's exports
    # (minutes for 7B): 12 s each against the same 6 s timeout, and the run finishes
    root, base, ref = setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "slow_rank0.py"), what, "12", *base, f"--out_dir={tmp_path / 'run'}",
           "--collective_timeout=6"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if what == "export":
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "run" / "done.json").is_file()
    else:
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train.py: error")]
        assert r.returncode != 0 and any("rank 0: a collective waited more than collective_timeout=6 s" in ln
                                         for ln in lines), r.stderr[-3000:]
        assert "]: Traceback" not in r.stderr, r.stderr[-3000:]  # no worker's (torchrun prints its own)


@pytest.mark.parametrize("errno_name", ["ENOLCK", "ENOSYS"])
def test_filesystems_without_locks_run_with_a_warning(setup, tmp_path, monkeypatch, capsys, errno_name):
    # NFS mounted nolock and some parallel filesystems fail flock itself: the run and prepare.py go on, saying so
    import errno
    import fcntl
    import data
    root, base, ref = setup

    def flock(f, op):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
    monkeypatch.setattr(fcntl, "flock", flock)
    assert train.main(base + [f"--out_dir={tmp_path / 'run'}", "--cpt_steps=0"]) == 0
    assert "filesystem without locks" in capsys.readouterr().err
    with data.dir_lock(str(tmp_path / "bins")):
        pass
    assert "filesystem without locks" in capsys.readouterr().err
    monkeypatch.setattr(fcntl, "flock", lambda f, op: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):  # any other error of flock is not a missing lock
        with data.dir_lock(str(tmp_path / "bins")):
            pass
