"""
Domain weights for pruning and continued pretraining: constant, Sheared-LLaMA's exponentiated update, and
DRPruning's distributionally robust (DRO) update inside a chi^2 ball around a reference mixture, with a
dynamic reference loss (a scaling-law fit per domain) and a dynamic reference ratio.

Pure float64 numpy math. The inputs are already all-reduced, so every rank computes the same weights from
the same numbers (bitwise, given the same numpy build and CPU type; on mixed hardware, broadcasting rank 0's
proportions is the safe choice); nothing here talks to another process, and the history thinning is seeded.

Calling contract (train.py):

    w = DomainWeighter(names, proportions, "dro+dyall", reference_loss=[...], rho=0.1)
    # once per optimizer step (not per micro-batch), with the per-domain token-loss sums and token counts
    # of the whole global step, already summed over micro-batches and ranks:
    w.observe_train(loss_sums, token_counts)
    # at each evaluation step; returns the proportions to sample from until the next call:
    q = w.update(step, max_steps=max_steps, val_losses=val, expected_sparsity=s, final_sparsity=t)
    w.proportions, w.stats()               # current weights; a flat dict for the logger
    w.state_dict(), w.load_state_dict(sd)  # plain Python types, torch.save-able (weights_only too)

`step` counts optimizer steps of the current stage and `max_steps` is that stage's length; the sparsities
are the L0 module's expected and final target sparsity while pruning (`L0Module.stats()`'s `expected_sparsity`
and `final_sparsity`), None in continued pretraining.
Methods: "constant", "sheared", "bandit", or "dro" with options "+eval", "+dy", "+dyall" (case-insensitive).

The module also estimates reference losses the way the DRPruning paper does: fit L(N) = a*N^-b + c per
domain to a model family's losses and evaluate it at the target's parameter count N:

    python dro.py reference-loss --n 6738415616 13015864320 68976648192 \
        --losses 1.7520 1.6680 1.4621 --losses 0.6216 0.5791 0.4890 --names cc github --target-n 1345423360
"""

import argparse
import time
from dataclasses import asdict, dataclass

import numpy as np


