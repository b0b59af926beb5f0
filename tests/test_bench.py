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


def test_quality_study_on_the_tiny_model(setup, tmp_path):
    # the study end to end on the test model: calibration, runs at equal seconds, a budget sharing runs, the report
    from conftest import TARGET
    root, base, ref = setup
    common = ["--config", "config/tiny.py", "--model", str(root / "model"), "--data_dir", str(root / "data"),
              "--demo_steps", "4,4", "--no-pin",  # (the tiny config's own shapes)
              "--extra", " ".join(TARGET + ["--reference_loss=1,2,5"]), "--calibrate_steps", "2",
              "--seq_len", "32", "--val_seqs", "4", "--tasks", "",  # (no tokenizer here)
              "--out", str(tmp_path / "q"), "--results", str(tmp_path / "res" / "q.json"), "--plots", str(tmp_path)]
    run("bench/quality.py", "calibrate", *common)
    res = json.loads((tmp_path / "res" / "q.json").read_text())
    s = res["calibration"]["seconds_per_step"]
    assert set(s) == {"prune", "cpt", "cpt+kd"} and all(v > 0 for v in s.values())
    run("bench/quality.py", "run", "--only", "oneshot,l0", "--seeds", "1,2", *common)
    res = json.loads((tmp_path / "res" / "q.json").read_text())
    assert {(r["variant"], r["seed"]) for r in res["runs"].values()} == {(v, i) for v in ("oneshot", "l0")
                                                                         for i in (1, 2)}
    l0 = res["runs"]["l0|4+4|s1"]  # the demo budget is its own recipe's time: exactly the demo's steps
    one = next(r for r in res["runs"].values() if r["variant"] == "oneshot" and r["seed"] == 1)
    assert one["prune_steps"] == 0 and one["cpt_steps"] == round((4 * s["prune"] + 4 * s["cpt"]) / s["cpt"])
    assert len(l0["final"]["val"]) == 3 and all(len(v) == 4 for v in l0["final"]["val"]) and l0["pruned"]
    assert l0["seconds"]["prune"] > 0 and l0["tokens"] == {"prune": 4 * 4 * 32, "cpt": 4 * 4 * 32}
    # equal tokens: l0's run is the same one (no training), the one-shot run gets the tokens of 4 + 4 steps
    text = run("bench/quality.py", "run", "--budget", "demo-tokens", "--only", "l0", "--seeds", "1", *common)
    assert "== " not in text
    assert json.loads((tmp_path / "res" / "q.json").read_text())["runs"]["l0|4+4|s1"]["budgets"] == ["demo",
                                                                                                     "demo-tokens"]
    # a variant that trains what a finished run trained is that run (l0/dro+eval is l0: dro+eval is the default)
    text = run("bench/quality.py", "run", "--sweep", "weighting", "--recipe", "l0", "--only", "l0/dro+eval",
               "--seeds", "1", *common)
    assert "== " not in text and "trains what l0|4+4|s1 trained" in text
    twin = json.loads((tmp_path / "res" / "q.json").read_text())["runs"]["l0/dro+eval|4+4|s1"]
    assert twin["same_as"] == "l0|4+4|s1" and twin["final"] == l0["final"]
    text = run("bench/quality.py", "report", "--reps", "200", "--against", "oneshot,l0", *common)
    md = (tmp_path / "res" / "q.md").read_text()
    assert md in text + "\n" and "Budget `demo`" in md and "Budget `demo-tokens`" in md
    row = next(line for line in md.splitlines() if line.startswith("| l0 | 4 + 4"))
    assert any(v in row for v in ("better", "worse", "not distinguishable"))  # against oneshot, the first
    second = md.split("Against `l0` (variant - l0")[1].split("\n\n")[1].splitlines()  # the table against l0
    assert second[2].startswith("| oneshot | 2 | ") and "l0/dro+eval" not in "".join(second)
    assert (tmp_path / "quality-study.png").stat().st_size > 1000


def test_paired_bootstrap_depends_on_its_data_alone():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import numpy as np
    import quality
    g = np.random.default_rng(1)
    b = {s: {"val": g.normal(3, 0.5, (3, 40)).tolist()} for s in (1, 2, 3)}
    a = {s: {"val": (np.array(v["val"]) + 0.2).tolist()} for s, v in b.items()}  # 0.2 worse everywhere
    first = quality.paired(a, b, 300)
    quality.paired(b, {s: b[s] for s in (1, 2)}, 300)  # another comparison in between changes nothing
    again = quality.paired(a, b, 300)
    assert first == again and abs(first["mean"]["diff"] - 0.2) < 1e-9 and first["mean"]["seeds"] == [1, 2, 3]
    assert quality.verdict(first["mean"]["ci"], lower_is_better=True) == "worse"
    assert quality.verdict(quality.paired(b, a, 300)["worst"]["ci"], lower_is_better=True) == "better"
    none = quality.paired(a, {4: b[1]}, 300)  # no seed in common: no difference, an empty cell
    assert none["mean"]["seeds"] == [] and quality.cell(none["mean"]) == ""


def test_memory_plan_orders_the_settings():
    # bench/memory.py: checkpointing fewer blocks, keeping weights gathered and deferring the sync each cost memory
    text = run("bench/memory.py")
    total = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| prune") or line.startswith("| cpt"):
            total[tuple(cells[:5])] = float(cells[-1].rstrip("*"))
    prune = [total[("prune", "1", ac, "yes", "no")] for ac in ("off", "1 block in 2", "every block")]
    assert prune[0] > prune[1] > prune[2] > 0, prune
    cpt = total[("cpt", "2", "off", "yes", "no")]
    assert cpt < total[("cpt", "2", "off", "no", "no")] < total[("cpt", "2", "off", "no", "yes")]
    assert "saves" in text and "masked weight products" in text  # the measured activations
