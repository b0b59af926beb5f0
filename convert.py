"""
Weights in and out: Hugging Face directories, hub ids and GGUF files -> our Transformer; our models -> a
Hugging Face directory that `transformers.AutoModelForCausalLM.from_pretrained` loads with identical outputs.

    python convert.py to-hf SRC OUT [--dtype bfloat16] [--max-shard-size 5GB] [--force]
    python convert.py to-hf out/run OUT      # a train.py run's latest checkpoint (compacted if still pruning)
    python convert.py verify DIR             # transformers and our model compute the same logits

    model = convert.load_model(path)         # HF dir, hub id, .gguf or run directory -> Transformer

SRC is a local Hugging Face directory (model.safetensors, sharded safetensors with model.safetensors.index.json,
or pytorch_model*.bin), a hub id already in the local hub cache (or downloadable when online), or a .gguf file
(dequantized; its tokenizer is rebuilt with transformers). OUT gets config.json, model.safetensors (sharded above
--max-shard-size), generation_config.json and the tokenizer files of the source. OUT is written to a temporary
directory first and renamed into place, so an existing OUT is never left half-written.

Llama and Qwen2 checkpoints already use our module names; GPT-NeoX (Pythia) is mapped through KEYS_NEOX and its
fused query_key_value (per head [q | k | v]) is split into q_proj / k_proj / v_proj.
"""

import argparse
import dataclasses
import glob
import json
import os
import pickle
import re
import shutil
import struct
import sys

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoint import CheckpointError, is_run_dir, load_run
from data import DirExists, DirInUse, replace_dir
from model import ModelConfig, Transformer, tied_state_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")

# GPT-NeoX name -> our name; `{}` is the layer index, None = not a weight (old checkpoints store buffers)
KEYS_NEOX = {
    "gpt_neox.embed_in.weight": "model.embed_tokens.weight",
    "gpt_neox.layers.{}.input_layernorm.{}": "model.layers.{}.input_layernorm.{}",
    "gpt_neox.layers.{}.post_attention_layernorm.{}": "model.layers.{}.post_attention_layernorm.{}",
    "gpt_neox.layers.{}.attention.dense.{}": "model.layers.{}.self_attn.o_proj.{}",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.{}": "model.layers.{}.mlp.up_proj.{}",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.{}": "model.layers.{}.mlp.down_proj.{}",
    "gpt_neox.final_layer_norm.{}": "model.norm.{}",
    "embed_out.weight": "lm_head.weight",
    "gpt_neox.layers.{}.attention.bias": None,
    "gpt_neox.layers.{}.attention.masked_bias": None,
    "gpt_neox.layers.{}.attention.rotary_emb.inv_freq": None,
}
KEYS_NEOX_INV = {v: k for k, v in KEYS_NEOX.items() if v is not None}


class ConvertError(Exception):
    """A user-facing problem with an input: printed as one line by the CLI."""


def _rename(key: str, table: dict) -> str | None:
    """Map a key through a `{}`-template table: layer indices and the trailing weight/bias fill the `{}`."""
    parts = re.findall(r"\.(\d+)\.", key)
    tmpl = re.sub(r"\.\d+\.", ".{}.", key)
    head, _, last = tmpl.rpartition(".")
    if tmpl in table:
        new = table[tmpl]
    elif head + ".{}" in table:
        new, parts = table[head + ".{}"], parts + [last]
    else:
        raise ConvertError(f"unexpected weight {key!r}")
    return None if new is None else new.format(*parts)


def hf_to_ours(sd: dict, cfg: ModelConfig) -> dict:
    if not cfg.neox:
        return {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    nh, hs = cfg.num_attention_heads, cfg.head_dim
    out = {}
    for k, v in sd.items():
        if ".attention.query_key_value." in k:
            i, kind = re.search(r"layers\.(\d+)\..*\.(weight|bias)$", k).groups()
            qkv = v.view(nh, 3, hs, *v.shape[1:])  # per head [q | k | v], each hs wide
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"model.layers.{i}.self_attn.{name}.{kind}"] = qkv[:, j].reshape(nh * hs, *v.shape[1:])
            continue
        new = _rename(k, KEYS_NEOX)
        if new is not None:
            out[new] = v
    return out