def _f64(x) -> np.ndarray:
    """Anything array-like (list, numpy, torch tensor on any device) -> a 1-D float64 numpy copy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.array(x, dtype=np.float64).reshape(-1)


# -----------------------------------------------------------------------------
# the DRO step: max_q sum_g q_g*excess_g  s.t.  1/2 sum_g p_g (q_g/p_g - 1)^2 <= rho,  sum q = 1,  q >= min_prob*p

def chi2_divergence(q, p) -> float:
    """1/2 sum_g p_g (q_g/p_g - 1)^2 over the domains with p_g > 0."""
    q, p = _f64(q), _f64(p)
    on = p > 0
    return float(0.5 * np.sum((q[on] - p[on]) ** 2 / p[on]))


def _q_of_eta(e, p, eta, m):
    # KKT form of the optimum: q/p = max(m, t*(e - eta)), with t set so that sum q = 1. `e` is sorted in
    # descending order, so the domains above the floor are a prefix; phi[k] is sum(q) at the t where the k-th
    # domain just reaches the floor, which grows with k, so the active prefix is the k with phi[k] <= 1.
    x = e - eta
    if x[0] <= 0:  # eta at or above the top excess: the limit eta -> max(e) gives the top tie the spare mass
        top = e == e[0]
        q = m * p
        q[top] += (1 - m) * p[top] / p[top].sum()
        return q
    pos = x > 0
    S, P = np.cumsum(np.where(pos, p * x, 0.0)), np.cumsum(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(pos, m * S / x + m * (1 - P), np.inf)
    k = np.count_nonzero(phi <= 1) - 1  # phi[0] = m < 1, so k >= 0
    t = (1 - m * (1 - P[k])) / S[k]
    return p * np.maximum(m, t * x)


def solve_chi2_ball(excess, p, rho: float, min_prob: float = 0.0, clamp_to_min_p: bool = False) -> np.ndarray:
    """The DRO step: the worst-case mixture q (the one that maximises sum q*excess) in the chi^2 ball around p.

    Bisection on the dual threshold eta until q(eta) lies on the sphere 1/2 sum p (q/p - 1)^2 = rho (or, when
    even the most concentrated q fits inside the ball, that q). Every domain keeps q >= min_prob*p exactly.
    With clamp_to_min_p, q is then raised to at least min(p) and renormalised (as the original DRPruning).

    Differences from the original DRPruning implementation, on purpose:
    - the solution is invariant to adding a constant to `excess` (and to scaling it), so excess <= 0 everywhere
      needs no special case; the original rescaled the reference loss by 0.9, 0.8, ... only because its
      bisection bracket assumed max(excess) > 0 (DomainWeighter(rescale_reference=True) reproduces that).
    - the min_prob floor holds after normalisation and q is the exact optimum of the floored problem; the
      original floored q/p before renormalising, which gives the same q whenever the floor does not bind.
    - a domain whose excess is NaN (no loss measured) keeps its share p_g; the others solve the same problem
      on the remaining mass. Domains with p_g = 0 stay at 0.
    - an excess of +inf (a diverged loss) is the worst domain: the limit of an ever larger excess, where the
      infinite domains take all the mass the ball allows and the finite ones, tied below, share the rest.
    """
    e, p = _f64(excess), _f64(p)
    if e.shape != p.shape:
        raise ValueError(f"excess has {e.size} domains but p has {p.size}")
    if not (np.all(np.isfinite(p)) and np.all(p >= 0) and p.sum() > 0):
        raise ValueError(f"p must be finite, >= 0 and not all zero, got {p.tolist()}")
    if not (rho >= 0 and 0 <= min_prob):
        raise ValueError(f"need rho >= 0 and min_prob >= 0, got rho={rho}, min_prob={min_prob}")
    p = p / p.sum()
    q = p.copy()
    act = (p > 0) & ~np.isnan(e)
    if np.isinf(e[act]).any():  # the limit of an infinite excess: the finite domains are tied, far from it
        e = np.where(np.isinf(e), np.sign(e), 0.0)
    if act.sum() < 2 or rho == 0 or min_prob >= 1 or e[act].max() == e[act].min():
        return q  # nothing to move: one domain, no ball, a floor that is the whole mass, or all tied
    P = p[act].sum()
    order = np.argsort(-e[act], kind="stable")
    ea, pa = e[act][order], p[act][order] / P
    ea = (ea - ea[0]) / (ea[0] - ea[-1])  # now max 0, min -1: a well-scaled bracket for any loss scale
    r = rho / P  # fixing the NaN domains' mass shrinks the sub-problem's ball by exactly 1/P

    def f(eta):  # chi^2 divergence of q(eta) minus the radius; increases with eta
        return 0.5 * np.sum((_q_of_eta(ea, pa, eta, min_prob) - pa) ** 2 / pa) - r

    lo, hi = -1.0 - 1.0 / np.sqrt(2 * r), 0.0  # at lo, |q/p - 1| <= sqrt(2r) when m = 0, so f(lo) <= 0
    if f(hi) <= 0:
        lo = hi  # the ball holds the most concentrated q: the constraint does not bind
    else:
        while f(lo) > 0:  # only a large floor can push f(lo) above 0; f -> -r as eta -> -inf
            lo -= 2 * (hi - lo)
        while hi - lo > 1e-14 * (1 + abs(lo)):  # f increases with eta; keep f(lo) <= 0 < f(hi)
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if f(mid) > 0 else (mid, hi)
    qa = np.empty_like(pa)
    qa[order] = _q_of_eta(ea, pa, lo, min_prob)  # the feasible end: divergence <= rho
    if clamp_to_min_p:
        qa = np.maximum(qa, p[p > 0].min() / P)
        qa /= qa.sum()
    q[act] = P * qa
    return q


def rescaled_excess(loss, reference):
    """The original DRPruning's "target loss too high" rule: while every domain is below its reference,
    scale the references by 0.9, 0.8, ... Returns (excess, times): the reference was scaled by times/10."""
    loss, reference = _f64(loss), _f64(reference)
    for times in range(10, 0, -1):
        excess = loss - reference * times / 10
        if np.any(excess >= 0):
            return excess, times
    return loss.copy(), 0


def sheared_update(p, loss, reference, lr: float = 1.0, smoothing: float = 1e-4, clip: bool = True,
                   bandit: bool = False) -> np.ndarray:
    """Sheared-LLaMA: p' = (1-c)*softmax(log p + lr*delta) + c/k with delta = max(loss - reference, 0) as in the
    paper (clip=True); clip=False is the released code, where a domain below its reference loses weight.
    bandit=True is the original DRPruning's bandit baseline, softmax(p + lr*delta), unclipped."""
    p, delta = _f64(p), _f64(loss) - _f64(reference)
    delta = np.where(np.isnan(delta), 0.0, delta)  # an unmeasured domain keeps its relative weight
    if clip and not bandit:
        delta = np.maximum(delta, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        base = p if bandit else np.log(p)
        # +inf (a diverged loss) is the limit of an ever larger delta: the infinite domains take all the weight
        inf = np.isposinf(delta)
        logits = np.where(inf, base, -np.inf) if inf.any() else base + lr * delta
    w = np.exp(logits - logits.max())
    w = (1 - smoothing) * w / w.sum() + smoothing / len(w)
    return w / w.sum()


# -----------------------------------------------------------------------------
# scaling laws: the dynamic reference loss L(D, s) = A*D^-alpha*s^-beta + E, and L(N) = a*N^-b + c

def _lbfgs(fun, x, iters: int, memory: int = 10):
    """Minimise S independent problems at once (x: (S, P), fun -> f (S,), g (S, P)) with L-BFGS and a
    backtracking Armijo line search per problem. Each row has its own curvature pairs, so the rows do not
    interact; a step that fails the line search (or overflows) is not taken."""
    f, g = fun(x)
    S, P = x.shape
    s_h, y_h, rho_h = np.zeros((memory, S, P)), np.zeros((memory, S, P)), np.zeros((memory, S))
    gamma, fresh, active = np.ones(S), np.ones(S, dtype=bool), np.ones(S, dtype=bool)
    for it in range(iters):
        q, a = g.copy(), np.zeros((memory, S))
        recent = [(it - 1 - j) % memory for j in range(memory)]  # empty or rejected slots have rho = 0
        for i in recent:
            a[i] = rho_h[i] * np.sum(s_h[i] * q, 1)
            q -= a[i][:, None] * y_h[i]
        d = gamma[:, None] * q
        for i in reversed(recent):
            d += s_h[i] * (a[i] - rho_h[i] * np.sum(y_h[i] * d, 1))[:, None]
        d = -d
        gd = np.sum(g * d, 1)
        bad = ~(gd < 0)  # not a descent direction: restart that row from steepest descent
        d[bad], gd[bad], fresh[bad] = -g[bad], -np.sum(g[bad] ** 2, 1), True
        rho_h[:, bad] = 0.0
        t = np.where(fresh, np.minimum(1.0, 1.0 / (np.abs(g).sum(1) + 1e-300)), 1.0)
        for _ in range(50):
            xn = x + t[:, None] * d
            fn, gn = fun(xn)
            ok = active & np.isfinite(fn) & np.all(np.isfinite(gn), 1) & (fn <= f + 1e-4 * t * gd)
            if np.all(ok | ~active):
                break
            t = np.where(ok, t, 0.5 * t)
        sn, yn = np.where(ok[:, None], xn - x, 0.0), np.where(ok[:, None], gn - g, 0.0)
        sy = np.sum(sn * yn, 1)
        good = ok & (sy > 1e-12 * np.sqrt(np.sum(sn**2, 1) * np.sum(yn**2, 1)) + 1e-300)
        slot = it % memory
        s_h[slot], y_h[slot], rho_h[slot] = sn, yn, np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
        gamma = np.where(good, sy / np.maximum(np.sum(yn**2, 1), 1e-300), gamma)
        fresh &= ~good
        f_old = f
        x, f, g = np.where(ok[:, None], xn, x), np.where(ok, fn, f), np.where(ok[:, None], gn, g)
        # converged: no acceptable step, or one that no longer changes x or f measurably
        active &= ok & (np.max(np.abs(sn), 1) > 1e-13) & (f_old - f > 1e-12 * np.abs(f_old))
        if not active.any():
            break
    return x, f


@dataclass
class ScalingLawFit:
    """The best refits of fit_scaling_law; predictions are averaged over them, as in DRPruning."""
    params: np.ndarray  # (k, 4) rows [log_A, log_E, alpha, beta] of the k best refits, best first
    loss: np.ndarray  # (k,) Huber objective of each refit

    def predict(self, tokens, sparsity=None) -> np.ndarray:
        """(k,) one prediction per refit of L at `tokens` (and `sparsity`)."""
        la, le, al, be = self.params.T
        ls = 0.0 if sparsity is None else np.log(max(float(sparsity), 1e-6))
        with np.errstate(over="ignore"):  # a wild refit may overflow to inf; callers clip to the observed range
            return np.exp(la - al * np.log(float(tokens)) - be * ls) + np.exp(le)


def fit_scaling_law(tokens, losses, sparsity=None, delta: float = 1e-3, search_iters: int = 200,
                    refit_iters: int = 300, n_best: int = 3) -> ScalingLawFit:
    """Fit L(D, s) = A*D^-alpha*s^-beta + E (no s term when sparsity is None) with a Huber loss (delta), from
    DRPruning's grid of starts log A in {0,10,20}, log E in {0,1}, alpha in {0,.5,1}, beta in {0,-.5}. All starts
    run as one batched L-BFGS for search_iters; the n_best continue for refit_iters more. Unlike the original
    (unit steps, no line search, one start at a time) steps are line-searched, so no start diverges to NaN."""
    D, y = _f64(tokens), _f64(losses)
    if D.shape != y.shape or D.size < 2 or not (np.all(D > 0) and np.all(np.isfinite(y))):
        raise ValueError("fit_scaling_law needs >= 2 points with tokens > 0 and finite losses")
    lD = np.log(D)
    # sparsity 0 would make log s = -inf; the L0 masks never give exactly 0, the floor only guards the log
    lS = np.zeros_like(lD) if sparsity is None else np.log(np.maximum(_f64(sparsity), 1e-6))
    cD, cS = lD.mean(), lS.mean()  # fit with centred logs: log A and alpha are far less correlated then
    xD, xS, use_beta = lD - cD, lS - cS, float(sparsity is not None)

    def fun(th):  # th rows: [log A', log E, alpha, beta], log A' = log A - alpha*cD - beta*cS
        with np.errstate(over="ignore", invalid="ignore"):
            pa = np.exp(th[:, :1] - th[:, 2:3] * xD - th[:, 3:4] * xS)
            pe = np.exp(th[:, 1:2])
            r = pa + pe - y
            h = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).mean(1)
            dr = np.clip(r, -delta, delta) / len(y)
            g = np.stack([np.sum(dr * pa, 1), np.sum(dr, 1) * pe[:, 0], -np.sum(dr * pa * xD, 1),
                          -np.sum(dr * pa * xS, 1) * use_beta], 1)
        return h, g

    th = np.array(np.meshgrid([0.0, 10.0, 20.0], [0.0, 1.0], [0.0, 0.5, 1.0],
                              [0.0, -0.5] if sparsity is not None else [0.0], indexing="ij")).reshape(4, -1).T
    th[:, 0] -= th[:, 2] * cD + th[:, 3] * cS
    th, h = _lbfgs(fun, th, search_iters)
    best = np.argsort(np.where(np.isfinite(h), h, np.inf), kind="stable")[:n_best]
    th, h = _lbfgs(fun, th[best], refit_iters)
    th[:, 0] += th[:, 2] * cD + th[:, 3] * cS
    ok = np.isfinite(h) & np.all(np.isfinite(th), 1)
    order = np.argsort(h[ok], kind="stable")
    return ScalingLawFit(params=th[ok][order], loss=h[ok][order])


