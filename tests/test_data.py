"""prepare.py -> bins -> data.py, on generated text with tokenizers trained here (CPU, offline, ~30 s).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m pytest -q tests/test_data.py
"""

import base64
import gzip
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import prepare
from conftest import killed_after_rename
from data import DomainBins, MixtureSampler

REPO = Path(__file__).resolve().parents[1]
WORDS = {
    "code": ["def", "return", "self", "(x)", "{}", "==", "import", "for", "in", "range", "None", ":", "    "],
    "prose": ["the", "a", "licence", "software", "shall", "be", "provided", "ünïcödé", "naïve", "—", "日本語"],
    "log": ["fixed", "bug", "upload", "version", "1.2-3", "urgency=low", "*", "--", "<dev@debian.org>"],
}


def gen_docs(domain, n, seed=0):
    rng = random.Random(f"{domain}{seed}")
    return [" ".join(rng.choice(WORDS[domain]) for _ in range(rng.randint(5, 120))) + rng.choice(["", "\n", "\n\n"])
            for _ in range(n)]


def make_tokenizer(path: Path, bos=False, extra_tokens=0):
    """A tiny byte-level BPE (exact round trips) saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d for k in WORDS for d in gen_docs(k, 50)], trainer)
    if extra_tokens:  # pushes ids past 65535: the uint32 path
        tok.add_tokens([f"<x{i}>" for i in range(extra_tokens)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": "<s>", "add_bos_token": bos}))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def write_sources(root: Path, n=40):
    """Three domains, one per file format; returns name -> list of documents."""
    docs = {"code": gen_docs("code", n), "prose": gen_docs("prose", n), "log": gen_docs("log", n)}
    (root / "code").mkdir(parents=True)
    for i, d in enumerate(docs["code"]):
        (root / "code" / f"f{i:03d}.py").write_text(d)  # any non-row file is one document
    half = n // 2
    (root / "a.jsonl").write_text("".join(json.dumps({"meta": {"text": d}}) + "\n" for d in docs["prose"][:half]))
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"meta": {"text": d}}) + "\n\n" for d in docs["prose"][half:]))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"meta.text": docs["log"]}), root / "log.parquet")
    return docs


def run_prepare(tok, out, *extra, root=None):
    args = ["--tokenizer", str(tok), "--out", str(out), "--quiet", *map(str, extra)]
    if root is not None:
        args += ["--domain", f"code={root}/code", "--domain", f"prose={root}/*.jsonl*",
                 "--domain", f"log={root}/*.parquet", "--text-field", "meta.text"]
    return prepare.main(args)


def pieces(ids, eos, bos=None):
    """Split a bin into documents at EOS; check and strip BOS."""
    cuts = np.flatnonzero(ids == eos) + 1
    out = []
    for p in np.split(ids, cuts):
        if len(p):
            if bos is not None:
                assert p[0] == bos
                p = p[1:]
            out.append(p[:-1] if p[-1] == eos else p)
    return out


# -----------------------------------------------------------------------------
# prepare.py

def test_prepare_roundtrip_all_formats(tmp_path, tok_dir):
    docs = write_sources(tmp_path / "src")
    tok_bos = make_tokenizer(tmp_path / "tok_bos", bos=True)
    assert run_prepare(tok_bos, tmp_path / "ds", "--workers", 2, "--val-tokens", 10**6, root=tmp_path / "src") == 0
    bins = DomainBins(tmp_path / "ds")
    tok = prepare.Tokenizer(tok_bos)
    assert bins.domains == ["code", "prose", "log"] and bins.dtype == np.uint16 and tok.add_bos
    assert (bins.bos_id, bins.eos_id) == (tok.token_id("<s>"), tok.token_id("<|endoftext|>"))
    bins.check_compatible(tok.vocab_size, prepare.tokenizer_fingerprint(tok_bos))
    assert bins.meta["max_token_id"] == max(int(a.max()) for a in (*bins.train, *bins.val))  # recorded, not read
    for d, name in enumerate(bins.domains):
        train = [tok.decode(p) for p in pieces(bins.train[d], bins.eos_id, bins.bos_id)]
        val = [tok.decode(p) for p in pieces(bins.val[d], bins.eos_id, bins.bos_id)]
        assert sorted(train + val) == sorted(docs[name])  # every document exactly once, byte-exact
        assert len(val) == len(docs[name]) // prepare.VAL_EVERY  # held out by whole documents
        info = bins.meta["domains"][d]
        assert (info["train"]["docs"], info["val"]["docs"]) == (len(train), len(val))
    # the output does not depend on the number of workers
    assert run_prepare(tok_bos, tmp_path / "ds1", "--workers", 1, "--val-tokens", 10**6, root=tmp_path / "src") == 0
    for name in bins.domains:
        for split in ("train", "val"):
            assert (tmp_path / "ds" / name / f"{split}.bin").read_bytes() == \
                   (tmp_path / "ds1" / name / f"{split}.bin").read_bytes()


def test_prepare_budgets_and_no_bos(tmp_path, tok_dir):
    write_sources(tmp_path / "src")
    assert run_prepare(tok_dir, tmp_path / "ds", "--workers", 1, "--val-tokens", 300, "--max-tokens-per-domain", 1000,
                       root=tmp_path / "src") == 0
    bins = DomainBins(tmp_path / "ds")
    assert bins.meta["add_bos"] is False
    for d in range(3):
        assert (len(bins.train[d]), len(bins.val[d])) == (1000, 300)  # exact: the last document is cut
        assert bins.val[d][0] != prepare.Tokenizer(tok_dir).token_id("<s>")


def test_max_mb_caps_the_text_not_the_files(tmp_path, tok_dir):
    # JSON escapes make the file three times the text: the cap counts the text, whole documents, one past the cap
    docs = ["\u00fc\u2211 caf\u00e9 " * 200 + str(i) for i in range(60)]  # ~2.6 kB of UTF-8 each, 6 kB escaped
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert prepare.main(["--tokenizer", str(tok_dir), "--out", str(tmp_path / "ds"), "--domain",
                         f"d={tmp_path / 'src'}", "--max-mb-per-domain", "0.05", "--val-tokens", "64", "--quiet"]) == 0
    text = DomainBins(tmp_path / "ds").meta["domains"][0]["text_bytes"]
    doc = len(docs[0].encode())
    assert 50_000 <= text < 50_000 + doc + 10, text


@pytest.mark.parametrize("at", ["out_aside", "new_in_place"])
def test_prepare_force_killed_between_the_renames_loses_nothing(tmp_path, tok_dir, capsys, at):
    # SIGKILL at either rename of the --force swap (OUT -> .OUT.old, then .OUT.new -> OUT): the next run finishes
    # the swap (the complete new dataset), never deletes a complete copy, and leaves nothing beside OUT
    write_sources(tmp_path / "src")
    out = tmp_path / "ds"
    assert run_prepare(tok_dir, out, "--workers", 1, root=tmp_path / "src") == 0
    src = tmp_path / "src"
    args = ["--tokenizer", str(tok_dir), "--out", str(out), "--quiet", "--workers", "1", "--val-tokens", "100",
            "--domain", f"code={src}/code", "--domain", f"prose={src}/*.jsonl*", "--domain", f"log={src}/*.parquet",
            "--text-field", "meta.text"]
    target = str(tmp_path / ".ds.old") if at == "out_aside" else str(out)
    code = killed_after_rename(target, "prepare.main(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, *args, "--force"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (tmp_path / ".ds.old").is_dir() and (tmp_path / ".ds.new" if at == "out_aside" else out).is_dir()
    capsys.readouterr()
    assert prepare.main(args) == 0  # without --force: the new settings are what the complete copy holds
    assert "up to date" in capsys.readouterr().out
    assert DomainBins(out).meta["settings"]["val_tokens"] == 100
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_two_prepares_on_one_out(tmp_path, tok_dir):
    # a second prepare.py on the same OUT refuses at once; it never touches the first one's work in progress
    write_sources(tmp_path / "src")
    out = tmp_path / "ds"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f".ds.tmp-{other.pid}"  # a live process's half-built copy
    (live / "code").mkdir(parents=True)
    try:
        with data.dir_lock(str(out)):
            r = subprocess.run([sys.executable, "prepare.py", "--tokenizer", str(tok_dir), "--out", str(out),
                                "--quiet", "--domain", f"code={tmp_path}/src/code"], cwd=REPO, capture_output=True,
                               text=True)
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            assert f"is being written by another process (pid {os.getpid()})" in r.stderr
        assert run_prepare(tok_dir, out, "--workers", 1, root=tmp_path / "src") == 0
        assert (live / "code").is_dir()  # its process is alive: the copy is its own to finish or remove
    finally:
        other.kill()
        other.wait()
    assert run_prepare(tok_dir, out, "--workers", 1, "--force", root=tmp_path / "src") == 0
    assert not live.exists()  # once it is gone, its leftover goes


def test_prepare_uint32(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok", extra_tokens=70_000)
    (tmp_path / "src").mkdir()
    docs = [f"alpha <x{i}> beta <x69999> gamma" for i in range(0, 70_000, 2_000)]
    for i, d in enumerate(docs):
        (tmp_path / "src" / f"{i}.txt").write_text(d)
    assert run_prepare(tok_dir, tmp_path / "ds", "--domain", f"x={tmp_path}/src", "--val-tokens", 0,
                       "--workers", 1) == 0
    bins = DomainBins(tmp_path / "ds")
    tok = prepare.Tokenizer(tok_dir)
    assert bins.dtype == np.uint32 and bins.vocab_size == tok.vocab_size > 65536
    assert bins.train[0].max() >= 65536
    assert sorted(tok.decode(p) for p in pieces(bins.train[0], bins.eos_id)) == sorted(docs)
    with pytest.raises(ValueError, match="70[0-9]{3}-token vocabulary"):
        bins.check_compatible(65536)


def test_prepare_tokenizer_model_formats(tmp_path):
    """tokenizer.model as sentencepiece or as tiktoken ranks (Llama-3 style): detected, BOS added."""
    import sentencepiece as spm
    texts = gen_docs("prose", 200)
    (tmp_path / "src").mkdir()
    for i, d in enumerate(texts[:20]):
        (tmp_path / "src" / f"{i}.txt").write_text(d)
    sp_dir, tt_dir = tmp_path / "sp", tmp_path / "tt"
    sp_dir.mkdir(), tt_dir.mkdir()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=320, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    (sp_dir / "tokenizer.model").write_bytes(model.getvalue())
    # byte-level ranks plus a few merges is a valid tiktoken BPE file
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" the", b"ic", b"en"]
    lines = [f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)]
    (tt_dir / "tokenizer.model").write_text("".join(lines))
    for d, kind, vocab in ((sp_dir, "sentencepiece", 320), (tt_dir, "tiktoken", len(ranks) + 256)):
        tok = prepare.Tokenizer(d)
        assert (tok.kind, tok.vocab_size, tok.add_bos) == (kind, vocab, True)
        assert run_prepare(d, tmp_path / kind, "--domain", f"p={tmp_path}/src", "--val-tokens", 0, "--workers", 1) == 0
        bins = DomainBins(tmp_path / kind)
        assert (bins.bos_id, bins.eos_id) == (tok.bos_id, tok.eos_id)
        assert sorted(tok.decode(p) for p in pieces(bins.train[0], bins.eos_id, bins.bos_id)) == sorted(texts[:20])


def test_prepare_hf_stream(tmp_path, tok_dir, monkeypatch):
    """The --hf-dataset path with a stand-in for `datasets` (not installed here): an endless stream with a
    nested domain field is read only until the wanted domains are full."""
    sets, docs, read = ["RedPajamaGithub", "RedPajamaArXiv", "RedPajama Book"], gen_docs("log", 30), []

    def load_dataset(name, config=None, split=None, streaming=False):
        assert (name, split, streaming) == ("cerebras/SlimPajama-627B", "train", True)
        for i in range(10**6):
            read.append(i)
            yield {"text": docs[i % 30], "meta": {"redpajama_set_name": sets[i % 3]}}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert run_prepare(tok_dir, tmp_path / "ds", "--hf-dataset", "cerebras/SlimPajama-627B", "--domain-field",
                       "meta.redpajama_set_name", "--domains", "RedPajama_Book,RedPajamaGithub",
                       "--max-tokens-per-domain", 2000, "--val-tokens", 200, "--workers", 1) == 0
    bins = DomainBins(tmp_path / "ds")
    assert bins.domains == ["RedPajama_Book", "RedPajamaGithub"] and len(read) < 20_000  # ~1 MB batches ahead
    assert [(len(t), len(v)) for t, v in zip(bins.train, bins.val)] == [(2000, 200), (2000, 200)]
    assert "SlimPajama-627B" in bins.meta["domains"][0]["source"]


def test_prepare_is_noop_then_force_keeps_old_until_done(tmp_path, tok_dir, capsys):
    write_sources(tmp_path / "src")
    out = tmp_path / "ds"
    assert run_prepare(tok_dir, out, "--workers", 1, root=tmp_path / "src") == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert run_prepare(tok_dir, out, "--workers", 1, root=tmp_path / "src") == 0
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # other settings: refused without --force, naming what differs
    assert run_prepare(tok_dir, out, "--workers", 1, "--val-tokens", 100, root=tmp_path / "src") == 2
    assert "other settings (val_tokens)" in capsys.readouterr().err
    # a --force rebuild that fails midway leaves the old dataset untouched and no temp dir behind
    (tmp_path / "src" / "c.jsonl").write_text('{"meta": {"text": "fine"}}\n{not json\n')
    assert run_prepare(tok_dir, out, "--workers", 1, "--force", root=tmp_path / "src") == 2
    assert "c.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "src" / "c.jsonl").unlink()
    assert run_prepare(tok_dir, out, "--workers", 1, "--force", "--val-tokens", 100, root=tmp_path / "src") == 0
    assert DomainBins(out).meta["settings"]["val_tokens"] == 100


def test_interrupted_run_is_never_a_dataset(tmp_path, tok_dir, monkeypatch, capsys):
    write_sources(tmp_path / "src")
    out = tmp_path / "ds"
    stale = tmp_path / ".ds.tmp-999999999"  # what a killed run leaves: bins, no meta.json
    (stale / "code").mkdir(parents=True)
    (stale / "code" / "train.bin").write_bytes(b"\0" * 100)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        DomainBins(stale)
    with pytest.raises(FileNotFoundError, match="run prepare.py first"):
        DomainBins(out)
    # Ctrl-C during tokenization: nothing is left behind
    calls = []

    def interrupted(task):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return encode(task)
    encode = prepare._encode_task
    monkeypatch.setattr(prepare, "_encode_task", interrupted)
    assert run_prepare(tok_dir, out, "--workers", 1, root=tmp_path / "src") == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".ds.tmp-*"))  # the stale dir went too
    monkeypatch.undo()
    assert run_prepare(tok_dir, out, "--workers", 1, root=tmp_path / "src") == 0  # a rerun completes
    assert DomainBins(out).domains == ["code", "prose", "log"]


def test_prepare_cli_errors(tmp_path, tok_dir, capsys):
    cases = [
        (["--tokenizer", str(tmp_path / "nope")], "tokenizer dir"),
        (["--domain", "bad"], "expected NAME=GLOB"),
        (["--domain", f"x={tmp_path}/none/*.txt", "--out", str(tmp_path / "o")], "no files match"),
        (["--domain", "x=a", "--domain", "x=b", "--out", "o"], "given twice"),
        (["--domain", "x=a"], "pass --out"),
        (["--val-tokens", "-1"], "--val-tokens"),
        (["--domains", "code,nope"], "unknown demo domains ['nope']"),
        (["--hf-dataset", "a/b", "--domain-field", "meta.set", "--out", "o"], "pip install datasets"),
    ]
    for argv, msg in cases:
        if "--tokenizer" not in argv:
            argv = argv + ["--tokenizer", str(tok_dir)]
        assert prepare.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and err.startswith("prepare.py: error:"), (argv, err)
    # the real command line: one line on stderr, no traceback, non-zero exit; --help documents the flags
    r = subprocess.run([sys.executable, "prepare.py", "--tokenizer", str(tmp_path / "nope")], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "prepare.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--max-tokens-per-domain" in r.stdout and "--hf-dataset" in r.stdout


def test_demo_corpus(tmp_path, tok_dir, capsys):
    """The embedded corpus: real text from this machine, with tiny caps."""
    if not Path("/usr/share/doc").is_dir():
        pytest.skip("no /usr/share/doc (a slim image)")
    assert prepare.main(["--tokenizer", str(tok_dir), "--out", str(tmp_path / "demo"), "--max-mb-per-domain", "0.05",
                         "--val-tokens", "256", "--workers", "2", "--quiet"]) == 0
    assert "train tokens" in capsys.readouterr().out
    bins = DomainBins(tmp_path / "demo")
    assert len(bins.domains) >= 4 and {"code", "legal", "changelog"} <= set(bins.domains)
    for d, info in enumerate(bins.meta["domains"]):
        assert info["text_bytes"] > 0 and len(bins.train[d]) > 0 and info["source"]


# -----------------------------------------------------------------------------
# data.py

OFFSET = 1 << 24  # synthetic token ids: domain * OFFSET + position, so every window can be identified


def make_bins(path: Path, sizes, val=2000, dtype="uint32", vocab=None):
    """A dataset as prepare.py writes it, with position-coded tokens."""
    domains = []
    for d, n in enumerate(sizes):
        (path / f"d{d}").mkdir(parents=True)
        (np.arange(n, dtype=np.int64) + d * OFFSET).astype(dtype).tofile(path / f"d{d}" / "train.bin")
        (np.arange(val, dtype=np.int64) + d * OFFSET + n).astype(dtype).tofile(path / f"d{d}" / "val.bin")
        domains.append({"name": f"d{d}", "source": "synthetic", "text_bytes": 0,
                        "train": {"docs": 1, "tokens": n}, "val": {"docs": 1, "tokens": val}})
    meta = {"format": 1, "dtype": dtype, "vocab_size": vocab or len(sizes) * OFFSET, "bos_id": None, "eos_id": 0,
            "add_bos": False, "tokenizer_fingerprint": "sha256:test", "domains": domains, "settings": {}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def window_ids(x, dom, T):
    return ((x[:, 0] - dom * OFFSET) // T).tolist()


def test_domainbins_errors(tmp_path):
    good = make_bins(tmp_path / "ok", [500, 300])
    bins = DomainBins(good)
    assert isinstance(bins.train[0], np.ndarray) and bins.train[1][0] == OFFSET
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        bins.index("nope")

    def broken(name, edit):
        path = make_bins(tmp_path / name, [500, 300])
        edit(path)
        return path
    meta = lambda p: json.loads((p / "meta.json").read_text())  # noqa: E731
    cases = [
        (broken("nometa", lambda p: (p / "meta.json").unlink()), FileNotFoundError, "meta.json not found"),
        (broken("corrupt", lambda p: (p / "meta.json").write_text('{"format": 1, "dty')), ValueError, "corrupted"),
        (broken("nokey", lambda p: (p / "meta.json").write_text(json.dumps({**meta(p), "dtype": "int8"}))),
         ValueError, "corrupted"),
        (broken("nodomain", lambda p: (p / "d1" / "train.bin").unlink()), FileNotFoundError, "d1/train.bin is missing"),
        (broken("short", lambda p: (p / "d0" / "val.bin").write_bytes(b"\0" * 12)), ValueError, "holds 12 bytes"),
        (broken("empty", lambda p: ((p / "d1" / "train.bin").write_bytes(b""), (p / "meta.json").write_text(
            json.dumps({**meta(p), "domains": [meta(p)["domains"][0], {**meta(p)["domains"][1], "train": {
                "docs": 0, "tokens": 0}}]})))), ValueError, "'d1' .* has no training tokens"),
    ]
    for path, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            DomainBins(path)


def test_check_compatible(tmp_path):
    bins = DomainBins(make_bins(tmp_path, [100], val=800, dtype="uint16", vocab=1000))  # ids 0..899
    bins.check_compatible(1000, "sha256:test")
    bins.check_compatible(1024)  # a padded embedding is fine
    with pytest.raises(ValueError, match="1000-token vocabulary but the model has 999"):
        bins.check_compatible(999)
    with pytest.raises(ValueError, match="another tokenizer"):
        bins.check_compatible(1000, "sha256:other")


def test_sampler_world_sizes_agree(tmp_path):
    bins = DomainBins(make_bins(tmp_path, [5000, 3000, 800, 12000]))
    T, B = 16, 8
    props = [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0, 0, 1, 0], [0.1, 0.2, 0.3, 0.4]] * 6
    runs = {}
    for W in (1, 2, 4):
        samplers = [MixtureSampler(bins, T, B, seed=7) for _ in range(W)]  # one per rank, as in training
        runs[W] = [[torch.cat(t) for t in zip(*(s.next(p, r, W) for r, s in enumerate(samplers)))] for p in props]
        assert all(s.state_dict() == samplers[0].state_dict() for s in samplers)
    for W in (2, 4):
        for a, b in zip(runs[1], runs[W]):
            for ta, tb in zip(a, b):
                assert torch.equal(ta, tb)
    for x, y, dom in runs[1]:
        assert x.dtype == y.dtype == dom.dtype == torch.int64 and x.shape == y.shape == (B, T)
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)  # y is x shifted by one
        assert torch.equal(x[:, 0] // OFFSET, dom) and torch.all((x[:, 0] - dom * OFFSET) % T == 0)
    assert all(torch.all(dom == 2) for _, _, dom in runs[1][2::4])  # a one-hot mixture is exact
    with pytest.raises(ValueError, match="split evenly"):
        MixtureSampler(bins, T, B).next(props[0], rank=0, world_size=3)


def test_sampler_follows_proportions(tmp_path):
    bins = DomainBins(make_bins(tmp_path, [20000] * 4))
    B, steps = 64, 400
    p = np.array([0.5, 0.3, 0.19, 0.01])  # B*p = 0.64 rows for the last domain
    s = MixtureSampler(bins, 8, B, seed=1)
    counts = np.array([np.bincount(s.next(p)[2].numpy(), minlength=4) for _ in range(steps)])
    assert np.all(counts >= np.floor(B * p)) and np.all(counts <= np.ceil(B * p))  # systematic sampling
    assert np.allclose(counts.mean(0) / B, p, atol=0.003)
    s2 = MixtureSampler(bins, 8, B, seed=1)
    for _ in range(50):
        assert np.all(np.bincount(s2.next([0.2, 0, 0.8, 0])[2].numpy(), minlength=4)[[1, 3]] == 0)


def test_sampler_no_reuse_within_epoch(tmp_path, caplog):
    T = 10
    bins = DomainBins(make_bins(tmp_path, [401, 1001]))  # 40 and 100 windows
    s = MixtureSampler(bins, T, 8, seed=3)
    seen = {0: [], 1: []}
    with caplog.at_level(logging.WARNING, logger="data"):
        for _ in range(30):
            x, _, dom = s.next([0.5, 0.5])
            for w, d in zip(window_ids(x, dom, T), dom.tolist()):
                seen[d].append(w)
    assert sorted(seen[0][:40]) == list(range(40)) and sorted(seen[0][40:80]) == list(range(40))
    assert seen[0][:40] != seen[0][40:80]  # a new epoch, a new order
    assert sorted(seen[1][:100]) == list(range(100))
    assert s.epoch[0] == len(seen[0]) // 40 >= 2 and s.epoch[1] == len(seen[1]) // 100
    assert "domain 'd0': all 40 windows" in caplog.text and "starting epoch 1" in caplog.text


def test_sampler_permutation_is_int32_and_unchanged(tmp_path):
    """Windows are permuted as int32 (half the memory of int64) in the same order as permutation(n) gives."""
    bins = DomainBins(make_bins(tmp_path, [4001, 1001]))
    s = MixtureSampler(bins, 10, 8, seed=5)
    s.next([0.5, 0.5])
    for d, n in enumerate(s.windows):
        assert s._perm[d].dtype == np.int32
        np.testing.assert_array_equal(s._perm[d], np.random.default_rng([5, 1, d, 0]).permutation(n))


def test_sampler_resume_is_exact(tmp_path):
    bins = DomainBins(make_bins(tmp_path, [801, 5000, 2000]))
    props = lambda i: np.roll([0.6, 0.3, 0.1], i % 3)  # noqa: E731  (changes every step)
    a = MixtureSampler(bins, 10, 16, seed=11)
    for i in range(9):  # domain 0 (80 windows) wraps around in here
        a.next(props(i))
    state = json.loads(json.dumps(a.state_dict()))  # plain ints and lists
    b = MixtureSampler(DomainBins(tmp_path), 10, 16, seed=11)
    b.load_state_dict(state)
    for i in range(9, 20):
        for ta, tb in zip(a.next(props(i), 1, 2), b.next(props(i), 1, 2)):
            assert torch.equal(ta, tb)
    assert a.state_dict() == b.state_dict() and a.epoch[0] >= 1
    with pytest.raises(ValueError, match="seq_len was 10"):
        MixtureSampler(bins, 12, 16, seed=11).load_state_dict(state)


def test_sampler_bad_inputs(tmp_path):
    bins = DomainBins(make_bins(tmp_path, [500, 500, 500]))
    s = MixtureSampler(bins, 10, 4)
    for p, msg in [([0.5, 0.5], "one entry per domain"), ([0.5, 0.2, 0.2], "sum to 1"),
                   ([1.2, -0.1, -0.1], "non-negative"), ([np.nan, 0.5, 0.5], "finite"),
                   ([[0.2, 0.3, 0.5]], "one entry per domain")]:
        with pytest.raises(ValueError, match=msg):
            s.next(p)
    assert s.step == 0  # a refused call draws nothing
    s.next(torch.tensor([0.2, 0.3, 0.5]))  # tensors are fine
    with pytest.raises(ValueError, match="fewer than seq_len"):
        MixtureSampler(bins, 500, 4)


def test_val_batches(tmp_path):
    bins = DomainBins(make_bins(tmp_path, [500, 500], val=1000))
    full = list(bins.val_batches("d1", seq_len=16, batch_size=8, max_batches=5))
    assert len(full) == 5 and all(x.shape == y.shape == (8, 16) for x, y in full)
    x0, y0 = full[0]
    assert x0[0, 0] == OFFSET + 500 and torch.equal(y0[:, :-1], x0[:, 1:])
    again = list(bins.val_batches(1, 16, 8, 5))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    assert len(list(bins.val_batches("d1", 16, 8))) == (1000 - 1) // 16 // 8  # whole batches only
    ranks = [list(bins.val_batches("d1", 16, 8, 5, rank=r, world_size=4)) for r in range(4)]
    for b in range(5):
        assert torch.equal(torch.cat([ranks[r][b][0] for r in range(4)]), full[b][0])
    with pytest.raises(ValueError, match="fewer than one batch"):
        bins.val_batches("d0", 200, 8)


def test_document_end_token(tmp_path):
    """A chat model's configured EOS (a turn end) is not used between documents when the tokenizer has a
    document-end token; --eos-token overrides; an unknown --eos-token is a clear error."""
    d = make_tokenizer(tmp_path / "tok")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>", "add_bos_token": False}))
    tok = prepare.Tokenizer(d)
    assert tok.eos_id == tok.token_id("<|endoftext|>") != tok.token_id("<s>")
    assert prepare.Tokenizer(d, eos_token="<s>").eos_id == tok.token_id("<s>")
    with pytest.raises(prepare.PrepareError, match="not a token"):
        prepare.Tokenizer(d, eos_token="<nope>")
