"""
Cost of the domain weighter: one DRO update (7, 8 and 100 domains) and one dynamic-reference scaling-law fit with
a full history (64 points), pruning (36 starts) and continued pretraining (18 starts). Targets: < 5 ms per update,
< 1 s per fit per domain. Prints a table and writes bench/results/dro.json.

    python bench/dro.py
"""

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this file is also called dro.py: make `import dro` find the repo's
import dro  # noqa: E402


def timeit(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def dro_update(k, rng):
    p = rng.dirichlet(np.ones(k))
    w = dro.DomainWeighter([f"d{i}" for i in range(k)], p, "dro+eval", rng.uniform(1, 3, k), rho=0.1)
    losses = [rng.uniform(1, 3, k) for _ in range(64)]
    it = iter(range(10**9))
    return lambda: w.update(10, val_losses=losses[next(it) % 64])


def history(rng, pruning, noise=0.005):
    # a pruning-like run: 64 evals over 3200 steps, tokens linear in steps, sparsity ramping to 0.8 over 20%
    steps = np.linspace(64, 3200, 64)
    D, s = steps * 0.1 * 131072, 0.8 * np.minimum(1, steps / 640) + 0.006
    y = np.exp(3.0) * D**-0.3 * (s**0.2 if pruning else 1) + 1.8 + noise * rng.normal(size=64)
    return D, y, (s if pruning else None)


def weighter_refit(rng, k=7):
    # the weighter's own path: k domains, each with a full pruning history, refit at one eval step
    w = dro.DomainWeighter([f"d{i}" for i in range(k)], np.ones(k) / k, "dro+eval+dy")
    for g in range(k):
        D, y, s = history(rng, True)
        w.history[g] = [[float(a), float(b), float(c)] for a, b, c in zip(D, s, y)]
        w.tokens[g] = D[-1]
    return lambda: w._refit(3200, 3200, 0.8)


def main():
    rng = np.random.default_rng(0)
    rows = []
    for k in (7, 8, 100):
        med, best = timeit(dro_update(k, rng), 200)
        rows.append((f"DRO update, {k} domains (DomainWeighter.update)", med, best, 5e-3))
    for name, pruning, noise in (("pruning: A D^-a s^-b + E, 36 starts", True, 0.005),
                                 ("continued pretraining: A D^-a + E, 18 starts", False, 0.005),
                                 ("pruning, pure-noise losses (worst case)", True, None)):
        D, y, s = history(rng, pruning, noise or 0.0)
        if noise is None:
            y = rng.uniform(1, 3, 64)
        med, best = timeit(lambda: dro.fit_scaling_law(D, y, s), 5)
        rows.append((f"scaling-law fit, 64 points, {name}", med, best, 1.0))
    med, best = timeit(weighter_refit(rng), 3)
    rows.append(("weighter refit of 7 domains, per domain", med / 7, best / 7, 1.0))

    print(f"{'what':<72}{'median':>12}{'min':>12}{'target':>10}")
    for what, med, best, target in rows:
        ok = "ok" if med < target else "SLOW"
        print(f"{what:<72}{med * 1e3:>10.3f}ms{best * 1e3:>10.3f}ms{target * 1e3:>8.0f}ms {ok}")
    out = ROOT / "bench" / "results" / "dro.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "processor": platform.processor(),
                    "machine": platform.machine()},
        "results": [{"what": w, "median_s": m, "min_s": b, "target_s": t, "within_target": m < t}
                    for w, m, b, t in rows]}, indent=2) + "\n")
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