def fit_power_law(n, losses):
    """Exact least-squares fit of L(N) = a*N^-b + c; returns (a, b, c). For each b the best (a, c) is a linear
    regression, so only b is searched: a log grid on (1e-4, 5], then golden-section refinement."""
    n, y = _f64(n), _f64(losses)
    if n.shape != y.shape or n.size < 3:
        raise ValueError(f"need the same number (>= 3) of sizes and losses, got {n.size} and {y.size}")
    if not (np.all(n > 0) and np.all(np.isfinite(n) & np.isfinite(y)) and np.unique(n).size == n.size):
        raise ValueError("sizes must be finite, distinct and > 0, losses finite")
    ln = np.log(n / n.max())  # fit a*(N/Nmax)^-b: same b and c, a rescaled, much better conditioned

    def fit(b):  # b: (G,) -> rss (G,), a' (G,), c (G,)
        z = np.exp(-np.outer(b, ln))
        zc = z - z.mean(1, keepdims=True)
        a = (zc @ (y - y.mean())) / np.sum(zc**2, 1)
        c = y.mean() - a * z.mean(1)
        return np.sum((a[:, None] * z + c[:, None] - y) ** 2, 1), a, c

    grid = np.geomspace(1e-4, 5.0, 801)
    i = int(np.argmin(fit(grid)[0]))
    if i in (0, len(grid) - 1):
        raise ValueError(f"the losses {y.tolist()} do not follow a*N^-b + c (best b at the search bound {grid[i]:.4g})")
    lo, hi, g = grid[i - 1], grid[i + 1], (np.sqrt(5) - 1) / 2
    for _ in range(200):
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        r1, r2 = fit(np.array([m1, m2]))[0]
        lo, hi = (lo, m2) if r1 <= r2 else (m1, hi)
    b = 0.5 * (lo + hi)
    _, a, c = fit(np.array([b]))
    return float(a[0] * n.max() ** b), float(b), float(c[0])


