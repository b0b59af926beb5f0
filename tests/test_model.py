"""Parity of model.py / convert.py with the Hugging Face reference implementations (fp32, CPU, offline).

    pytest -q tests/test_model.py
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import make_hf

import convert
from model import ModelConfig, Transformer

ROOT = __file__.rsplit("/tests/", 1)[0]


def tokens(vocab, B=2, T=17, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_and_loss_match_hf(family, tmp_path):
    hf = make_hf(family, tmp_path)
    ours = convert.load_model(str(tmp_path)).eval()
    idx = tokens(hf.config.vocab_size)
    with torch.no_grad():
        out = hf(input_ids=idx, labels=idx)
        torch.testing.assert_close(ours(idx), out.logits, atol=1e-5, rtol=1e-5)
        # HF shifts labels internally; ours takes next-token targets
        x, y = idx[:, :-1], idx[:, 1:]
        torch.testing.assert_close(ours(x, y), out.loss, atol=1e-5, rtol=1e-5)
        tok = ours(x, y, reduction="none")
        assert tok.shape == y.shape
        ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), y.flatten(), reduction="none")
        torch.testing.assert_close(tok.flatten(), ref, atol=1e-5, rtol=1e-5)
        y_ign = y.clone()
        y_ign[0, :5] = -100
        torch.testing.assert_close(ours(x, y_ign), tok.flatten()[y_ign.flatten() != -100].mean())


def test_round_trip_to_hf(family, tmp_path):
    hf = make_hf(family, tmp_path / "src")
    subprocess.run([sys.executable, f"{ROOT}/convert.py", "to-hf", str(tmp_path / "src"), str(tmp_path / "out")],
                   check=True, capture_output=True, cwd=ROOT)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(back) is type(hf)
    idx = tokens(hf.config.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx).logits, hf(idx).logits, atol=1e-5, rtol=1e-5)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [type(hf).__name__] and cfg["model_type"] == hf.config.model_type
    assert (tmp_path / "out" / "generation_config.json").exists()


@pytest.mark.parametrize("seed", range(4))
def test_unnamed_configs(seed, tmp_path):
    """Random sizes, head_dim != hidden/heads, tied/untied, llama3 scaling: parity within 1e-4 on logits."""
    g = torch.Generator().manual_seed(100 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    nkv = r(1, 3)
    nh = nkv * r(1, 3)
    kw = dict(vocab_size=r(100, 400), hidden_size=8 * r(3, 8), intermediate_size=r(20, 90),
              num_hidden_layers=r(1, 3), num_attention_heads=nh, tie_word_embeddings=bool(r(0, 1)))
    family = ["llama", "qwen2", "gpt_neox", "llama"][seed]
    if family == "gpt_neox":
        kw.update(hidden_size=nh * 8, rotary_pct=0.5, use_parallel_residual=bool(r(0, 1)))
        cfg = transformers.GPTNeoXConfig(**kw)
    else:
        kw.update(num_key_value_heads=nkv, head_dim=2 * r(3, 10))
        rope = dict(rope_type="default", rope_theta=float(r(1000, 100000)))
        if seed == 3:
            rope = dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8)
        cfg = (transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config)(
            **kw, rope_parameters=rope)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = convert.load_model(str(tmp_path))
    idx = tokens(cfg.vocab_size, T=40, seed=seed)
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() < 1e-4


def test_legacy_config_fields():
    """Older config.json files: top-level rope_theta / rope_scaling, Pythia's rotary_pct and rotary_emb_base."""
    neox = ModelConfig.from_hf(dict(model_type="gpt_neox", vocab_size=10, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, rotary_pct=0.25,
                                    rotary_emb_base=1234.0, use_parallel_residual=False))
    assert (neox.partial_rotary_factor, neox.rope_theta, neox.use_parallel_residual) == (0.25, 1234.0, False)
    assert neox.attention_bias and neox.mlp_bias and neox.rotary_dim == 2
    llama = ModelConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     rope_theta=5e5, rope_scaling=dict(rope_type="llama3", factor=8.0,
                                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                                       original_max_position_embeddings=8192)))
    assert llama.rope_theta == 5e5 and llama.rope_scaling["rope_type"] == "llama3" and llama.head_dim == 8
    # the dict we write reads back the same, in both styles
    assert ModelConfig.from_hf(llama.to_hf()) == llama
    assert ModelConfig.from_hf(neox.to_hf()) == neox
    with pytest.raises(ValueError, match="not supported"):
        ModelConfig.from_hf(dict(model_type="mistral"))
    with pytest.raises(ValueError, match="rope type"):
        ModelConfig(rope_scaling={"rope_type": "yarn"})


