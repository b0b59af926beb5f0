"""Shared fixtures: tiny random Hugging Face models of each family, saved to a temp dir (no network)."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers

# name -> (HF config class, kwargs); small enough to build and run in milliseconds
TINY = {
    "llama": ("LlamaConfig", dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": ("LlamaConfig", dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                      tie_word_embeddings=True)),
    "llama3": ("LlamaConfig", dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=16))),
    "llama_bias": ("LlamaConfig", dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                                       mlp_bias=True, rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                           factor=2.0))),
    "qwen2": ("Qwen2Config", dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen2_untied": ("Qwen2Config", dict(vocab_size=256, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False)),
    "neox_parallel": ("GPTNeoXConfig", dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                            use_parallel_residual=True)),
    "neox_sequential": ("GPTNeoXConfig", dict(vocab_size=256, hidden_size=48, intermediate_size=96,
                                              num_hidden_layers=3, num_attention_heads=3, rotary_pct=0.25,
                                              use_parallel_residual=False)),
}


def make_hf(name: str, path, seed: int = 0, **overrides):
    """Build a random tiny HF model, perturb its norms and biases (so they matter), save it to `path`."""
    cls, kw = TINY[name]
    cfg = getattr(transformers, cls)(**{**kw, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(params=sorted(TINY))
def family(request):
    return request.param


# -----------------------------------------------------------------------------
# train.py runs: a tiny GQA model, three synthetic domains, and one uninterrupted run to compare against
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


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    import train
    root = tmp_path_factory.mktemp("train")
    make_hf("llama_gqa", root / "model")  # GQA (6 query / 2 key-value heads), tied embeddings
    make_data(root / "data")
    base = ["config/tiny.py", f"--init_from={root / 'model'}", f"--data_dir={root / 'data'}", *TARGET,
            "--reference_loss=1,2,5"]
    ref = root / "ref"
    assert train.main(base + [f"--out_dir={ref}"]) == 0  # the uninterrupted 1-process run, shared by the tests
    return root, base, ref


def killed_after_rename(target: str, call: str) -> str:
    """Python source for `python -c`: run `call` (e.g. "prepare.main(sys.argv[1:])") with os.rename patched to SIGKILL
    the process right after it renames something to `target`: a kill at that exact point of a directory swap."""
    return ("import os, signal, sys, convert, prepare\n"
            "rename = os.rename\n"
            "def killed(a, b):\n"
            "    rename(a, b)\n"
            f"    if str(b) == {target!r}: os.kill(os.getpid(), signal.SIGKILL)\n"
            "os.rename = killed\n"
            f"sys.exit({call})")
