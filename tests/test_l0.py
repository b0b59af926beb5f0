"""L0 masks, the Lagrangian, masked forward and exact compaction (model.prune) against Hugging Face.

    pytest -q tests/test_l0.py
"""

import math

import pytest
import torch
import transformers
from conftest import make_hf

import convert
from l0 import HardConcrete, L0Module, TargetShape, mask_generator, prunable_params
from model import ModelConfig, Transformer, prune_state_dict

LLAMA2_7B = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32)
LLAMA2_13B = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                         num_hidden_layers=40, num_attention_heads=40)
QWEN2_7B = ModelConfig(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, attention_bias=True)
SMALL = ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4)
# Sheared-LLaMA targets (d, H, L, I), MHA
TARGETS = {"1.3b": (2048, 16, 24, 5504), "2.7b": (2560, 20, 32, 6912), "370m": (1024, 8, 24, 2816)}


def target(name):
    d, h, L, i = TARGETS[name]
    return TargetShape(hidden_size=d, num_hidden_layers=L, num_attention_heads=h, num_key_value_heads=h,
                       intermediate_size=i)


# -----------------------------------------------------------------------------
# the numbers of the original implementation (hard-concrete constants, sizes, sparsities)

@pytest.mark.parametrize("log_alpha,s", [(4.605170, 0.9979823), (0.0, 0.8318222), (-4.605170, 0.0471298),
                                         (-1.598597, 0.5)])
def test_prob_nonzero(log_alpha, s):
    hc = HardConcrete((1,), init_log_alpha=log_alpha)
    assert abs(float(hc.prob_nonzero().detach()) - s) < 1e-6


def test_prunable_sizes_and_target_sparsity():
    assert prunable_params(LLAMA2_7B) == 6_476_005_376
    assert prunable_params(LLAMA2_13B) == 12_687_769_600
    expected = {"1.3b": (1_214_251_008, 0.8125), "2.7b": (2_537_553_920, 0.6081606),
                "370m": (308_281_344, 0.9523964)}
    for name, (size, sparsity) in expected.items():
        assert prunable_params(LLAMA2_7B, target(name)) == size
        assert abs(L0Module(LLAMA2_7B, target(name)).final_sparsity - sparsity) < 1e-6
    assert abs(L0Module(LLAMA2_13B, target("2.7b")).final_sparsity - 0.8) < 1e-12
    # GQA: attention params counted from the real q/k/v/o shapes; one unit = one key/value group
    assert prunable_params(QWEN2_7B) == 6_525_288_448


@pytest.mark.parametrize("name,hidden,head,inter,layer", [("1.3b", 0.5, 0.5, 0.5, 0.25),
                                                          ("2.7b", 0.375, 0.375, 0.3720930, 0.0),
                                                          ("370m", 0.75, 0.75, 0.7441860, 0.25)])
def test_per_mask_target_sparsity(name, hidden, head, inter, layer):
    t = L0Module(LLAMA2_7B, target(name)).target_sparsity(10**9)
    for m, v in (("hidden", hidden), ("head", head), ("intermediate", inter), ("layer", layer)):
        if v == 0:  # the target keeps every unit: not pruned at all
            assert m not in t
        else:
            assert abs(t[m] - v) < 1e-6


def test_qwen2_targets():
    t = TargetShape(hidden_size=1536, num_hidden_layers=28, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=8960)
    l0 = L0Module(QWEN2_7B, t, masks=("head", "intermediate", "hidden", "layer"))
    s = l0.target_sparsity(10**9)
    assert abs(s["head"] - 0.5) < 1e-6 and abs(s["intermediate"] - 0.5270270) < 1e-6
    assert abs(s["hidden"] - 0.5714286) < 1e-6 and "layer" not in s  # 28 -> 28 layers: not pruned
    # the original logs 0.7998453 here because it takes head_dim = 1536 // 14 = 109; the real head_dim is 128
    assert abs(l0.final_sparsity - (1 - 1536 * 28 * (16 * 128 * 2 + 3 * 8960) / 6_525_288_448)) < 1e-12


