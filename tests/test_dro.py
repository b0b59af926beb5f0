"""dro.py: the chi^2-ball DRO step against the paper's numbers and an independent convex solver, the Sheared-LLaMA
update, the scaling-law fits, the weighter's schedules and state, the reference-loss CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import curve_fit, minimize

import dro
from dro import DomainWeighter, chi2_divergence, fit_power_law, fit_scaling_law, solve_chi2_ball

ROOT = Path(__file__).resolve().parents[1]

# the original DRPruning setup: RedPajama proportions and the LLaMA-2 1.3b reference losses,
# domains [cc, github, book, stackexchange, wiki, arxiv, c4]
NAMES = ["cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4"]
P = np.array([0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15])
REF = np.array([1.9643, 0.7459, 2.1393, 1.6117, 1.7590, 1.4449, 2.1251])
LOSS = REF + np.array([0.1, 0, 0.2, 0, 0, 0, 0])


def slsqp(excess, p, rho, min_prob=0.0, fixed=None):
    """Independent solver: max q.excess s.t. 1/2 sum p (q/p-1)^2 <= rho, sum q = 1, q >= min_prob*p, with SLSQP.
    `fixed` (bool mask) pins those q_g to p_g."""
    fixed = np.zeros(len(p), dtype=bool) if fixed is None else fixed
    cons = [{"type": "eq", "fun": lambda q: q.sum() - 1, "jac": lambda q: np.ones_like(q)},
            {"type": "ineq", "fun": lambda q: rho - 0.5 * np.sum((q - p) ** 2 / p), "jac": lambda q: -(q - p) / p}]
    bounds = [(pi, pi) if f else (min_prob * pi, 1.0) for pi, f in zip(p, fixed)]
    e = np.where(fixed, 0.0, excess)
    res = minimize(lambda q: -q @ e, p.copy(), jac=lambda q: -e, bounds=bounds, constraints=cons, method="SLSQP",
                   options=dict(ftol=1e-15, maxiter=1000))
    return res.x


def random_instance(rng):
    k = int(rng.integers(2, 12))
    p = rng.dirichlet(np.ones(k))
    e = rng.normal(size=k) * rng.choice([1e-3, 1.0, 10.0]) + rng.normal()
    rho = float(rng.choice([1e-3, 0.01, 0.1, 0.5, 2.0, 20.0]))
    return e, p, rho


# -----------------------------------------------------------------------------
# numbers of the original Sheared-LLaMA / DRPruning update rules

def test_sheared_and_bandit_match_original():
    np.testing.assert_allclose(dro.sheared_update(P, LOSS, REF),
                               [0.685290, 0.041660, 0.050881, 0.018524, 0.041660, 0.023151, 0.138834], atol=1e-3)
    np.testing.assert_allclose(dro.sheared_update(P, LOSS, REF, bandit=True),
                               [0.247193, 0.119729, 0.146234, 0.116773, 0.119729, 0.117359, 0.132983], atol=1e-3)


def test_sheared_clip_is_the_paper_form():
    below = LOSS.copy()
    below[1] -= 0.5  # github well below its reference
    paper, released = dro.sheared_update(P, below, REF), dro.sheared_update(P, below, REF, clip=False)
    np.testing.assert_allclose(paper, dro.sheared_update(P, LOSS, REF), atol=1e-12)  # max(delta, 0): as if at ref
    assert released[1] < paper[1] * 0.7  # the released code takes weight away from it
    w = DomainWeighter(NAMES, P, "sheared", REF)
    np.testing.assert_allclose(w.update(10, val_losses=below), paper, atol=1e-12)  # the weighter defaults to the paper


def test_dro_matches_original():
    q = solve_chi2_ball(LOSS - REF, P, 0.1, min_prob=0.2, clamp_to_min_p=True)
    np.testing.assert_allclose(q, [0.78205, 0.01936, 0.08986, 0.01936, 0.01936, 0.01936, 0.05064], atol=1e-3)
    q = solve_chi2_ball(LOSS - REF, P, 0.1, min_prob=0.2, clamp_to_min_p=False)
    np.testing.assert_allclose(q, [0.80779, 0.01569, 0.09282, 0.00697, 0.01569, 0.00872, 0.05231], atol=1e-3)
    # q/p = t*(e - eta) above the floor: the ratio of book (e=0.2) to a zero-excess domain gives eta* = -0.0407
    ratio = (q[2] / P[2]) / (q[1] / P[1])
    assert abs(-0.2 / (ratio - 1) - (-0.0407)) < 1e-3
    assert abs(chi2_divergence(q, P) - 0.1) < 1e-9


def test_dyall_step_matches_original():
    w = DomainWeighter(NAMES, P, "dro+eval+dyall", REF, rho=0.1, min_prob=0.2, clamp_to_min_p=True)
    q = w.update(40, max_steps=100, val_losses=LOSS)  # 40% of training: past the 20% DyAll start
    np.testing.assert_allclose(q, [0.78205, 0.01936, 0.08986, 0.01936, 0.01936, 0.01936, 0.05064], atol=1e-3)
    ratio = [w.stats()[f"ref_ratio/{n}"] for n in NAMES]
    np.testing.assert_allclose(ratio, [0.67755, 0.04291, 0.05004, 0.02023, 0.04291, 0.02471, 0.14164], atol=1e-3)
    before = DomainWeighter(NAMES, P, "dro+eval+dyall", REF)
    before.update(10, max_steps=100, val_losses=LOSS)  # 10% < 20%: the reference mixture does not move yet
    np.testing.assert_allclose(before.ratio, P / P.sum(), atol=1e-15)


def test_target_loss_too_high():
    loss = REF - 0.3
    loss[2] = REF[2] - 0.05
    excess, times = dro.rescaled_excess(loss, REF)
    assert times == 9  # the original's rescale loop stops at refs x 0.9
    legacy = DomainWeighter(NAMES, P, "dro+eval", REF, rescale_reference=True).update(0, val_losses=loss)
    np.testing.assert_allclose(legacy, solve_chi2_ball(loss - 0.9 * REF, P, 0.1, 0.2, True), atol=1e-12)
    # default: no rescale. The problem only sees excess up to a constant, so all-negative excess is no special case
    ours = DomainWeighter(NAMES, P, "dro+eval", REF).update(0, val_losses=loss)
    np.testing.assert_allclose(ours, solve_chi2_ball(loss - REF + 0.3, P, 0.1, 0.2, True), atol=1e-12)
    assert np.argmax(np.array(ours) / P) == 2  # book, the one domain near its reference, gains the most
    np.testing.assert_allclose(solve_chi2_ball(loss - REF, P, 0.1), slsqp(loss - REF, P, 0.1), atol=1e-6)


LLAMA2_N = [6738415616, 13015864320, 68976648192]
LLAMA2_LOSSES = [[1.7520, 1.6680, 1.4621], [.6216, .5791, .4890], [1.9063, 1.8242, 1.6450], [1.4482, 1.3936, 1.2805],
                 [1.4844, 1.3945, 1.2118], [1.2637, 1.2109, 1.1148], [1.9219, 1.8486, 1.6848]]
TARGETS = {  # name: (vocab, hidden, layers, intermediate), reference losses of the DRPruning scripts
    "1.3b": ((32000, 2048, 24, 5504), [1.9643, 0.7459, 2.1393, 1.6117, 1.7590, 1.4449, 2.1251]),
    "2.7b": ((32000, 2560, 32, 6912), [1.8712, 0.6883, 2.0325, 1.5353, 1.6297, 1.3560, 2.0328]),
    "370m": ((32000, 1024, 24, 2816), [2.1401, 0.8694, 2.3625, 1.7791, 2.0470, 1.6637, 2.3139]),
}
TARGET_N = {"1.3b": 1345423360, "2.7b": 2701560320, "370m": 373867520}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_llama2_reference_losses(target):
    (V, d, L, I), expected = TARGETS[target]
    n = 2 * V * d + L * (4 * d * d + 3 * d * I + 2 * d) + d  # the parameter count the reference losses were evaluated at
    assert n == TARGET_N[target]
    fits = [dro.fit_power_law(LLAMA2_N, row) for row in LLAMA2_LOSSES]
    np.testing.assert_allclose([a * n ** -b + c for a, b, c in fits], expected, atol=1e-4)


def test_power_law_fit_against_curve_fit():
    law = lambda n, a, b, c: a * n ** -b + c  # noqa: E731
    rng = np.random.default_rng(0)
    n = np.array([1e8, 4e8, 1.6e9, 7e9, 3e10])
    y = law(n, 406.4, 0.336, 0.69) + 1e-3 * rng.normal(size=n.size)  # over-determined, noisy
    a, b, c = fit_power_law(n, y)
    (a2, b2, c2), _ = curve_fit(law, n, y, p0=(406.4, 0.336, 0.69), maxfev=20000)
    rss = lambda *abc: np.sum((law(n, *abc) - y) ** 2)  # noqa: E731
    assert rss(a, b, c) <= rss(a2, b2, c2) * (1 + 1e-6)
    assert abs(law(2e9, a, b, c) - law(2e9, a2, b2, c2)) < 1e-5
    exact = fit_power_law(n, law(n, 406.4, 0.336, 0.69))
    np.testing.assert_allclose(exact, (406.4, 0.336, 0.69), rtol=1e-6)
    with pytest.raises(ValueError, match="do not follow"):
        fit_power_law([1e9, 2e9, 4e9], [1.0, 2.0, 3.0])  # loss grows with size


# -----------------------------------------------------------------------------
# the DRO step: properties and an independent solver

@pytest.mark.parametrize("min_prob", [0.0, 0.2, 0.5])
def test_dro_matches_independent_solver(min_prob):
    rng = np.random.default_rng(int(min_prob * 10))
    for _ in range(40):
        e, p, rho = random_instance(rng)
        np.testing.assert_allclose(solve_chi2_ball(e, p, rho, min_prob), slsqp(e, p, rho, min_prob), atol=1e-6)


def test_dro_properties():
    rng = np.random.default_rng(1)
    for _ in range(300):
        e, p, rho = random_instance(rng)
        m = float(rng.choice([0.0, 0.1, 0.2, 0.6]))
        q = solve_chi2_ball(e, p, rho, m)
        assert abs(q.sum() - 1) < 1e-12 and np.all(q >= m * p * (1 - 1e-12))
        assert chi2_divergence(q, p) <= rho * (1 + 1e-9)
        # the constraint binds unless the most concentrated mixture fits in the ball: then q sits on the sphere
        top = np.argmax(e)
        concentrated = m * p
        concentrated[top] += 1 - m
        if chi2_divergence(concentrated, p) > rho:
            assert abs(chi2_divergence(q, p) - rho) < 1e-9 * max(rho, 1)
        else:
            np.testing.assert_allclose(q, concentrated, atol=1e-12)
        ratio = q / p  # more weight, relative to p, to larger excess
        order = np.argsort(e)
        assert np.all(np.diff(ratio[order]) >= -1e-12)
        clamped = solve_chi2_ball(e, p, rho, m, clamp_to_min_p=True)
        assert abs(clamped.sum() - 1) < 1e-12
        np.testing.assert_allclose(clamped, np.maximum(q, p.min()) / np.maximum(q, p.min()).sum(), atol=1e-12)


def test_dro_edge_cases():
    p = np.array([0.5, 0.3, 0.2])
    e = np.array([0.3, -0.1, 0.05])
    np.testing.assert_array_equal(solve_chi2_ball(e, p, 0.0), p)  # rho = 0
    np.testing.assert_array_equal(solve_chi2_ball([0.7], [3.0], 0.1), [1.0])  # one domain
    np.testing.assert_array_equal(solve_chi2_ball([0.2, 0.2, 0.2], p, 0.1), p)  # all tied
    # shift and scale invariance: excess <= 0 everywhere, or tiny, is no special case
    np.testing.assert_allclose(solve_chi2_ball(e - 5.0, p, 0.1, 0.2), solve_chi2_ball(e, p, 0.1, 0.2), atol=1e-12)
    np.testing.assert_allclose(solve_chi2_ball(e * 1e-6, p, 0.1, 0.2), solve_chi2_ball(e, p, 0.1, 0.2), atol=1e-12)
    # ties at the top share the gain in proportion to p
    q = solve_chi2_ball([1.0, 1.0, 0.0], p, 10.0)
    np.testing.assert_allclose(q, [0.625, 0.375, 0.0], atol=1e-12)
    # a zero-probability domain stays at zero; the rest is the problem without it
    p0 = np.array([0.5, 0.0, 0.3, 0.2])
    e0 = np.array([0.3, 9.0, -0.1, 0.05])
    q = solve_chi2_ball(e0, p0, 0.1, 0.2, clamp_to_min_p=True)
    assert q[1] == 0.0
    np.testing.assert_allclose(q[[0, 2, 3]], solve_chi2_ball(e, p, 0.1, 0.2, clamp_to_min_p=True), atol=1e-12)
    # a NaN (unmeasured) domain keeps its share; the others solve the full problem with it pinned
    en = np.array([0.3, np.nan, -0.1, 0.05])
    pn = np.array([0.4, 0.2, 0.25, 0.15])
    q = solve_chi2_ball(en, pn, 0.1)
    assert q[1] == pn[1]
    np.testing.assert_allclose(q, slsqp(np.nan_to_num(en), pn, 0.1, fixed=np.isnan(en)), atol=1e-6)
    np.testing.assert_array_equal(solve_chi2_ball([np.nan] * 3, p, 0.1), p)
    with pytest.raises(ValueError):
        solve_chi2_ball(e, [0.5, 0.5], 0.1)
    with pytest.raises(ValueError):
        solve_chi2_ball(e, [0.5, -0.1, 0.6], 0.1)


def test_infinite_loss_is_the_worst_domain():
    """A diverged (+inf) loss is not 'unmeasured' (NaN): it is the limit of an ever larger excess."""
    p = np.array([0.4, 0.2, 0.25, 0.15])
    e = np.array([0.3, np.inf, -0.1, 0.05])
    q = solve_chi2_ball(e, p, 0.1, 0.2)
    assert q.argmax() == 1 and q[1] > p[1]
    np.testing.assert_allclose(q, solve_chi2_ball(np.where(np.isinf(e), 1e9, e), p, 0.1, 0.2), atol=1e-6)
    assert abs(chi2_divergence(q, p) - 0.1) < 1e-9  # on the sphere, as any binding solution
    qs = dro.sheared_update(p, [1.0, np.inf, 1.0, np.nan], [1.0, 1.0, 1.0, 1.0])
    assert qs[1] > 0.999 and abs(qs.sum() - 1) < 1e-12
    w = DomainWeighter(["a", "b", "c"], [0.5, 0.3, 0.2], "dro", reference_loss=[1.0, 1.0, 1.0])
    w.observe_train([1.2, 1.1, np.inf], [10, 10, 10])  # a training-loss sum that overflowed
    assert w.train_ema[2] == np.inf
    q = np.array(w.update(1)) / [0.5, 0.3, 0.2]
    assert np.argmax(q) == 2 and q[2] > 1.5  # the most up-weighted domain, not left at its share


# -----------------------------------------------------------------------------
# the weighter

@pytest.mark.parametrize("method, flags", [
    ("constant", ("constant", False, False, False)),
    ("sheared", ("sheared", True, False, False)),
    ("DRO", ("dro", False, False, False)),
    ("dro+Eval", ("dro", True, False, False)),
    ("dro+dy", ("dro", False, True, False)),
    ("dro+eval+DyAll", ("dro", True, True, True)),
])
def test_method_parsing(method, flags):
    m = dro.parse_method(method)
    assert (m.name, m.use_eval, m.dynamic_reference, m.dynamic_ratio) == flags


@pytest.mark.parametrize("bad", ["", "dr0", "dro+evl", "dro+", "sheared+eval", "constant+dy", "doremi"])
def test_method_parsing_errors(bad):
    with pytest.raises(ValueError, match="use constant, sheared, bandit, or dro") as err:
        dro.parse_method(bad)
    assert "\n" not in str(err.value)


def test_weighter_input_errors():
    with pytest.raises(ValueError, match="needs reference_loss"):
        DomainWeighter(NAMES, P, "dro")
    with pytest.raises(ValueError, match="one proportion"):
        DomainWeighter(NAMES, P[:3], "constant")
    with pytest.raises(ValueError, match="val_losses"):
        DomainWeighter(NAMES, P, "dro+eval", REF).update(5)
    with pytest.raises(ValueError, match="max_steps"):
        DomainWeighter(NAMES, P, "dro+dy", REF).update(5)
    DomainWeighter(NAMES, P, "dro+dy")  # +dy may start without references


def test_train_loss_ema_per_step_from_first_observation():
    w = DomainWeighter(["a", "b", "c"], [0.5, 0.3, 0.2], "dro", [1.0, 1.0, 1.0], ema=0.1)
    w.observe_train(torch.tensor([20.0, 9.0, 0.0]), torch.tensor([10, 3, 0]))  # tensors are fine
    np.testing.assert_allclose(w.train_ema, [2.0, 3.0, np.nan])  # starts at the first loss, not at 0
    w.observe_train([10.0, 0.0, 4.0], [10, 0, 4])
    np.testing.assert_allclose(w.train_ema, [0.9 * 2 + 0.1 * 1, 3.0, 1.0])  # b not seen: unchanged
    np.testing.assert_array_equal(w.tokens, [20, 3, 4])
    q = np.array(w.update(2))  # DRO on the EMAs: excess [0.9, 2.0, 0.0] -> b gains the most
    assert np.argmax(q / [0.5, 0.3, 0.2]) == 1
    assert w.stats()["train_loss_ema/a"] == pytest.approx(1.9)


def test_constant_never_moves():
    w = DomainWeighter(["a", "b"], [3, 1], "constant")
    w.observe_train([1.0, 9.0], [1, 1])
    assert w.update(100, max_steps=100) == [0.75, 0.25]


def law(D, s=None, A=np.exp(3.0), E=1.8, alpha=0.3, beta=-0.2):
    return A * D ** -alpha * (1.0 if s is None else s ** -beta) + E


def test_scaling_law_recovers_synthetic_parameters():
    steps = np.linspace(64, 3200, 64)
    D, s = steps * 13107.2, 0.8 * np.minimum(1, steps / 640) + 0.006
    fit = fit_scaling_law(D, law(D, s), s)  # pruning: A D^-alpha s^-beta + E
    np.testing.assert_allclose(fit.params[0], [3.0, np.log(1.8), 0.3, -0.2], atol=1e-5)
    np.testing.assert_allclose(fit.predict(2 * D[-1], 0.8), law(2 * D[-1], 0.8), rtol=1e-6)
    fit = fit_scaling_law(D, law(D), None)  # continued pretraining: no sparsity term
    np.testing.assert_allclose(fit.params[0], [3.0, np.log(1.8), 0.3, 0.0], atol=1e-5)
    noisy = law(D, s) + 0.003 * np.random.default_rng(0).normal(size=D.size)
    fit = fit_scaling_law(D, noisy, s)
    assert abs(fit.predict(2 * D[-1], 0.8).mean() - law(2 * D[-1], 0.8)) < 0.02


def test_dynamic_reference_loss():
    # tokens grow 1000 per step per domain; validation losses follow a known law: the fitted reference must be the
    # law at the end of training (tokens extrapolated to max_steps), below every observed loss
    w = DomainWeighter(["a", "b"], [0.5, 0.5], "dro+eval+dy", [0.5, 5.0])
    for step in range(1, 13):
        w.observe_train([2000.0, 2000.0], [1000, 1000])
        val = [law(w.tokens[0]), law(w.tokens[1], E=1.5)]
        w.update(step, max_steps=100, val_losses=val)
        if step < 12:  # history from step 2 (2% of 100), a fit from 11 points: the initial references stand
            np.testing.assert_array_equal(w.reference, [0.5, 5.0])
    assert len(w.history[0]) == 11
    # the first fit replaces the initial reference, even the too-low 0.5; then it can only go down
    np.testing.assert_allclose(w.reference, [law(1e5), law(1e5, E=1.5)], rtol=1e-5)
    ref = w.reference.copy()
    for step in range(13, 17):  # much worse losses: the fits now predict more than the reference, which holds
        w.observe_train([2000.0, 2000.0], [1000, 1000])
        w.update(step, max_steps=100, val_losses=[5.0, 5.0])
    np.testing.assert_array_equal(w.reference, ref)


def test_dynamic_reference_uses_sparsity_while_pruning():
    w = DomainWeighter(["a"], [1.0], "dro+eval+dy", min_history=6)
    tok_per_step, max_steps = 5000.0, 60
    for step in range(1, 13):
        w.observe_train([1.0], [tok_per_step])
        s = 0.8 * min(1.0, step / 12) + 0.01
        w.update(step, max_steps=max_steps, val_losses=[law(w.tokens[0], s)], expected_sparsity=s, final_sparsity=0.8)
    assert np.isfinite(w.history[0][0][1])
    np.testing.assert_allclose(w.reference, [law(tok_per_step * max_steps, 0.8)], rtol=1e-4)


def test_history_is_capped_and_thinned_deterministically():
    def run(seed):
        w = DomainWeighter(["a", "b"], [0.5, 0.5], "dro+dy", max_history=8, min_history=1000, seed=seed)
        for step in range(1, 41):
            w.observe_train([2.0 + 1 / step, 3.0], [10, 10])
            w.update(step, max_steps=40)
        return w.history
    h = run(0)
    assert [len(x) for x in h] == [8, 8]
    assert h == run(0)  # every rank computes the same
    assert [x[-4:] for x in h] == [x[-4:] for x in run(1)]  # only the oldest half is thinned
    assert h != run(1)


def test_state_round_trip(tmp_path):
    kw = dict(min_history=3, max_history=4)  # small, so that fitting and thinning both happen within a few steps
    rng = np.random.default_rng(0)
    inputs = [(rng.uniform(1, 3, 2) * 100, np.array([100, 60]), rng.uniform(1, 3, 2), 0.5 * i / 16 + 0.01)
              for i in range(1, 17)]

    def feed(w, steps):
        for i in steps:
            sums, counts, val, s = inputs[i - 1]
            w.observe_train(sums, counts)
            if i % 2 == 0:
                w.update(i, max_steps=16, val_losses=val, expected_sparsity=s, final_sparsity=0.5)

    a = DomainWeighter(["x", "y"], [0.7, 0.3], "dro+dyall", [1.0, 2.0], **kw)
    feed(a, range(1, 11))
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = DomainWeighter(["x", "y"], [0.7, 0.3], "dro+dyall", [1.0, 2.0], **kw)
    b.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    np.testing.assert_equal(b.state_dict(), a.state_dict())  # (NaN == NaN here)
    feed(a, range(11, 17))
    feed(b, range(11, 17))
    assert a.fitted.all() and a.n_updates == 8 and len(a.history[0]) == 4
    assert not np.allclose(a.ratio, [0.7, 0.3])  # +dyall moved the reference mixture
    np.testing.assert_array_equal(a.proportions, b.proportions)
    np.testing.assert_array_equal(a.ratio, b.ratio)
    np.testing.assert_array_equal(a.reference, b.reference)
    assert a.history == b.history and a.n_observed == b.n_observed == 16
    with pytest.raises(ValueError, match="weighter state"):
        DomainWeighter(["x", "y"], [0.5, 0.5], "dro", [1, 1]).load_state_dict(a.state_dict())


# -----------------------------------------------------------------------------
# CLI

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "dro.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_reference_loss():
    args = ["reference-loss", "--n", *map(str, LLAMA2_N), "--names", *NAMES, "--target-n", str(TARGET_N["1.3b"])]
    for row in LLAMA2_LOSSES:
        args += ["--losses", *map(str, row)]
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    expected = ", ".join(f"{x:.4f}" for x in TARGETS["1.3b"][1])
    assert out.stdout.strip().splitlines()[-1] == f"reference_loss at N={TARGET_N['1.3b']}: [{expected}]"
    assert run_cli("reference-loss", "--help").returncode == 0
    for bad in (["reference-loss", "--n", "1e9", "2e9", "--losses", "2", "1.9", "--target-n", "1e8"],
                ["reference-loss", "--n", "1e9", "x", "--losses", "2", "1.9", "--target-n", "1e8"],
                ["reference-loss", "--n", "1e9", "2e9", "4e9", "--losses", "2", "1.9", "1.8", "--names", "a", "b",
                 "--target-n", "1e8"]):
        out = run_cli(*bad)
        assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1 and "error" in out.stderr