def ours_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    sd = tied_state_dict(cfg, sd, lm_head=False)
    if not cfg.neox:
        return sd
    nh, hs = cfg.num_attention_heads, cfg.head_dim
    out = {}
    for k, v in sd.items():
        m = re.match(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            if m.group(2) == "q":  # fuse once per layer and kind, from the q key
                i, kind = m.group(1), m.group(3)
                qkv = [sd[f"model.layers.{i}.self_attn.{c}_proj.{kind}"].view(nh, 1, hs, *v.shape[1:]) for c in "qkv"]
                out[f"gpt_neox.layers.{i}.attention.query_key_value.{kind}"] = \
                    torch.cat(qkv, dim=1).reshape(3 * nh * hs, *v.shape[1:])
            continue
        out[_rename(k, KEYS_NEOX_INV)] = v
    return out


# -----------------------------------------------------------------------------
# reading

def resolve(src: str) -> str:
    """A local directory or .gguf file for SRC; a hub id is fetched through huggingface_hub (the cache when offline)."""
    if os.path.isdir(src) or src.endswith(".gguf"):
        if not os.path.exists(src):
            raise ConvertError(f"no such file: {src}")
        return src
    if os.path.exists(src):
        raise ConvertError(f"{src} is neither a model directory nor a .gguf file")
    if src.startswith((".", "/")) or src.count("/") != 1:
        raise ConvertError(f"no such model directory: {src} (and it is not a hub id of the form owner/name)")
    if os.path.isdir(src.split("/")[0]):  # models/typo: a local path, not the hub id owner "models"
        raise ConvertError(f"no such model directory: {src} (in {src.split('/')[0]}/: "
                           f"{', '.join(sorted(os.listdir(src.split('/')[0]))[:8]) or 'nothing'})")
    from huggingface_hub import snapshot_download
    files = ["*.json", "*.model", "*.txt", "*.jinja"]
    try:
        path = snapshot_download(src, allow_patterns=files + ["*.safetensors"])
        if not glob.glob(os.path.join(path, "*.safetensors")):  # only then the (often duplicate) .bin weights
            path = snapshot_download(src, allow_patterns=files + ["pytorch_model*.bin"])
        return path
    except Exception as e:
        raise ConvertError(f"could not get {src} from the Hugging Face hub or its local cache "
                           f"({type(e).__name__}); download it first or pass a local directory") from None


def _read_weights(path: str) -> dict:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    sd = {}
    if files:
        for fn in files:
            try:
                with safe_open(fn, framework="pt") as f:
                    for k in f.keys():
                        sd[k] = f.get_tensor(k)
            except (SafetensorError, OSError) as e:
                raise ConvertError(f"{fn} is not a readable safetensors file ({str(e).splitlines()[0]}); it may "
                                   "be truncated or corrupted: download or export it again") from None
        return sd
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise ConvertError(f"{path} has no *.safetensors or pytorch_model*.bin weights")
    for fn in files:
        try:
            sd.update(torch.load(fn, map_location="cpu", weights_only=True, mmap=True))
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ConvertError(f"{fn} is not a readable PyTorch weights file ({str(e).splitlines()[0]}); it may "
                               "be truncated or corrupted: download it again") from None
    return sd


def _read_gguf(path: str) -> tuple[ModelConfig, dict]:
    """A llama-architecture GGUF file -> (config, HF-named fp32 weights). Quantized tensors are dequantized."""
    import numpy as np
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise ConvertError("reading .gguf needs the gguf package: pip install gguf") from None
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConvertError(f"{path}: GGUF architecture {arch!r} is not supported (only llama)")
    g = lambda k, default=None: meta.get(f"llama.{k}", default)
    nh, d = g("attention.head_count"), g("embedding_length")
    nkv = g("attention.head_count_kv", nh)
    vocab = g("vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    tensors = {t.name: t for t in r.tensors}
    if "rope_freqs.weight" in tensors:  # Llama-3.1-style frequency factors, stored as a tensor
        raise ConvertError(f"{path}: GGUF RoPE frequency factors (rope_freqs) are not supported; convert the "
                           "Hugging Face checkpoint instead")
    scaling = {"none": None, None: None, "linear": {"rope_type": "linear", "factor": g("rope.scaling.factor")}}
    if g("rope.scaling.type") not in scaling:
        raise ConvertError(f"{path}: GGUF rope scaling {g('rope.scaling.type')!r} is not supported (only linear)")
    tok = lambda k: int(r.fields[k].contents()) if k in r.fields else None
    cfg = ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=d, intermediate_size=g("feed_forward_length"),
        num_hidden_layers=g("block_count"), num_attention_heads=nh, num_key_value_heads=nkv,
        head_dim=g("attention.key_length", d // nh), max_position_embeddings=g("context_length", 2048),
        # GGUF stores these as float32: round back to the decimal they came from (1e-05, not 9.9999997e-06)
        rms_norm_eps=float(f'{g("attention.layer_norm_rms_epsilon", 1e-5):.6g}'),
        rope_theta=float(f'{g("rope.freq_base", 1e4):.7g}'), rope_scaling=scaling[g("rope.scaling.type")],
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=tok("tokenizer.ggml.bos_token_id"), eos_token_id=tok("tokenizer.ggml.eos_token_id"),
    )
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}

    def unpermute(w, n):  # llama.cpp stores q/k rows interleaved for its RoPE; back to rotate-half order
        return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    sd = {}
    for name, t in tensors.items():
        m = re.match(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$", name)
        if not m or m.group(2) not in names:
            raise ConvertError(f"{path}: unexpected GGUF tensor {name!r}")
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:  # types gguf-py has no dequantizer for (F64, Q8_1, Q8_K, the integer types)
            raise ConvertError(f"{path}: tensor {name!r} is of GGUF type {t.tensor_type.name}, which the gguf "
                               "package cannot dequantize; convert a file with F32, F16, BF16 or Q4_0..Q6_K "
                               "tensors (or the Hugging Face checkpoint)") from None
        if m.group(2) == "attn_q":
            w = unpermute(w, nh)
        elif m.group(2) == "attn_k":
            w = unpermute(w, nkv)
        key = names[m.group(2)] + "." + m.group(3)
        sd[key if m.group(1) is None else f"model.layers.{m.group(1)}.{key}"] = torch.from_numpy(w.copy())
    return cfg, sd


def load_hf(src: str, dtype=torch.float32) -> tuple[ModelConfig, dict]:
    """SRC (HF directory, hub id, or .gguf) -> (ModelConfig, state dict in our names, `dtype`); a tied model's
    has no lm_head.weight."""
    path = resolve(src)
    if path.endswith(".gguf"):
        try:
            cfg, sd = _read_gguf(path)
        except ConvertError:
            raise
        except (ValueError, KeyError, IndexError, TypeError, struct.error, OSError) as e:
            raise ConvertError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0]}); "
                               "it may be truncated or corrupted: download it again") from None
    else:
        try:
            with open(os.path.join(path, "config.json")) as f:
                cfg = ModelConfig.from_hf(json.load(f))
        except FileNotFoundError:
            raise ConvertError(f"{path} has no config.json") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"{path}/config.json is not a usable model config: {e}") from None
        sd = hf_to_ours(_read_weights(path), cfg)
        head, embed = sd.get("lm_head.weight"), sd.get("model.embed_tokens.weight")
        if cfg.tie_word_embeddings and head is not None and embed is not None and not torch.equal(head, embed):
            # a head of its own in the file: transformers then leaves the two untied, and so do we (the model the
            # user has), where dropping it would prune another model
            print(f"warning: {path}/config.json ties the embeddings, but its weights hold a separate lm_head.weight: "
                  "used untied, as transformers does (set tie_word_embeddings to false there to silence this)",
                  file=sys.stderr)
            cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    with torch.device("meta"):
        expected = tied_state_dict(cfg, {k: v.shape for k, v in Transformer(cfg).state_dict().items()}, lm_head=False)
    sd = tied_state_dict(cfg, sd, lm_head=False)
    missing, unexpected = expected.keys() - sd.keys(), sd.keys() - expected.keys()
    if missing or unexpected:
        raise ConvertError(f"{src}: weights do not match the config: {len(missing)} missing "
                           f"{sorted(missing)[:3]}, {len(unexpected)} unexpected {sorted(unexpected)[:3]}")
    if wrong := [k for k in sorted(sd) if sd[k].shape != expected[k]]:
        raise ConvertError(f"{src}: weights do not match the config: {wrong[0]} has shape "
                           f"{tuple(sd[wrong[0]].shape)}, expected {tuple(expected[wrong[0]])} ({len(wrong)} such)")
    return cfg, {k: v.to(dtype) for k, v in sd.items()}