def test_expected_sparsity_at_init():
    s = 0.9979823  # every gate's P(z > 0) at init
    l0 = L0Module(LLAMA2_7B, target("1.3b"))  # all four mask types pruned: 1 - s^3
    st = l0.stats(0)
    assert abs(st["expected_sparsity"] - 0.0060410) < 1e-6
    assert abs(st["expected_num_params"] / 6_436_884_109 - 1) < 1e-6  # float32 sums over 11008-wide rows
    for m in ("layer", "head", "intermediate", "hidden"):
        assert abs(st[f"expected_{m}_sparsity"] - 0.0020177) < 1e-6
    # 2.7b keeps all 32 layers: the layer mask is not pruned and counts as 1, so 1 - s^2
    st = L0Module(LLAMA2_7B, target("2.7b")).stats(0)
    assert abs(st["expected_sparsity"] - (1 - s**2)) < 1e-6 and "expected_layer_sparsity" not in st
    assert abs(st["final_sparsity"] - 0.6081606) < 1e-6 and st["target_sparsity"] == st["final_sparsity"]


def test_schedule_warmup():
    l0 = L0Module(LLAMA2_7B, target("1.3b"), warmup_steps=640)
    assert l0.target_sparsity(0)["hidden"] == 0
    assert abs(l0.target_sparsity(320)["hidden"] - 0.25) < 1e-12
    assert l0.target_sparsity(640) == l0.target_sparsity(10_000)
    assert abs(l0.stats(320)["target_sparsity"] - 0.8125 / 2) < 1e-9


# -----------------------------------------------------------------------------
# masks and the Lagrangian

def test_deterministic_masks_exact_and_tie_break():
    cfg = ModelConfig(vocab_size=10, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4)
    t = TargetShape(hidden_size=20, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=7)
    l0 = L0Module(cfg, t)
    masks = l0.deterministic_masks()  # all log_alpha equal: ties go to the lower index
    assert masks["hidden_z"].tolist() == [1.0] * 20 + [0.0] * 12
    assert masks["layer_z"].tolist() == [1, 1, 1, 0]
    with torch.no_grad():
        for z in l0.z.values():
            z.log_alpha.normal_()
    masks = l0.deterministic_masks()
    assert set(torch.cat([m.flatten() for m in masks.values()]).tolist()) == {0.0, 1.0}
    assert masks["layer_z"].sum() == 3 and masks["hidden_z"].sum() == 20
    assert (masks["head_z"].sum(-1) == 2).all() and (masks["intermediate_z"].sum(-1) == 7).all()
    # the kept units are the largest log_alpha
    la = l0.z["intermediate"].log_alpha
    for row in range(4):
        kept, dropped = la[row][masks["intermediate_z"][row] == 1], la[row][masks["intermediate_z"][row] == 0]
        assert kept.min() >= dropped.max()


