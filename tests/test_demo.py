"""`make demo` end to end on a tiny GGUF written here (no download): GGUF -> HF directory -> the demo corpus
prepared with its tokenizer -> train.py config/demo.py (shrunk) -> train.py report; the export loads in
transformers with the target shape and generates.

    pytest -q tests/test_demo.py
"""

import json
import os
import subprocess
from pathlib import Path

import transformers
from conftest import make_hf
from test_data import make_tokenizer
from test_tasks import write_tasks

ROOT = Path(__file__).resolve().parents[1]


def write_gguf_with_tokenizer(hf, tok_dir: Path, path: Path):
    """A llama.cpp-style GGUF of `hf` that carries a GPT-2-style BPE tokenizer (tokens, merges, types)."""
    import gguf
    from test_model import write_gguf
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
    tokens = [t for t, _ in sorted(ids.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in tj["added_tokens"]}

    class Writer(gguf.GGUFWriter):  # write_gguf's writer, plus the tokenizer fields
        def add_token_list(self, _):
            super().add_tokenizer_model("gpt2")
            super().add_token_list(tokens)
            super().add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
            super().add_token_types([3 if i in special else 1 for i in range(len(tokens))])
            super().add_eos_token_id(ids["<|endoftext|>"])

    real, gguf.GGUFWriter = gguf.GGUFWriter, Writer
    try:
        write_gguf(hf, path)
    finally:
        gguf.GGUFWriter = real


def test_make_demo_pipeline(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    hf = make_hf("llama_gqa", tmp_path / "src", vocab_size=400)  # 6/2 heads, 3 layers, hidden 48, MLP 80, tied
    write_gguf_with_tokenizer(hf, tok, tmp_path / "tiny.gguf")
    shrink = " ".join(["--target_hidden_size=24", "--target_num_hidden_layers=2", "--target_num_key_value_heads=1",
                       "--target_intermediate_size=40",
                       "--prune_steps=4", "--cpt_steps=2", "--prune_seq_len=32", "--cpt_seq_len=32",
                       "--eval_interval=2", "--save_interval=2", "--log_interval=1"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    (write_tasks(tmp_path / "tasks") / ".done").touch()  # small stand-ins for the tasks' data: no download
    args = [f"GGUF={tmp_path / 'tiny.gguf'}", f"TASKS_DIR={tmp_path / 'tasks'}", f"DEFAULT_MODEL={tmp_path / 'model'}",
            f"DEMO_DATA={tmp_path / 'data'}",
            f"DEMO_OUT={tmp_path / 'out'}", "PREPARE_ARGS=--max-tokens-per-domain 20000 --val-tokens 3000 --quiet",
            f"DEMO_ARGS={shrink}"]
    r = subprocess.run(["make", "--no-print-directory", "demo", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = tmp_path / "out"
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf")
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (24, 2, 3, 1, 40)
    for line in ("source", "pruned", "final", "greedy completion by source", "greedy completion by pruned",
                 "greedy completion by final", "prune: 4 steps", "cpt: 2 steps",
                 "domain weights, first -> last", "downstream, zero-shot", "hellaswag", "winogrande"):
        assert line in r.stdout, line
    assert (out / "plots" / "val_loss.png").exists() and (out / "done.json").exists()
    # a second run skips what is done: the stages print that the run is finished
    r = subprocess.run(["make", "--no-print-directory", "demo", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "is a finished run" in r.stdout, (r.stdout + r.stderr)[-3000:]
