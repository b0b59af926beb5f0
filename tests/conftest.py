"""Shared fixtures: tiny random Hugging Face models of each family, saved to a temp dir (no network)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