def test_samples_in_range_and_reproducible():
    hc = HardConcrete((1000,), init_log_alpha=0.0)
    a = hc.sample(torch.rand(1000, generator=torch.Generator().manual_seed(1)))
    b = hc.sample(torch.rand(1000, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(a, b) and a.min() == 0 and a.max() == 1  # exact zeros and ones occur (the stretch)
    assert abs(float((a > 0).float().mean()) - float(hc.prob_nonzero().detach()[0])) < 0.05


def test_gradients_reach_log_alpha(tmp_path):
    make_hf("llama_gqa", tmp_path)
    model = convert.load_model(str(tmp_path))
    t = TargetShape(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                    intermediate_size=40)
    l0 = L0Module(model.config, t)
    with torch.no_grad():
        for z in l0.z.values():
            z.log_alpha.fill_(0.5)  # away from the saturated start, so most samples are fractional
    idx = torch.randint(0, 256, (2, 9))
    loss = model(idx[:, :-1], idx[:, 1:], masks=l0(torch.Generator().manual_seed(0))) + l0.lagrangian(5)
    loss.backward()
    for m, z in l0.z.items():
        assert z.log_alpha.grad is not None and z.log_alpha.grad.abs().sum() > 0, m


def _drive(l0, steps, lr=0.05):
    """Run the Lagrangian alone (no data loss) for `steps` Adam steps; return the largest |lambda| seen."""
    opt = torch.optim.Adam([{"params": [z.log_alpha for z in l0.z.values()], "lr": lr},
                            {"params": list(l0.lambdas.values()), "lr": lr}])
    biggest = 0.0
    for step in range(steps):
        opt.zero_grad()
        l0.lagrangian(step).backward()
        opt.step()
        l0.constrain_()
        biggest = max(biggest, max(abs(float(v.detach())) for v in l0.lambdas.values()))
    return biggest


def test_lagrangian_drives_sparsity_to_target():
    cfg = SMALL
    t = TargetShape(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48)
    l0 = L0Module(cfg, t, warmup_steps=100)
    _drive(l0, 600)
    st = l0.stats(600)
    for m in l0.names:
        assert abs(st[f"expected_{m}_sparsity"] - st[f"target_{m}_sparsity"]) < 0.02, (m, st)
    assert abs(st["expected_sparsity"] - st["target_sparsity"]) < 0.03
    assert any(abs(v) > 0.01 for k, v in st.items() if k.startswith("lambda_"))  # the lambdas moved


def test_lambda_gradient_is_reversed():
    l0 = L0Module(LLAMA2_7B, target("1.3b"))
    l0.lagrangian(10**6).backward()
    # expected sparsity (~0) is below the target: the gap s - t < 0, so ascent on lambda_1 lowers it
    assert l0.lambdas["lambda_1_hidden"].grad > 0  # the optimizer's descent step moves lambda_1 down


def test_expected_masks_follow_the_current_size():
    cfg = SMALL
    t = TargetShape(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48)
    l0 = L0Module(cfg, t, warmup_steps=100).eval()
    masks = l0()  # eval mode: the expected-size masks, binary
    assert masks.keys() == l0.deterministic_masks().keys()
    for m in l0.names:  # at init P(z > 0) = 0.998: (almost) every unit is kept
        z, n = masks[f"{m}_z"], l0.z[m].log_alpha.shape[-1]
        assert set(z.unique().tolist()) <= {0.0, 1.0}
        assert (z.sum(-1) >= n - math.ceil(0.003 * n)).all(), m
        torch.testing.assert_close(z.sum(-1), (l0.z[m].prob_nonzero().sum(-1)).round().detach())
    # the count per row follows the gates, the units kept are the largest log_alpha
    with torch.no_grad():
        l0.z["intermediate"].log_alpha[0, :100] = -4.0
        l0.z["intermediate"].log_alpha[0, 100] = 3.0
    z = l0.expected_masks()["intermediate_z"]
    assert z[0, :100].sum() < 20 and z[0, 100:].all() and z[1:].sum(-1).eq(128).all()
    l0.train()
    _drive(l0, 600)  # once the Lagrangian has driven the gates to the target, they are the deterministic masks
    exp, det = l0.expected_masks(), l0.deterministic_masks()
    for k in det:
        assert torch.equal(exp[k], det[k]), k


def test_landing_closes_the_gap_and_keeps_the_order():
    """Gates far from the target in both directions (as a short run leaves them): the landing closes each row's gap
    linearly over its first half and holds it exactly (fp32) in the second, without reordering any row's units;
    the expected-size masks are then the compaction's masks."""
    t = TargetShape(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48)
    l0 = L0Module(SMALL, t, steps=20, landing_steps=8, values="soft")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for z in l0.z.values():
            z.log_alpha.copy_((3 * torch.randn(z.log_alpha.shape, generator=g)).clamp(-4.6, 4.6))
    before = {m: l0.z[m].log_alpha.detach().clone() for m in l0.names}
    gap = lambda: {m: (1 - l0.z[m].prob_nonzero().sum(-1) / l0.z[m].log_alpha.shape[-1]  # noqa: E731
                       - l0.target_sparsity(20)[m]).abs().max().item() for m in l0.names}
    start = gap()
    assert min(start.values()) > 0.05 and not any(l0.landing(s) for s in range(12))
    for step in range(20):
        l0.land_(step)  # a no-op before step 12
        if step == 11:
            assert gap() == start
        if step in (12, 13, 14):  # 1/4, 1/3, 1/2 of what is left: 3/4, 1/2, 1/4 of the gap remain
            for m, v in gap().items():
                assert abs(v - start[m] * (15 - step) / 4) < 1e-6 * max(1, start[m]), (step, m)
        if step >= 15:
            assert max(gap().values()) < 1e-6, step  # (log_alpha is fp32)
    for m in l0.names:  # a shift per row, then the clamp: a unit above another never falls below it
        n = before[m].shape[-1]
        a, b = before[m].reshape(-1, n), l0.z[m].log_alpha.detach().reshape(-1, n)
        above = a[:, :, None] > a[:, None, :]
        assert (b[:, :, None] >= b[:, None, :])[above].all(), m
    exp, det = l0.expected_masks(), l0.deterministic_masks()
    assert all(torch.equal(exp[k], det[k]) for k in det)


def test_landing_temperature_schedule_and_near_binary_samples():
    """The temperature is 2/3 until the landing, falls linearly to landing_temperature over its first half, then
    stays; the lower it is, the fewer samples fall strictly between 0 and 1."""
    t = TargetShape(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48)
    l0 = L0Module(SMALL, t, steps=20, landing_steps=8, landing_temperature=0.2)
    betas = [l0.temperature(s) for s in range(22)]
    assert betas[:12] == [2 / 3] * 12 and betas[15:] == [0.2] * 7
    assert betas[12:15] == pytest.approx([2 / 3 - (2 / 3 - 0.2) * k / 4 for k in (1, 2, 3)])
    hc = HardConcrete((100000,), init_log_alpha=3.0)
    u = torch.rand(100000, generator=torch.Generator().manual_seed(0))
    fuzzy = lambda: float(((hc.sample(u) > 0) & (hc.sample(u) < 1)).float().mean())  # noqa: E731
    at_two_thirds = fuzzy()
    hc.temperature = 0.2
    assert at_two_thirds > 0.15 and fuzzy() < at_two_thirds / 3
    with pytest.raises(ValueError, match="landing_temperature"):
        L0Module(SMALL, t, steps=20, landing_steps=8, landing_temperature=1.0)


def test_landing_out_of_reach_keeps_the_ranking():
    """A row that keeps 1530 of 1536 units cannot reach sum P = 1530 at temperature 0.2 (P <= 0.994 per unit): the
    shift stops before the clamp ties every unit at the top, so the least important unit is still the one dropped."""
    cfg = ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=4)
    t = TargetShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                    intermediate_size=1530)
    l0 = L0Module(cfg, t, steps=4, landing_steps=2, landing_temperature=0.2)
    with torch.no_grad():
        la = l0.z["intermediate"].log_alpha
        la.copy_(torch.linspace(4.6, 2.0, 1536).expand_as(la))
        la[:, 0] = math.log(0.01)  # clearly the least important
    for step in range(4):
        l0.land_(step)
    drop = l0.deterministic_masks()["intermediate_z"] == 0
    assert drop[:, 0].all() and (drop.sum(-1) == 6).all()
    assert l0.z["intermediate"].log_alpha[:, 0].max() < l0.z["intermediate"].log_alpha[:, 1:].min()