def load_model(path: str, dtype=torch.float32) -> Transformer:
    """Any model this project reads: a Hugging Face directory, a hub id (cached), a .gguf file, or a train.py run
    directory (its final export hf/, else its latest checkpoint, compacted if the run is still pruning). Raises
    ConvertError, or CheckpointError for a run directory without a whole checkpoint."""
    if is_run_dir(path):
        if not os.path.isfile(os.path.join(path, "hf", "config.json")):
            cfg, sd, _ = load_run(path)
            return Transformer.from_state_dict(cfg, {k: v.to(dtype) for k, v in sd.items()})
        path = os.path.join(path, "hf")
    return Transformer.from_state_dict(*load_hf(path, dtype=dtype))


def load_tokenizer(path: str):
    """The transformers tokenizer of anything load_model reads: a directory's tokenizer files, a .gguf file's
    vocabulary, a run directory's export hf/ (else the tokenizer of the model it started from)."""
    from transformers import AutoTokenizer
    if is_run_dir(path):
        hf = os.path.join(path, "hf")
        if any(os.path.isfile(os.path.join(hf, f)) for f in ("tokenizer.json", "tokenizer.model")):
            return AutoTokenizer.from_pretrained(hf)
        with open(os.path.join(path, "config.json")) as f:
            return load_tokenizer(json.load(f)["init_from"])
    src = resolve(path)
    if src.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(src)), gguf_file=os.path.basename(src))
    if not any(os.path.isfile(os.path.join(src, f)) for f in ("tokenizer.json", "tokenizer.model")):
        raise ConvertError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model)")
    return AutoTokenizer.from_pretrained(src)