# -----------------------------------------------------------------------------
# the weighter: state across steps, the method string, schedules, checkpointing

@dataclass(frozen=True)
class Method:
    name: str  # constant | sheared | bandit | dro
    use_eval: bool = False  # validation losses instead of the EMA of training losses
    dynamic_reference: bool = False  # +dy: refit the reference loss from a scaling law at eval steps
    dynamic_ratio: bool = False  # +dyall: +dy and move the reference mixture toward the weights


METHOD_HELP = "use constant, sheared, bandit, or dro with any of +eval, +dy, +dyall (e.g. dro+eval+dyall)"


def parse_method(method: str) -> Method:
    name, *opts = [s.strip() for s in method.lower().split("+")]
    if name not in ("constant", "sheared", "bandit", "dro") or (opts and name != "dro"):
        raise ValueError(f"unknown domain-weighting method {method!r}: {METHOD_HELP}")
    if any(o not in ("eval", "dy", "dyall") for o in opts):
        raise ValueError(f"unknown option in method {method!r}: {METHOD_HELP}")
    # Sheared-LLaMA and the bandit compare validation losses with the reference, as in their papers
    return Method(name, use_eval="eval" in opts or name in ("sheared", "bandit"),
                  dynamic_reference="dy" in opts or "dyall" in opts, dynamic_ratio="dyall" in opts)