def test_mask_type_kept_whole_is_not_pruned_and_lambdas_stay_bounded():
    # LLaMA-2-7B -> 2.7b keeps all 32 layers; here 6 -> 6. A layer mask would have lambda_1 growing forever.
    cfg = SMALL
    t = TargetShape(hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48)
    l0 = L0Module(cfg, t, warmup_steps=100)
    assert l0.names == ["head", "intermediate", "hidden"] and "layer" not in l0.z
    assert not any("layer" in k for k in l0.lambdas) and "layer_z" not in l0.eval()()
    l0.train()
    assert _drive(l0, 2000) < 20  # every lambda settles once its gap closes
    st = l0.stats(2000)
    assert abs(st["expected_sparsity"] - st["final_sparsity"]) < 0.03
    with pytest.raises(ValueError, match="nothing to prune"):
        L0Module(cfg, TargetShape.of(cfg))


def test_masks_per_micro_batch_are_keyed_by_seed_step_row():
    cfg = ModelConfig(vocab_size=10, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4)
    t = TargetShape(hidden_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=7)
    l0 = L0Module(cfg, t)
    with torch.no_grad():
        for z in l0.z.values():
            z.log_alpha.fill_(0.0)  # fractional samples
    a, b = l0(mask_generator(1, 5, 8)), l0(mask_generator(1, 5, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same key, the same masks, on any rank
    for key in ((1, 5, 9), (1, 6, 8), (2, 5, 8)):  # another row, step or seed: other masks
        c = l0(mask_generator(*key))
        assert not torch.equal(a["intermediate_z"], c["intermediate_z"]), key
    # all masks' noise is one draw of the generator, split in mask order
    u = torch.rand(sum(z.log_alpha.numel() for z in l0.z.values()), generator=mask_generator(1, 5, 8))
    u = u.split([z.log_alpha.numel() for z in l0.z.values()])
    for m, um in zip(l0.names, u):
        assert torch.equal(a[f"{m}_z"], l0.z[m].sample(um.view_as(l0.z[m].log_alpha)))
    l0.all_reduce_grads_()  # one process: a no-op


def test_l0_refuses_reduced_precision():
    l0 = L0Module(LLAMA2_7B, target("1.3b")).to(torch.bfloat16)
    with pytest.raises(TypeError, match="keep it in float32"):
        l0(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="keep it in float32"):
        l0.lagrangian(0)


@pytest.mark.parametrize("kw,msg", [
    (dict(hidden_size=5000), "hidden_size=5000 must be"),
    (dict(num_attention_heads=12, num_key_value_heads=5), "must be num_key_value_heads x 2"),
    (dict(hidden_size=2001), "divisible by num_attention_heads"),
    (dict(num_hidden_layers=0), "num_hidden_layers=0"),
])
def test_invalid_targets(kw, msg):
    src = ModelConfig(vocab_size=10, hidden_size=4096, intermediate_size=100, num_hidden_layers=4,
                      num_attention_heads=32, num_key_value_heads=16)
    base = dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
                intermediate_size=50)
    with pytest.raises(ValueError, match=msg):
        L0Module(src, TargetShape(**{**base, **kw}))


def test_invalid_target_neox_and_masks():
    neox = ModelConfig(model_type="gpt_neox", vocab_size=10, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, attention_bias=True, mlp_bias=True)
    with pytest.raises(ValueError, match="GPT-NeoX needs"):
        TargetShape(hidden_size=40, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=64).validate(neox)
    t = TargetShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=64)
    with pytest.raises(ValueError, match="'hidden' is not among"):
        L0Module(neox, t, masks=("head", "intermediate"))
    with pytest.raises(ValueError, match="unknown pruning masks"):
        L0Module(neox, t, masks=("heads",))