# -----------------------------------------------------------------------------
# writing

def _parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", s.upper())
    if not m:
        raise ConvertError(f"bad size {s!r}; use e.g. 500MB or 5GB")
    # decimal units, as transformers' save_pretrained counts them
    return int(float(m.group(1)) * {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9,
                                    "GB": 1e9}[m.group(2)])


def _save_weights(sd: dict, out: str, max_shard_bytes: int):
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + n
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def export_hf(model: Transformer, out: str, tokenizer_src: str | None = None, dtype=None,
              max_shard_size: str = "5GB", force: bool = False):
    """Write `model` as a Hugging Face directory at `out`, durably (data.replace_dir: a kill or a full disk at any
    point leaves the old `out` or the new one, never a mix, and the next export cleans up). A write error is an
    OSError (safetensors' own error type included)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConvertError(f"{out} exists and is not a directory")
    cfg = model.config
    sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    max_shard = _parse_size(max_shard_size)

    def build(tmp):
        try:
            _save_weights(ours_to_hf(sd, cfg), tmp, max_shard)
        except SafetensorError as e:  # its I/O errors (a full disk) are not OSErrors
            raise OSError(f"could not write the weights in {out}: {e}") from None
        hf = cfg.to_hf()
        hf["dtype"] = hf["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")  # 5.x, 4.x
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        _copy_tokenizer(tokenizer_src, tmp)
        if not os.path.exists(os.path.join(tmp, "generation_config.json")):
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
        _ordinary_modes(tmp)
    try:
        replace_dir(out, build, force=force)
    except DirExists:
        raise ConvertError(f"{out} exists and is not empty; pass --force to replace it") from None
    except DirInUse as e:
        raise ConvertError(str(e)) from None


def _ordinary_modes(path: str):
    """mkdtemp makes a private directory and safetensors writes 0600 files: give the export the modes any new file
    gets here (0666 / 0777 less the umask), like the rest of the run directory."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _copy_tokenizer(src: str | None, out: str):
    if src is None:
        return
    if src.endswith(".gguf"):  # rebuild tokenizer.json from the GGUF vocabulary and merges
        try:
            from transformers import AutoTokenizer
        except ImportError:
            print("warning: transformers is not installed; no tokenizer written for the GGUF model", file=sys.stderr)
            return
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(src)), gguf_file=os.path.basename(src))
        tok.save_pretrained(out)
        return
    for fn in TOKENIZER_FILES + ("generation_config.json",):
        if os.path.exists(os.path.join(src, fn)):
            shutil.copy(os.path.join(src, fn), os.path.join(out, fn))