def test_a_tied_config_with_a_head_of_its_own_keeps_the_head(tmp_path, capsys):
    # config.json ties the embeddings but the file holds a different lm_head.weight: transformers leaves them untied
    from safetensors.torch import load_file, save_file
    make_hf("llama_gqa", tmp_path / "m")
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ours = convert.load_model(str(tmp_path / "m"))
    assert "used untied, as transformers does" in capsys.readouterr().err
    assert not ours.config.tie_word_embeddings
    idx = tokens(256)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
    assert convert.verify(str(tmp_path / "m"), 1e-4) == 0


def test_sharded_safetensors_and_bin(tmp_path):
    hf = make_hf("llama", tmp_path / "src")
    ours = convert.load_model(str(tmp_path / "src"))
    convert.export_hf(ours, str(tmp_path / "sharded"), tokenizer_src=str(tmp_path / "src"), max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    idx = tokens(256)
    with torch.no_grad():
        torch.testing.assert_close(convert.load_model(str(tmp_path / "sharded"))(idx), hf(idx).logits)
    # pytorch_model.bin checkpoints (older repos)
    (tmp_path / "bin").mkdir(exist_ok=True)
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(convert.load_model(str(tmp_path / "bin"))(idx), hf(idx).logits)


def test_export_file_modes(tmp_path):
    # the export's files get the modes any new file gets (safetensors alone would write 0600)
    hf = make_hf("llama", tmp_path / "src")
    ours = convert.load_model(str(tmp_path / "src"))
    old = os.umask(0o022)
    try:
        convert.export_hf(ours, str(tmp_path / "out"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
    for name in os.listdir(tmp_path / "out"):
        assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o644, name
    del hf


def test_export_refuses_to_overwrite(tmp_path):
    make_hf("qwen2", tmp_path / "src")
    ours = convert.load_model(str(tmp_path / "src"))
    convert.export_hf(ours, str(tmp_path / "out"))
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(convert.ConvertError, match="--force"):
        convert.export_hf(ours, str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    convert.export_hf(ours, str(tmp_path / "out"), force=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp, old or lock file beside it


@pytest.mark.parametrize("case", ["missing", "no_config", "bad_json", "bad_weights", "bad_shape", "not_a_dir",
                                  "out_is_file", "truncated_safetensors", "truncated_gguf", "local_typo"])
def test_cli_errors(case, tmp_path):
    src = tmp_path / "src"
    if case not in ("missing", "local_typo"):
        hf = make_hf("llama", src)
    if case == "local_typo":  # a relative path whose first part exists here: not a hub id
        src = "tests/no-such-model"
    elif case == "truncated_safetensors":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif case == "truncated_gguf":
        write_gguf(hf, tmp_path / "m.gguf")
        data = (tmp_path / "m.gguf").read_bytes()
        (tmp_path / "m.gguf").write_bytes(data[:len(data) * 3 // 4])
        src = tmp_path / "m.gguf"
    elif case == "no_config":
        (src / "config.json").unlink()
    elif case == "bad_json":
        (src / "config.json").write_text("{not json")
    elif case == "bad_weights":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    elif case == "bad_shape":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    elif case == "not_a_dir":
        src = src / "config.json"
    out = tmp_path / "out"
    if case == "out_is_file":
        out.write_text("precious")
    r = subprocess.run([sys.executable, f"{ROOT}/convert.py", "to-hf", str(src), str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert.py: error:"), r.stderr
    assert out.read_text() == "precious" if case == "out_is_file" else not out.exists()
    if case.startswith("truncated"):
        assert "truncated or corrupted" in lines[0]
    if case == "local_typo":
        assert "no such model directory: tests/no-such-model" in lines[0] and "hub" not in lines[0]


def test_cli_interrupt_leaves_nothing(tmp_path):
    # Ctrl-C during an export: one line, exit 130, and no OUT (nor a temporary directory) left behind
    make_hf("llama", tmp_path / "src")
    out = tmp_path / "out"
    code = (f"import sys, convert; sys.argv = ['convert.py', 'to-hf', {str(tmp_path / 'src')!r}, {str(out)!r}]\n"
            "def stop(*a, **k): raise KeyboardInterrupt\n"
            "convert._copy_tokenizer = stop\n"  # interrupted midway: the weights are written, the rest is not
            "convert.main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 130
    assert r.stderr.strip().splitlines() == [f"convert.py: interrupted; {out} was not written or changed"]
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_cli_help():
    r = subprocess.run([sys.executable, f"{ROOT}/convert.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "to-hf" in r.stdout


def test_cli_verify(tmp_path):
    make_hf("neox_parallel", tmp_path / "src")
    r = subprocess.run([sys.executable, f"{ROOT}/convert.py", "verify", str(tmp_path / "src")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr


def test_hub_id_from_local_cache(tmp_path):
    """A hub id resolves offline from the hub cache layout (models--owner--name/snapshots/<rev>)."""
    snap = tmp_path / "hub" / "models--tiny--llama" / "snapshots" / ("a" * 40)
    hf = make_hf("llama_gqa", snap)
    (tmp_path / "hub" / "models--tiny--llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--llama" / "refs" / "main").write_text("a" * 40)
    code = ("import sys, torch, convert; m = convert.load_model('tiny/llama'); "
            "torch.save(m(torch.arange(10)[None]), sys.argv[1])")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "y.pt")], check=True, cwd=ROOT, env=env)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), hf(torch.arange(10)[None]).logits)
    r = subprocess.run([sys.executable, f"{ROOT}/convert.py", "to-hf", "tiny/absent", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 1 and "could not get tiny/absent" in r.stderr


def write_gguf(hf, path, extra_tensors=(), scaling=None, dtype="float32"):
    """Write a tiny HF Llama as llama.cpp does: GGUF names, q/k rows permuted for its interleaved RoPE (the
    weights as `dtype`: float64 gives GGUF F64 tensors)."""
    import gguf
    import numpy as np
    c = hf.config
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    if c.head_dim != c.hidden_size // nh:  # as llama.cpp's converter does for an explicit head_dim
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_context_length(c.max_position_embeddings)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if scaling:
        w.add_rope_scaling_type(scaling[0])
        w.add_rope_scaling_factor(scaling[1])
    w.add_token_list([f"t{i}".encode() for i in range(c.vocab_size)])

    def permute(x, n):
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = v.numpy().astype(dtype)
        layer, _, rest = k.removeprefix("model.layers.").partition(".")
        if k.startswith("model.layers."):
            mod = rest.rsplit(".", 1)[0]
            x = permute(x, nh) if mod == "self_attn.q_proj" else permute(x, nkv) if mod == "self_attn.k_proj" else x
            w.add_tensor(f"blk.{layer}.{names[mod]}.weight", x)
        else:
            w.add_tensor(f"{names[k.rsplit('.', 1)[0]]}.weight", x)
    for name, x in extra_tensors:
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["llama", "llama_gqa"])
def test_gguf(family, tmp_path):
    """A GGUF file (llama.cpp layout) loads to the same logits, tied or untied, MHA or GQA."""
    import numpy as np
    hf = make_hf(family, tmp_path / "src")
    write_gguf(hf, tmp_path / "m.gguf")
    ours = convert.load_model(str(tmp_path / "m.gguf"))
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    idx = tokens(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
    cfg, _ = convert.load_hf(str(tmp_path / "m.gguf"))
    assert cfg.rms_norm_eps == hf.config.rms_norm_eps  # not the float32 round-off GGUF stores
    import gguf
    write_gguf(hf, tmp_path / "lin.gguf", scaling=(gguf.RopeScalingType.LINEAR, 4.0))
    assert convert.load_hf(str(tmp_path / "lin.gguf"))[0].rope_scaling == {"rope_type": "linear", "factor": 4.0}
    hd = hf.config.head_dim
    write_gguf(hf, tmp_path / "l31.gguf", extra_tensors=[("rope_freqs.weight", np.ones(hd // 2, np.float32))])
    with pytest.raises(convert.ConvertError, match="rope_freqs"):
        convert.load_hf(str(tmp_path / "l31.gguf"))


def test_cross_entropy_matches_full_logits(monkeypatch, tmp_path):
    """LinearCrossEntropy in both of its modes, the gradient stored by the forward (up to model.LOGITS_CHUNK logits)
    and chunks of tokens with a recomputing backward (above): the per-token losses and gradients of
    F.cross_entropy on the full (tokens, vocab) logits, and no gradient work when none is wanted."""
    import model as model_py
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    t[[0, 5, 36]] = -100
    for chunk in (8, 37):  # chunked; stored
        assert torch.autograd.gradcheck(lambda h, w: model_py.LinearCrossEntropy.apply(h, w, t, chunk), (h, w))

    hf = make_hf("qwen2_untied", tmp_path)
    ours = convert.load_model(str(tmp_path))
    idx = tokens(hf.config.vocab_size, B=3, T=21)
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[1, :4] = -100
    masks = {"hidden_z": (torch.arange(48) % 5 != 0).float(), "intermediate_z": torch.rand(3, 64, generator=g)}
    weights = torch.linspace(0.5, 2, y.numel()).view_as(y)  # uneven per-token weights

    def run(reference=False):
        ours.zero_grad()
        if reference:
            logits = ours(x, masks=masks).float()
            tok = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none").view_as(y)
        else:
            tok = ours(x, y, masks=masks, reduction="none")
        (tok * weights).sum().backward()
        return tok.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    ref, ref_grads = run(reference=True)
    for chunk in (model_py.LOGITS_CHUNK, 7 * hf.config.vocab_size):  # stored; chunks of 7 tokens, the last short
        monkeypatch.setattr(model_py, "LOGITS_CHUNK", chunk)
        tok, grads = run()
        torch.testing.assert_close(tok, ref, atol=1e-6, rtol=1e-6)
        assert tok[1, :4].eq(0).all()
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{chunk} {n}: {m}")
        with torch.no_grad():
            torch.testing.assert_close(ours(x, y, masks=masks, reduction="none"), ref, atol=1e-6, rtol=1e-6)


def test_cross_entropy_under_autocast():
    """Under bf16 autocast the logits are bf16 matmuls, as F.linear's; the chunks' logits are recomputed in the
    backward exactly as in the forward."""
    import model as model_py
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 32, generator=g)
    w = torch.randn(300, 32, generator=g) * 3  # large logits: bf16 vs fp32 recomputation would be ~9% off
    t = torch.randint(0, 300, (40,), generator=g)
    out = []
    for chunk in (0, 7, 40):  # F.cross_entropy on the full logits; chunks of 7 tokens; the gradient stored
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunk:
                loss = model_py.LinearCrossEntropy.apply(hh, ww, t, chunk)
            else:
                loss = torch.nn.functional.cross_entropy((hh @ ww.T).float(), t, reduction="none")
        loss.sum().backward()
        out.append((loss.detach(), hh.grad, ww.grad))
    for other in out[1:]:
        for a, b in zip(out[0], other):  # the same up to the order of bf16 sums
            assert (b - a).abs().max() <= 0.01 * a.abs().max()


@pytest.mark.parametrize("kw", [dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True),
                                dict(model_type="qwen2", num_key_value_heads=1, attention_bias=True),
                                dict(model_type="gpt_neox", hidden_act="gelu", attention_bias=True, mlp_bias=True)])
def test_matmul_params_count_the_linear_weights(kw):
    # the MFU numerator: every nn.Linear weight once (a tied lm_head is the embedding, counted once), no biases
    cfg = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, **kw)
    model = Transformer(cfg)
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert cfg.matmul_params() == sum(linear.values())
    assert cfg.flops_per_token(16) == 6 * sum(linear.values()) + 12 * 3 * 4 * 8 * 16


def test_distillation_loss(monkeypatch, tmp_path):
    """distill_loss: alpha = 0 is the cross-entropy of LinearCrossEntropy (values and gradients); otherwise
    (1 - a) CE + a T^2 KL(teacher || student) computed on the full logits, in chunks or not; a student equal to its
    teacher has no KL; the teacher gets no gradient."""
    import model as model_py
    make_hf("llama_gqa", tmp_path / "s")
    make_hf("llama_gqa", tmp_path / "t", seed=1)
    student = convert.load_model(str(tmp_path / "s"))
    teacher = convert.load_model(str(tmp_path / "t"))
    teacher.requires_grad_(False)
    idx = tokens(256, B=2, T=17)
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[0, :3] = -100

    def run(alpha, temperature, reference=False):
        student.zero_grad()
        with torch.no_grad():
            ht = teacher.hidden(x)
        if reference:  # the formula on the full logits
            zs, zt = student(x).float(), teacher(x).float()
            ce = F.cross_entropy(zs.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none").view_as(y)
            kl = (F.softmax(zt / temperature, -1) * (F.log_softmax(zt / temperature, -1) -
                                                     F.log_softmax(zs / temperature, -1))).sum(-1)
            loss = torch.where(y != -100, (1 - alpha) * ce + alpha * temperature ** 2 * kl, 0.0)
        else:
            loss, ce = student(x, y, reduction="none", teacher=(ht, teacher.lm_head.weight, alpha, temperature))
        loss.sum().backward()
        return loss.detach(), ce.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}

    plain = student(x, y, reduction="none")
    plain.sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    loss, ce, grads = run(0.0, 1.0)
    torch.testing.assert_close(loss, plain.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ce, plain.detach(), atol=1e-6, rtol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads[n], plain_grads[n], atol=1e-6, rtol=1e-5)
    for alpha, temperature in ((0.7, 2.0), (0.5, 1.0)):
        ref, _, ref_grads = run(alpha, temperature, reference=True)
        for chunk in (model_py.LOGITS_CHUNK, 5 * 256):  # gradient kept by the forward; chunks of 5, recomputed
            monkeypatch.setattr(model_py, "LOGITS_CHUNK", chunk)
            loss, ce, grads = run(alpha, temperature)
            torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ce, plain.detach(), atol=1e-6, rtol=1e-6)  # the CE part, for the weighter
            for n in grads:
                torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5,
                                           msg=lambda m: f"{alpha} {temperature} {chunk} {n}: {m}")
    g = torch.Generator().manual_seed(0)
    h, w = (torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (11, 30))
    ht, wt = torch.randn(11, 6, generator=g, dtype=torch.float64), torch.randn(30, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 30, (11,), generator=g)
    t[3] = -100
    for chunk in (4, 11):
        assert torch.autograd.gradcheck(lambda h, w: model_py.LinearDistill.apply(h, w, ht, wt, t, 0.6, 1.5, chunk)[0],
                                        (h, w))
    assert all(p.grad is None for p in teacher.parameters())
    with torch.no_grad():  # the teacher as its own student: alpha = 1 leaves only the KL, which is 0
        self_kd, _ = teacher(x, y, reduction="none", teacher=(teacher.hidden(x), teacher.lm_head.weight, 1.0, 1.0))
    assert self_kd.abs().max() < 1e-5