# -----------------------------------------------------------------------------
# masked forward == compacted model == exported Hugging Face model

def random_target(cfg: ModelConfig, g: torch.Generator) -> TargetShape:
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    nkv = r(1, cfg.num_key_value_heads)
    nh = nkv * group
    if cfg.neox:
        d = nh * cfg.head_dim
    elif cfg.model_type == "llama":  # transformers' LlamaConfig wants hidden_size % heads == 0
        d = nh * r(max(1, cfg.hidden_size // (2 * nh)), cfg.hidden_size // nh)
    else:
        d = r(cfg.hidden_size // 2, cfg.hidden_size)
    return TargetShape(hidden_size=d, num_hidden_layers=r(1, cfg.num_hidden_layers), num_attention_heads=nkv * group,
                       num_key_value_heads=nkv, intermediate_size=r(1, cfg.intermediate_size))


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "qwen2", "qwen2_untied", "neox_parallel",
                                    "neox_sequential"])
@pytest.mark.parametrize("seed,values", [(0, "binary"), (1, "binary"), (0, "soft"), (1, "soft")])
def test_masked_equals_pruned_equals_hf(family, seed, values, tmp_path):
    """Kept values binary or soft (the gate values folded into the weights): MHA, GQA with tied embeddings,
    Qwen2's biases tied and untied, GPT-NeoX's parallel and sequential residual with partial rotary."""
    make_hf(family, tmp_path / "src", seed=seed)
    model = convert.load_model(str(tmp_path / "src")).eval()
    g = torch.Generator().manual_seed(seed)
    t = random_target(model.config, g)
    l0 = L0Module(model.config, t, values=values).eval()
    with torch.no_grad():
        for z in l0.z.values():
            z.log_alpha.copy_(torch.randn(z.log_alpha.shape, generator=g))
    masks = l0.deterministic_masks()
    kept = torch.cat([m[m != 0] for m in masks.values()])
    assert (kept == 1).all() if values == "binary" else (kept < 0.99).any() and (kept > 0).all()
    idx = torch.randint(0, model.config.vocab_size, (2, 13), generator=g)
    small = model.prune(masks)
    assert [getattr(small.config, k) for k in t.__dataclass_fields__] == list(vars(t).values())
    convert.export_hf(small, str(tmp_path / "out"), tokenizer_src=str(tmp_path / "src"))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        masked = model(idx, masks=masks)
        torch.testing.assert_close(small(idx), masked, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf.eval()(idx).logits, masked, atol=1e-5, rtol=1e-5)
    assert small.num_params() < model.num_params()
    assert small.config.tie_word_embeddings == model.config.tie_word_embeddings


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2", "neox_parallel", "neox_sequential"])
def test_masked_equals_pruned_in_bf16(family, tmp_path):
    """Binary masks in bf16: the masked model and the compacted one compute bit-identical hidden states (norms apply
    weight and bias at the same precision on both paths). The logits agree to bf16 rounding: lm_head's matmul sums
    over d inputs on one path and over the kept ones on the other, and a CPU's bf16 kernels may block the two sums
    differently (AVX-512 does), so one logit in thousands can round to the neighbouring bf16 value."""
    make_hf(family, tmp_path)
    model = convert.load_model(str(tmp_path)).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    nkv = max(1, cfg.num_key_value_heads // 2)
    nh = nkv * (cfg.num_attention_heads // cfg.num_key_value_heads)
    d = nh * cfg.head_dim if cfg.neox else cfg.hidden_size // 2 // nh * nh
    t = TargetShape(hidden_size=d, num_hidden_layers=cfg.num_hidden_layers - 1, num_attention_heads=nh,
                    num_key_value_heads=nkv, intermediate_size=cfg.intermediate_size // 2)
    l0 = L0Module(cfg, t)
    with torch.no_grad():
        for z in l0.z.values():
            z.log_alpha.copy_(torch.randn(z.log_alpha.shape, generator=g))
    masks = l0.deterministic_masks()
    small = model.prune(masks).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    kept = masks["hidden_z"].nonzero().flatten()
    with torch.no_grad():
        h, h_small = model.hidden(idx, masks=masks), small.hidden(idx)
        assert torch.equal(h[..., kept], h_small) and not h.index_fill(-1, kept, 0).any()
        torch.testing.assert_close(model(idx, masks=masks), small(idx), rtol=2**-7, atol=2**-14)


def test_prune_state_dict_keeps_dtypes(tmp_path):
    make_hf("qwen2_untied", tmp_path)
    model = convert.load_model(str(tmp_path))
    cfg = model.config
    masks = {"head_z": torch.tensor([[1.0, 0, 1]] * 3), "intermediate_z": (torch.arange(64) % 2).float().repeat(3, 1)}
    sd = {k: v.to(torch.bfloat16) if "mlp" in k else v for k, v in model.state_dict().items()}
    new_cfg, out = prune_state_dict(cfg, sd, masks)
    assert new_cfg.num_key_value_heads == 2 and new_cfg.intermediate_size == 32
    assert all(out[k].dtype == (torch.bfloat16 if "mlp" in k else torch.float32) for k in out)
    assert out.keys() == Transformer.prune(model, masks).state_dict().keys()


@pytest.mark.parametrize("family", ["llama_bias", "qwen2_untied", "neox_sequential"])
def test_prune_folds_fractional_kept_values(family, tmp_path):
    """Kept mask values need not be 1: layer/head/channel/hidden scales are folded exactly (biases included)."""
    make_hf(family, tmp_path)
    model = convert.load_model(str(tmp_path)).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    u = lambda *s: 0.5 + torch.rand(*s, generator=g)
    masks = {"layer_z": u(cfg.num_hidden_layers), "head_z": u(cfg.num_hidden_layers, cfg.num_key_value_heads),
             "intermediate_z": u(cfg.num_hidden_layers, cfg.intermediate_size), "hidden_z": u(cfg.hidden_size)}
    masks["layer_z"][0] = 0
    masks["intermediate_z"][:, :3] = 0
    if cfg.num_key_value_heads > 1:
        masks["head_z"][:, 0] = 0
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    masks["hidden_z"][:group * cfg.head_dim if cfg.neox else 4] = 0  # GPT-NeoX: hidden = heads x head_dim
    idx = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.prune(masks)(idx), model(idx, masks=masks), atol=1e-5, rtol=1e-5)


def test_all_ones_masks_equal_no_masks(tmp_path):
    for family in ("llama_gqa", "neox_parallel"):
        make_hf(family, tmp_path / family)
        model = convert.load_model(str(tmp_path / family)).eval()
        cfg = model.config
        ones = {"layer_z": torch.ones(cfg.num_hidden_layers), "hidden_z": torch.ones(cfg.hidden_size),
                "head_z": torch.ones(cfg.num_hidden_layers, cfg.num_key_value_heads),
                "intermediate_z": torch.ones(cfg.num_hidden_layers, cfg.intermediate_size)}
        idx = torch.randint(0, cfg.vocab_size, (2, 7))
        with torch.no_grad():
            torch.testing.assert_close(model(idx, masks=ones), model(idx))


def test_prune_rejects_non_uniform_masks(tmp_path):
    make_hf("llama", tmp_path)
    model = convert.load_model(str(tmp_path))
    head_z = torch.ones(2, 4)
    head_z[0, 0] = 0
    with pytest.raises(ValueError, match="same, non-zero number"):
        model.prune({"head_z": head_z})
    with pytest.raises(ValueError, match="expected"):
        model.prune({"hidden_z": torch.ones(3)})


def test_prune_and_masks_edge_cases(tmp_path):
    make_hf("llama_gqa", tmp_path)
    model = convert.load_model(str(tmp_path))
    cfg = model.config
    with pytest.raises(ValueError, match="unknown masks"):
        model.prune({"heads_z": torch.ones(3, 2)})
    hidden_z = torch.ones(cfg.hidden_size)
    hidden_z[:4] = 0  # 44 kept dims over 6 heads: transformers' LlamaConfig would refuse the export
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        model.prune({"hidden_z": hidden_z})
    # a training sample may close every hidden gate: the masked norms give zeros, not NaN
    idx = torch.randint(0, cfg.vocab_size, (1, 5))
    assert torch.isfinite(model(idx[:, :-1], idx[:, 1:], masks={"hidden_z": torch.zeros(cfg.hidden_size)}))


def test_importance_ranks_zeroed_units_last_and_is_deterministic(tmp_path):
    """activation_importance on a tiny GQA model where one unit of each kind was zeroed: that unit ranks last in
    its row and gets the lowest log_alpha; the same batches give the same scores; log_alpha stays in range."""
    from l0 import activation_importance
    make_hf("llama_gqa", tmp_path)  # 3 layers, hidden 48, 6 query / 2 key-value heads (group 3, head_dim 16), MLP 80
    model = convert.load_model(str(tmp_path))
    sd = model.state_dict()  # shares the parameters' storage
    with torch.no_grad():
        sd["model.layers.0.mlp.gate_proj.weight"][17] = 0  # MLP channel 17 of layer 0: act(0) * up = 0
        sd["model.layers.1.self_attn.v_proj.weight"][16:32] = 0  # key/value group 1 of layer 1: zero values
        for i in range(3):  # hidden dimension 5: every block norm writes 0 there
            sd[f"model.layers.{i}.input_layernorm.weight"][5] = 0
            sd[f"model.layers.{i}.post_attention_layernorm.weight"][5] = 0
        sd["model.layers.2.self_attn.o_proj.weight"].zero_()  # layer 2 adds nothing to the residual stream
        sd["model.layers.2.mlp.down_proj.weight"].zero_()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (2, 24), generator=g),) * 2 for _ in range(3)]
    scores = activation_importance(model, batches)
    again = activation_importance(model, batches)
    assert all(torch.equal(scores[k], again[k]) for k in scores)
    target = TargetShape(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                         intermediate_size=40)
    l0 = L0Module(model.config, target)
    ranks = l0.init_from_importance(scores)
    assert ranks["intermediate"][0].argmax() == 17 and ranks["head"][1].argmax() == 1
    assert ranks["hidden"].argmax() == 5 and ranks["layer"].argmax() == 2
    la = {m: l0.z[m].log_alpha for m in l0.names}
    assert la["intermediate"][0].argmin() == 17 and la["hidden"].argmin() == 5 and la["layer"].argmin() == 2
    assert all(((v >= math.log(100) - 3 - 1e-6) & (v <= math.log(100))).all() for v in la.values())
    # compaction with gates that never moved drops the least important units
    m = l0.deterministic_masks()
    assert m["intermediate_z"][0, 17] == 0 and m["hidden_z"][5] == 0 and m["layer_z"][2] == 0 and m["head_z"][1, 1] == 0