def verify(path: str, atol: float) -> int:
    """Load `path` with transformers and with our model (fp32) and compare logits on random tokens."""
    try:
        import transformers
    except ImportError:
        raise ConvertError("verify needs transformers: pip install transformers") from None
    if not os.path.isdir(path):
        raise ConvertError(f"no such model directory: {path}")
    ours = Transformer.from_state_dict(*load_hf(path)).eval()  # a Hugging Face directory, as transformers reads
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    ok = diff <= atol
    print(f"{path}: max |logits(ours) - logits(transformers)| = {diff:.3g} over 2x64 random tokens: "
          f"{'OK' if ok else 'MISMATCH'} (atol {atol:g})")
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("to-hf", help="write SRC as a Hugging Face model directory OUT")
    t.add_argument("src", help="HF model directory, hub id (owner/name), .gguf file, or a train.py run directory "
                   "(its final hf/ once finished, else its latest checkpoint)")
    t.add_argument("out", help="output directory")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight dtype to write (default: as loaded, float32)")
    t.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size (default 5GB)")
    t.add_argument("--force", action="store_true", help="replace OUT if it exists")
    v = sub.add_parser("verify", help="check that transformers and our model compute the same logits for DIR")
    v.add_argument("dir", help="Hugging Face model directory")
    v.add_argument("--atol", type=float, default=1e-4, help="largest allowed |logit difference| (default 1e-4)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "verify":
            sys.exit(verify(args.dir, args.atol))
        if os.path.abspath(args.src) == os.path.abspath(args.out):
            raise ConvertError("SRC and OUT are the same directory")
        _parse_size(args.max_shard_size)
        dtype = getattr(torch, args.dtype or "float32")
        final = os.path.join(args.src, "hf")
        if is_run_dir(args.src) and os.path.isfile(os.path.join(args.src, "done.json")) and os.path.isdir(final):
            path = final  # a finished run: its final weights, which no checkpoint holds
            cfg, sd = load_hf(path, dtype=dtype)
        elif is_run_dir(args.src):  # its latest checkpoint, compacted if it is still pruning
            cfg, sd, path = load_run(args.src)
            sd = {k: v.to(dtype) for k, v in sd.items()}
        else:
            path = resolve(args.src)
            cfg, sd = load_hf(path, dtype=dtype)
        model = Transformer.from_state_dict(cfg, sd)
        export_hf(model, args.out, tokenizer_src=path, max_shard_size=args.max_shard_size, force=args.force)
    except (ConvertError, CheckpointError, OSError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # export_hf writes to a temporary directory: nothing partial is left
        out = getattr(args, "out", None)
        print("convert.py: interrupted" + (f"; {out} was not written or changed" if out else ""), file=sys.stderr)
        sys.exit(130)
    cfg = model.config
    print(f"wrote {args.out}: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, "
          f"{model.num_params() / 1e6:.1f}M non-embedding params")


if __name__ == "__main__":
    main()