class DomainWeighter:
    """Holds the domain proportions and updates them at evaluation steps.

    rho, min_prob, clamp_to_min_p: the chi^2 radius, the floor q >= min_prob*p and the clamp q >= min(p) of the
    DRO step (solve_chi2_ball). ema: rate of the training-loss EMA. ratio_ema, ratio_bound: +dyall moves the
    reference mixture p <- (1-ratio_ema)*p + ratio_ema*q, kept within [p0/ratio_bound, p0*ratio_bound] and
    [min p0, max p0]. sheared_lr, sheared_smoothing: eta and c of Sheared-LLaMA; sheared_clip=True (default)
    is the paper's max(loss - reference, 0), False the released Sheared-LLaMA code's unclipped difference.
    history_start, fit_start, ratio_start: fractions of max_steps from which +dy records history, +dy fits
    the scaling law, and +dyall moves the reference mixture; min_history, max_history: points to fit / kept.
    rescale_reference=True reproduces the original DRPruning's reference rescaling (see solve_chi2_ball).
    reference_loss may be None (or hold None/NaN) with +dy: such domains keep their share until fitted.
    Defaults are the original DRPruning's: rho 0.1 and ema 0.1 (its scripts), min_prob 0.2 and the clamp on
    (its class defaults; its scripts passed None for both, which crashed).
    """

    def __init__(self, names, proportions, method: str = "dro", reference_loss=None, *, rho: float = 0.1,
                 ema: float = 0.1, min_prob: float = 0.2, clamp_to_min_p: bool = True, ratio_ema: float = 0.1,
                 ratio_bound: float = 2.0, sheared_lr: float = 1.0, sheared_smoothing: float = 1e-4,
                 sheared_clip: bool = True, rescale_reference: bool = False, history_start: float = 0.02,
                 fit_start: float = 0.1, ratio_start: float = 0.2, min_history: int = 11, max_history: int = 64,
                 seed: int = 0):
        self.names, self.method, k = list(names), parse_method(method), len(names)
        p0 = _f64(proportions)
        ref = np.full(k, np.nan) if reference_loss is None else _f64(reference_loss)  # numpy reads None as NaN
        if k == 0 or len(set(self.names)) != k or p0.size != k or ref.size != k:
            raise ValueError(f"need unique domain names with one proportion (and reference loss) each, got "
                             f"{self.names}, {p0.tolist()}, {ref.tolist()}")
        if not (np.all(np.isfinite(p0)) and np.all(p0 >= 0) and p0.sum() > 0):
            raise ValueError(f"proportions must be finite, >= 0 and not all zero, got {p0.tolist()}")
        if self.method.name != "constant" and not self.method.dynamic_reference and not np.isfinite(ref).any():
            raise ValueError(f"method {method!r} needs reference_loss (or use dro+dy to fit it during training)")
        if not (rho >= 0 and 0 < ema <= 1 and 0 <= min_prob < 1 and 0 < ratio_ema <= 1 and ratio_bound >= 1):
            raise ValueError("need rho >= 0, 0 < ema <= 1, 0 <= min_prob < 1, 0 < ratio_ema <= 1, ratio_bound >= 1")
        self.rho, self.ema, self.min_prob, self.clamp_to_min_p = rho, ema, min_prob, clamp_to_min_p
        self.ratio_ema, self.ratio_bound, self.rescale_reference = ratio_ema, ratio_bound, rescale_reference
        self.sheared_lr, self.sheared_smoothing, self.sheared_clip = sheared_lr, sheared_smoothing, sheared_clip
        self.history_start, self.fit_start, self.ratio_start = history_start, fit_start, ratio_start
        self.min_history, self.max_history, self.seed = min_history, max_history, seed
        # the state (all of it in state_dict)
        self.p0 = p0 / p0.sum()  # the initial mixture
        self.q = self.p0.copy()  # the proportions to sample from
        self.ratio = self.p0.copy()  # the DRO reference mixture: the p of the chi^2 ball
        self.reference = ref  # NaN = unknown: that domain keeps its share
        self.fitted = np.zeros(k, dtype=bool)  # has +dy replaced the initial reference yet?
        self.train_ema = np.full(k, np.nan)  # NaN until the first observation (an EMA from 0 would lag for long)
        self.tokens = np.zeros(k)  # tokens seen per domain in this stage: the D of the scaling law
        self.loss_sum, self.loss_count = np.zeros(k), np.zeros(k)  # training loss since the last update()
        self.excess = np.full(k, np.nan)  # of the last update, for logging
        self.history = [[] for _ in range(k)]  # per domain: [tokens, sparsity (NaN in CPT), loss] points
        self.n_observed = self.n_updates = self.last_step = 0
        self.fit_seconds = 0.0

    @property
    def proportions(self) -> list[float]:
        return self.q.tolist()

    def observe_train(self, loss_sums, token_counts):
        """Once per optimizer step: per-domain sums of token losses and token counts over the global step."""
        s, c = _f64(loss_sums), _f64(token_counts)
        if s.size != len(self.names) or c.size != len(self.names):
            raise ValueError(f"expected {len(self.names)} loss sums and token counts, got {s.size} and {c.size}")
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(c > 0, s / c, np.nan)
        ok = ~np.isnan(mean)  # measured; +inf (a diverged loss) counts, as the worst
        ema = np.where(np.isnan(self.train_ema), mean, (1 - self.ema) * self.train_ema + self.ema * mean)
        self.train_ema = np.where(ok, ema, self.train_ema)
        self.tokens += np.where(c > 0, c, 0.0)
        self.loss_sum += np.where(ok, s, 0.0)
        self.loss_count += np.where(ok, c, 0.0)
        self.n_observed += 1

    def update(self, step: int, *, max_steps: int | None = None, val_losses=None, expected_sparsity=None,
               final_sparsity=None) -> list[float]:
        """At an evaluation step: the new proportions (also in self.proportions). val_losses are used by
        sheared, bandit and +eval, ignored otherwise; max_steps is needed by +dy and +dyall."""
        m, k = self.method, len(self.names)
        if m.dynamic_reference and not max_steps:
            raise ValueError("methods with +dy or +dyall need update(..., max_steps=...)")
        if m.use_eval and (val_losses is None or _f64(val_losses).size != k):
            raise ValueError(f"method {m.name}{'+eval' * (m.name == 'dro')} needs update(..., val_losses=<{k} losses>)")
        with np.errstate(divide="ignore", invalid="ignore"):
            recent = _f64(val_losses) if m.use_eval else self.loss_sum / self.loss_count
        losses = recent if m.use_eval else self.train_ema.copy()
        self.loss_sum[:], self.loss_count[:] = 0.0, 0.0
        if m.dynamic_reference and step >= self.history_start * max_steps:
            self._record(step, recent, expected_sparsity)
        if m.dynamic_reference and step >= self.fit_start * max_steps:
            self._refit(step, max_steps, final_sparsity)
        self.excess = losses - self.reference
        if m.name in ("sheared", "bandit"):
            self.q = sheared_update(self.q, losses, self.reference, self.sheared_lr, self.sheared_smoothing,
                                    self.sheared_clip, bandit=m.name == "bandit")
        elif m.name == "dro":
            if self.rescale_reference and np.isfinite(self.excess).any():
                self.excess, _ = rescaled_excess(losses, self.reference)
            self.q = solve_chi2_ball(self.excess, self.ratio, self.rho, self.min_prob, self.clamp_to_min_p)
            if m.dynamic_ratio and step >= self.ratio_start * max_steps:
                self.ratio = self._move_ratio(self.q)
        self.n_updates, self.last_step = self.n_updates + 1, int(step)
        return self.proportions

    def _record(self, step, losses, sparsity):
        s = np.nan if sparsity is None else float(sparsity)
        for g, h in enumerate(self.history):
            if np.isfinite(losses[g]) and losses[g] > 0 and self.tokens[g] > 0:
                h.append([float(self.tokens[g]), s, float(losses[g])])
                if len(h) > self.max_history:  # drop one of the oldest half, seeded so that every rank agrees
                    del h[int(np.random.default_rng([self.seed, int(step), g]).integers(self.max_history // 2))]

    def _refit(self, step, max_steps, final_sparsity):
        t0 = time.perf_counter()
        for g, h in enumerate(self.history):
            if len(h) < self.min_history:
                continue
            D, s, y = np.array(h).T
            pruning = bool(np.all(np.isfinite(s)))
            fit = fit_scaling_law(D, y, s if pruning else None)
            if len(fit.loss) == 0:
                continue
            # predict the end of training: this domain's tokens extrapolated at the rate so far, the final sparsity
            s_end = (s[-1] if final_sparsity is None else float(final_sparsity)) if pruning else None
            pred = np.clip(fit.predict(self.tokens[g] * max_steps / step, s_end), 0.0, y.min()).mean()
            # (the refits' predictions are each clipped to [0, best observed loss], then averaged)
            # the first fit replaces the initial reference (another model's loss); later fits may only lower it
            self.reference[g] = min(self.reference[g], pred) if self.fitted[g] else pred
            self.fitted[g] = True
        self.fit_seconds = time.perf_counter() - t0

    def _move_ratio(self, q):
        p0, on = self.p0, self.p0 > 0
        r = (1 - self.ratio_ema) * self.ratio + self.ratio_ema * q
        r = np.clip(r / r.sum(), p0 / self.ratio_bound, p0 * self.ratio_bound)
        r = np.where(on, np.clip(r / r.sum(), p0[on].min(), p0.max()), 0.0)
        return r / r.sum()

    def stats(self) -> dict[str, float]:
        """A flat dict for the logger: weights, reference mixture and losses, training-loss EMA, excess."""
        out = {f"weight/{n}": float(w) for n, w in zip(self.names, self.q)}
        series = {"reference_loss": self.reference, "train_loss_ema": self.train_ema, "excess": self.excess}
        if self.method.name == "dro":
            series["ref_ratio"] = self.ratio
        for key, values in series.items():
            out.update({f"{key}/{n}": float(x) for n, x in zip(self.names, values) if np.isfinite(x)})
        if self.method.dynamic_reference:
            out["dro/fit_seconds"] = self.fit_seconds
        return out

    _ARRAYS = ("p0", "q", "ratio", "reference", "fitted", "train_ema", "tokens", "loss_sum", "loss_count", "excess")
    _SCALARS = ("n_observed", "n_updates", "last_step", "fit_seconds")

    def state_dict(self) -> dict:
        sd = {"names": list(self.names), "method": asdict(self.method),
              "history": [[list(x) for x in h] for h in self.history]}
        sd.update({a: getattr(self, a).tolist() for a in self._ARRAYS})
        sd.update({a: getattr(self, a) for a in self._SCALARS})
        return sd

    def load_state_dict(self, sd: dict):
        if list(sd["names"]) != self.names or sd["method"] != asdict(self.method):
            raise ValueError(f"weighter state is for domains {sd['names']} and method {sd['method']}, "
                             f"not {self.names} and {asdict(self.method)}")
        for a in self._ARRAYS:
            setattr(self, a, np.array(sd[a], dtype=bool if a == "fitted" else np.float64))
        for a in self._SCALARS:
            setattr(self, a, type(getattr(self, a))(sd[a]))
        self.history = [[list(map(float, x)) for x in h] for h in sd["history"]]


# -----------------------------------------------------------------------------
# CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
    parser = _Parser(prog="dro.py", description="Domain-weighting tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reference-loss", help="reference losses at a target size from a model family's losses",
                       description="Fit L(N) = a*N^-b + c per domain to a model family's losses and print "
                                   "L(target N), the reference losses of DRPruning / Sheared-LLaMA.")
    r.add_argument("--n", type=float, nargs="+", required=True, help="parameter counts of the family's models")
    r.add_argument("--losses", type=float, nargs="+", action="append", required=True,
                   help="one domain's losses at those sizes, in --n order; repeat once per domain")
    r.add_argument("--names", nargs="+", help="domain names, in --losses order")
    r.add_argument("--target-n", type=float, nargs="+", required=True, help="parameter count(s) of the target model(s)")
    args = parser.parse_args(argv)
    names = args.names or [f"domain{i}" for i in range(len(args.losses))]
    if len(names) != len(args.losses):
        parser.error(f"{len(names)} --names for {len(args.losses)} --losses groups")
    if not all(0 < t < float("inf") for t in args.target_n):
        parser.error("--target-n must be finite and > 0")
    fits = []
    for name, row in zip(names, args.losses):
        try:
            fits.append(fit_power_law(args.n, row))
        except ValueError as err:
            parser.error(f"domain {name}: {err}")
    print(f"{'domain':<16}{'a':>12}{'b':>10}{'c':>10}" + "".join(f"{f'L({t:.4g})':>14}" for t in args.target_n))
    for name, (a, b, c) in zip(names, fits):
        print(f"{name:<16}{a:>12.6g}{b:>10.5f}{c:>10.5f}" + "".join(f"{a * t**-b + c:>14.4f}" for t in args.target_n))
    for t in args.target_n:
        print(f"reference_loss at N={t:.0f}: [{', '.join(f'{a * t**-b + c:.4f}' for a, b, c in fits)}]")


if __name__ == "__main__":
    main()