@pytest.mark.parametrize("src", ["llama2_7b", "qwen2_7b", "neox", "tiny_gqa"])
def test_target_from_a_parameter_budget(src):
    from l0 import total_params
    cfg = {"llama2_7b": LLAMA2_7B, "qwen2_7b": QWEN2_7B, "tiny_gqa": SMALL,
           "neox": ModelConfig(model_type="gpt_neox", vocab_size=50304, hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=24, num_attention_heads=16, partial_rotary_factor=0.25)}[src]
    full = total_params(cfg)
    for frac in (0.3, 0.45, 0.6, 0.8):
        shape = TargetShape.from_budget(cfg, frac)
        shape.validate(cfg)  # expressible by the family, never larger than the source
        n = total_params(cfg, shape)
        assert abs(n / (frac * full) - 1) < (0.05 if src != "tiny_gqa" else 0.15), (frac, shape, n / full)
        assert shape == TargetShape.from_budget(cfg, frac * full)  # a fraction or a count: the same
    if src == "llama2_7b":  # Sheared-LLaMA's shapes, at their parameter counts (1.345B, 2.702B)
        assert TargetShape.from_budget(cfg, 1.345e9) == TargetShape(2048, 24, 16, 16, 5504)
        assert TargetShape.from_budget(cfg, 2.7e9) == TargetShape(2560, 32, 20, 20, 6912)
    with pytest.raises(ValueError, match="either target_params or"):
        TargetShape.resolve(cfg, target_params=0.5, target_hidden_size=256)
