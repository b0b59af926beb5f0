"""
Throughput of the data path: the mixture sampler (tokens/s at seq 4096 x global batch 256 over 7 domains, on
synthetic uint16 bins of 7 x 50M tokens) and prepare.py (MB of text/s, on local jsonl files of real text and on
the demo corpus). Prints a table and saves bench/results/data.json.

    OMP_NUM_THREADS=1 taskset -c 0 python bench/data.py --skip-prepare     # the sampler on one core
    OMP_NUM_THREADS=1 python bench/data.py [--tokens-per-domain 50000000] [--tokenizer models/smollm2-135m]
"""

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare  # noqa: E402
from data import DomainBins, MixtureSampler  # noqa: E402


def synthetic_bins(path: Path, domains: int, tokens: int, vocab: int = 49152):
    """uint16 bins of random ids plus the meta.json prepare.py would write."""
    rng = np.random.default_rng(0)
    entries = []
    for d in range(domains):
        (path / f"d{d}").mkdir(parents=True)
        for split, n in (("train", tokens), ("val", 65536)):
            rng.integers(0, vocab, n, dtype=np.uint16).tofile(path / f"d{d}" / f"{split}.bin")
        entries.append(dict(name=f"d{d}", source="random", text_bytes=0, train=dict(docs=1, tokens=tokens),
                            val=dict(docs=1, tokens=65536)))
    meta = dict(format=1, dtype="uint16", vocab_size=vocab, bos_id=None, eos_id=0, add_bos=False,
                tokenizer_fingerprint="sha256:random", domains=entries, settings={})
    (path / "meta.json").write_text(json.dumps(meta))


def bench_sampler(path, seq_len, batch, steps, world_size):
    bins = DomainBins(path)
    s = MixtureSampler(bins, seq_len, batch, seed=0)
    rng = np.random.default_rng(0)
    props = [rng.dirichlet(np.ones(len(bins.domains))) for _ in range(steps + 2)]  # a new mixture every step
    for p in props[:2]:
        s.next(p, 0, world_size)
    t0 = time.perf_counter()
    for p in props[2:]:
        x, y, dom = s.next(p, 0, world_size)
    dt = (time.perf_counter() - t0) / steps
    return dict(world_size=world_size, rows=x.shape[0], ms_per_batch=dt * 1e3, tokens_per_s=x.numel() / dt)


def bench_prepare(name, tok_dir, out, argv):
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its per-domain table
        assert prepare.main(["--tokenizer", str(tok_dir), "--out", str(out), "--quiet", "--force", *argv]) == 0
    dt = time.perf_counter() - t0
    meta = json.loads((out / "meta.json").read_text())
    mb = sum(d["text_bytes"] for d in meta["domains"]) / 1e6
    tokens = sum(d["train"]["tokens"] + d["val"]["tokens"] for d in meta["domains"])
    return dict(case=name, mb=mb, tokens=tokens, seconds=dt, mb_per_s=mb / dt)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens-per-domain", type=int, default=50_000_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokenizer", default="models/smollm2-135m", help="model dir whose tokenizer prepare.py uses")
    p.add_argument("--text-mb", type=float, default=16, help="MB of real text for the local-files case")
    p.add_argument("--demo-mb", type=float, default=1, help="--max-mb-per-domain for the demo-corpus case")
    p.add_argument("--skip-prepare", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    results = dict(machine=dict(cpu_count=os.cpu_count(), python=platform.python_version(),
                                numpy=np.__version__, processor=platform.processor()))
    try:
        synthetic_bins(tmp / "bins", 7, args.tokens_per_domain)
        results["sampler"] = [bench_sampler(tmp / "bins", 4096, 256, args.steps, w) for w in (1, 8)]
        print(f"sampler: seq 4096 x global batch 256, 7 domains x {args.tokens_per_domain / 1e6:.0f}M uint16 tokens,"
              f" proportions changing every step")
        print(f"{'world size':>12}{'rows/rank':>11}{'ms/batch':>10}{'M tokens/s':>12}")
        for r in results["sampler"]:
            print(f"{r['world_size']:>12}{r['rows']:>11}{r['ms_per_batch']:>10.2f}{r['tokens_per_s'] / 1e6:>12.1f}")

        if not args.skip_prepare:
            tok_dir = Path(args.tokenizer)
            if not tok_dir.is_dir():
                sys.exit(f"bench/data.py: no tokenizer dir {tok_dir}; pass --tokenizer or --skip-prepare")
            # real text as jsonl rows: the standard library, repeated up to --text-mb, split over 4 domains
            files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
            rows, size = [], 0
            while size < args.text_mb * 1e6:
                for f in files:
                    rows.append(json.dumps({"text": f.read_text(errors="replace")}) + "\n")
                    size += len(rows[-1])
                    if size >= args.text_mb * 1e6:
                        break
            (tmp / "src").mkdir()
            for d in range(4):
                (tmp / "src" / f"d{d}.jsonl").write_text("".join(rows[d::4]))
            domains = [a for d in range(4) for a in ("--domain", f"d{d}={tmp}/src/d{d}.jsonl")]
            # --workers 1 tokenizes in-process, where HF tokenizers still uses its own threads
            results["prepare"] = [bench_prepare(f"jsonl, --workers {w}", tok_dir, tmp / f"p{w}",
                                                [*domains, "--workers", str(w)]) for w in sorted({1, os.cpu_count()})]
            results["prepare"].append(bench_prepare(
                f"demo corpus, {args.demo_mb:g} MB/domain", tok_dir, tmp / "demo",
                ["--max-mb-per-domain", str(args.demo_mb)]))
            results["tokenizer"] = str(tok_dir)
            print(f"\nprepare.py with the tokenizer of {tok_dir}")
            print(f"{'case':<28}{'MB':>8}{'tokens':>12}{'s':>8}{'MB/s':>8}")
            for r in results["prepare"]:
                print(f"{r['case']:<28}{r['mb']:>8.1f}{r['tokens']:>12,}{r['seconds']:>8.1f}{r['mb_per_s']:>8.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(__file__).resolve().parent / "results" / "data.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
