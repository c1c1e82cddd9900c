"""
GPT-2's files in Hugging Face's format, read and written by torch and the standard library
alone: config.json, safetensors (or a pytorch_model.bin), the hub download, the tokenizer files
(from tiktoken's own data), and what a name for GPT.from_pretrained leads to (find_weights).
GPT.from_pretrained and GPT.save_pretrained (model.py) use them. Our parameter names are HF's,
but its Conv1D weights are (in, out), the transpose of nn.Linear's.
"""
import json
import math
import os
import re
from typing import NamedTuple

import torch

# the hub models, 124M to 1558M parameters; a module-level table so tests can register a tiny entry
PRETRAINED = {name: dict(n_layer=L, n_head=H, n_embd=C) for name, L, H, C in [
    ("gpt2", 12, 12, 768), ("gpt2-medium", 24, 16, 1024),
    ("gpt2-large", 36, 20, 1280), ("gpt2-xl", 48, 25, 1600)]}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16}


def read_hf_config(path) -> dict:
    """a Hugging Face GPT-2 config.json -> GPTConfig's arguments, or a clear error"""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a model folder needs a Hugging Face GPT-2 config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from e
    bad = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")
           if not isinstance(hf.get(k), int) or hf[k] < 1]
    if bad:
        raise ValueError(f"{path}: missing GPT-2 config keys {bad} (or not positive integers)")
    # reject what this implementation does not compute, instead of silently computing something else
    supported = {"model_type": ("gpt2",), "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
                 "n_inner": (None, 4 * hf["n_embd"]), "layer_norm_epsilon": (1e-5,),
                 "scale_attn_by_inverse_layer_idx": (False,)}
    for key, allowed in supported.items():
        if hf.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{path}: {key} = {hf[key]!r} is not supported, expected one of {allowed}")
    if hf["n_embd"] % hf["n_head"]:
        raise ValueError(f"{path}: n_head={hf['n_head']} must divide n_embd={hf['n_embd']}")
    return dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True)


def hf_config(c) -> dict:
    """GPTConfig c -> the config.json transformers.GPT2LMHeadModel reads"""
    eot = 50256 if c.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if this vocab has it
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size,
                n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                n_head=c.n_head, n_inner=None, activation_function="gelu_new",
                layer_norm_epsilon=1e-5, initializer_range=0.02, resid_pdrop=c.dropout,
                embd_pdrop=c.dropout, attn_pdrop=c.dropout, scale_attn_weights=True,
                scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                tie_word_embeddings=True, use_cache=True, torch_dtype="float32",
                bos_token_id=eot, eos_token_id=eot)


def to_hf_layout(sd) -> dict:
    """our state dict -> HF's: Conv1D weights transposed, lm_head left out (it is tied to wte)"""
    return {k: v.t() if k.endswith(CONV1D) else v for k, v in sd.items() if k != "lm_head.weight"}


def from_hf_layout(sd, expected, source) -> dict:
    """HF GPT-2 state dict -> ours (float32), fully checked against `expected` (our state_dict)."""
    out = {}
    for k, v in sd.items():
        short = k.removeprefix("transformer.")  # the hub's own gpt2 files have no prefix
        if short.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # old HF causal-mask buffers, not weights; lm_head is tied to wte (see below)
        key = "transformer." + short
        if key not in expected:
            raise ValueError(f"{source}: unexpected tensor {k!r} (not part of GPT-2)")
        v = v.t() if key.endswith(CONV1D) else v
        if v.shape != expected[key].shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected "
                             f"{tuple(expected[key].shape)} from the config "
                             f"(Conv1D weights are stored (in, out))")
        out[key] = v.to(torch.float32).contiguous()
    missing = [k for k in expected if k not in out and k != "lm_head.weight"]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}{more}")
    wte = out["transformer.wte.weight"]
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"].float(), wte):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight, but GPT-2 ties them")
    out["lm_head.weight"] = wte
    return out


def load_torch_bin(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: could not read PyTorch weights ({e})") from e


def load_safetensors(path, header_only=False) -> dict:
    """8-byte little-endian header length, JSON header, raw tensor bytes; all checked (header_only:
    read no tensor data)"""
    size, out = os.path.getsize(path), {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(size - 8, 100_000_000):
            raise ValueError(f"{path}: not a valid safetensors file (header length {n}, file size "
                             f"{size} bytes); the file is truncated or corrupt, delete it and download again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from e
        header.pop("__metadata__", None)
        for name, info in header.items():
            if info.get("dtype") not in ST_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, "
                                 f"expected F64/F32/F16/BF16")
            dtype, (begin, end) = ST_DTYPES[info["dtype"]], info["data_offsets"]
            nbytes = math.prod(info["shape"]) * dtype.itemsize
            if end - begin != nbytes or begin < 0 or 8 + n + end > size:
                raise ValueError(f"{path}: truncated or corrupt, tensor {name!r} {info['shape']} "
                                 f"({nbytes} bytes) at bytes {8 + n + begin}..{8 + n + end} of {size}; "
                                 f"delete it and download again")
            if not header_only:
                buf = bytearray(nbytes)
                f.seek(8 + n + begin)
                f.readinto(buf)
                if buf:
                    out[name] = torch.frombuffer(buf, dtype=dtype).view(info["shape"])
                else:  # frombuffer refuses b""
                    out[name] = torch.empty(0, dtype=dtype).view(info["shape"])
    return out


def save_safetensors(tensors: dict, path) -> None:
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, v in tensors.items():
        end = offset + v.numel() * 4
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, end]}
        offset = end
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # pad so the tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(hjson).to_bytes(8, "little") + hjson)
        for v in tensors.values():
            f.write(v.numpy().astype("<f4", copy=False).data)  # little-endian on any machine


# -----------------------------------------------------------------------------
# what a name leads to: a folder, a dpo.py run, an official name or a hub repo (downloaded once)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# a hub repo id, user/name, each part starting with a letter or digit (never . or ..: the cache
# path is made from it); a path that does not exist may look the same, so its error says both
HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# the fields of GPTConfig a dpo.py checkpoint's model_config must give (dropout is the loader's)
RUN_SHAPE = {"block_size": int, "vocab_size": int, "n_layer": int, "n_head": int, "n_embd": int,
             "bias": bool}


class Found(NamedTuple):
    config: dict  # GPTConfig's arguments
    tensors: dict  # the state dict as stored
    path: str  # the weights file, for messages
    ours: bool  # a dpo.py checkpoint: our layout; else Hugging Face's (from_hf_layout)


def is_hub_repo(name) -> bool:
    """user/name, unless it ends in .pt or its first part is a folder here: out/typo is a
    missing run folder, not a download"""
    if not HUB_REPO.fullmatch(name) or name.endswith(".pt"):
        return False
    return not os.path.isdir(name.split("/")[0])


def find_weights(name, cache_dir=None, base_url=None) -> Found:
    """GPT.from_pretrained's name_or_path -> the config and the tensors it names: a folder with
    config.json (Hugging Face's), a run folder with ckpt.pt or that file (dpo.py's), an official
    GPT-2 name, or a hub repo user/name in GPT-2's layout (both downloaded once into the cache)"""
    hint = (f"expected one of {', '.join(PRETRAINED)}, a hub repo user/name, a folder with "
            f"config.json and model.safetensors, or a dpo.py run folder with ckpt.pt")
    if os.path.isdir(name):
        has_config = os.path.isfile(os.path.join(name, "config.json"))
        if not has_config and os.path.isfile(os.path.join(name, "ckpt.pt")):
            return read_run(os.path.join(name, "ckpt.pt"))
        if not has_config:
            raise FileNotFoundError(f"{name}: config.json not found and no ckpt.pt: {hint}")
        return read_hf_folder(name)
    if os.path.isfile(name):
        return read_run(name)
    if name in PRETRAINED:
        path = download_file(name, "model.safetensors", cache_dir, base_url)
        return Found(dict(PRETRAINED[name]), load_safetensors(path), path, ours=False)
    if is_hub_repo(name):
        return read_hf_folder(download_repo(name, cache_dir, base_url))
    if os.sep in name or name.startswith((".", "~")):
        raise FileNotFoundError(f"model folder {name} does not exist ({hint})")
    raise ValueError(f"unknown model name {name!r}: {hint}")


def read_hf_folder(folder) -> Found:
    config = read_hf_config(os.path.join(folder, "config.json"))
    found = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
    if not found:
        raise FileNotFoundError(f"{folder}: no weights file, expected model.safetensors or "
                                f"pytorch_model.bin (a sharded checkpoint must be re-saved as one file)")
    path = os.path.join(folder, found[0])
    tensors = load_torch_bin(path) if path.endswith(".bin") else load_safetensors(path)
    return Found(config, tensors, path, ours=False)


def read_run(path) -> Found:
    """a dpo.py checkpoint's weights ("model") and shape ("model_config"); mmap: the optimizer
    state beside them is never read"""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a torch file, truncated, or a pickle we refuse to run
        why = " ".join(f"{type(e).__name__}: {e}".split())[:150]
        raise ValueError(f"{path}: not a readable dpo.py checkpoint ({why}); pass a run folder, "
                         f"its ckpt.pt, or a Hugging Face folder with config.json") from None
    weights = ck.get("model") if isinstance(ck, dict) else None
    if not isinstance(weights, dict) or not isinstance(ck.get("model_config"), dict):
        raise ValueError(f"{path}: not a dpo.py checkpoint (no model / model_config)")
    saved = ck["model_config"]
    bad = []
    for key, typ in RUN_SHAPE.items():
        value = saved.get(key)
        if type(value) is not typ or (typ is int and value < 1):
            bad.append(key)
    if bad:
        raise ValueError(f"{path}: model_config has no GPT-2 shape ({bad} missing, mistyped or < 1)")
    if saved["n_embd"] % saved["n_head"]:
        raise ValueError(f"{path}: model_config: n_head={saved['n_head']} must divide "
                         f"n_embd={saved['n_embd']}")
    config = {k: saved[k] for k in RUN_SHAPE}
    config["reward_head"] = saved.get("reward_head") is True  # a reward model's scalar head
    # float32 copies: the model does not keep the mapped file behind its tensors
    tensors = {}
    for k, v in weights.items():
        if isinstance(v, torch.Tensor):
            tensors[k] = v.to(torch.float32, copy=True)
    return Found(config, tensors, path, ours=True)


def check_safetensors(path) -> None:
    load_safetensors(path, header_only=True)


def download_file(name, filename, cache_dir=None, base_url=None, check=None) -> str:
    """the hub's name/resolve/main/filename, fetched once into $NANODPO_CACHE/name/filename;
    check(path) raises ValueError for a file not to keep (truncated, a config that is not GPT-2)"""
    from prepare import download  # the shared downloader: progress, size check, no leftovers
    cache_dir = cache_dir or os.environ.get("NANODPO_CACHE") or os.path.expanduser("~/.cache/nanodpo")
    base_url = base_url or os.environ.get("NANODPO_HF_BASE_URL") or "https://huggingface.co"
    url = f"{base_url.rstrip('/')}/{name}/resolve/main/{filename}"
    path = os.path.join(cache_dir, name, filename)
    check = check or check_safetensors
    if not os.path.isfile(path):  # fetched under a per-process name (ranks may race), then moved
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            download(url, tmp)
            check(tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise OSError(f"{e}; check the network, set $NANODPO_HF_BASE_URL, or pass a local "
                          f"model folder") from e
        except ValueError as e:
            raise ValueError(f"downloaded {url} is not valid: {e}") from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def download_repo(name, cache_dir=None, base_url=None) -> str:
    """a hub repo user/name in GPT-2's layout -> its folder in the cache: config.json first (a
    repo that is not GPT-2 is refused before its weights come), then model.safetensors, else
    pytorch_model.bin"""
    where = f"{name} is not a local folder, and as a Hugging Face hub repo"
    try:
        config = download_file(name, "config.json", cache_dir, base_url, check=read_hf_config)
    except OSError as e:
        raise OSError(f"{where}: {e}") from None
    folder = os.path.dirname(config)
    if any(os.path.isfile(os.path.join(folder, f)) for f in WEIGHT_FILES):
        return folder
    try:
        download_file(name, WEIGHT_FILES[0], cache_dir, base_url)
    except OSError as e:  # no safetensors there: the older format
        try:
            download_file(name, WEIGHT_FILES[1], cache_dir, base_url, check=load_torch_bin)
        except OSError:
            raise OSError(f"{where}: {e} (pytorch_model.bin could not be downloaded either; "
                          f"a sharded checkpoint is not supported)") from None
    return folder


# -----------------------------------------------------------------------------
# GPT-2's tokenizer files for transformers.AutoTokenizer, from tiktoken's own data

GPT2_VOCAB = 50257  # tiktoken's GPT-2: 256 bytes, 50000 merges, <|endoftext|>
EOT_TEXT = "<|endoftext|>"


def byte_to_unicode() -> dict:
    """GPT-2's vocab.json and merges.txt spell each byte as one printable character: the 188
    printable ones as themselves, the other 68 (controls, space, ...) as chr(256), chr(257), ...
    in byte order"""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    for i, b in enumerate(others):
        table[b] = chr(256 + i)
    return table


def merge_parts(token, rank, ranks) -> list:
    """the two tokens whose merge made `token`: BPE over its bytes with only the merges ranked
    before it (the lowest rank first, the leftmost of equals) stops at exactly those two"""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        candidates = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
        best, i = min(candidates)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"tiktoken's GPT-2 data: token {rank} {token!r} is not one merge of two "
                         f"earlier tokens")
    return parts


def gpt2_tokenizer_files(block_size) -> dict:
    """{file name: text}: vocab.json (tiktoken's ranks are GPT-2's token ids), merges.txt (recovered
    from the ranks, in rank order), tokenizer_config.json, special_tokens_map.json. <|endoftext|> is
    the eos token (id 50256), but inside a text it stays text, as prepare.py encodes it"""
    from prepare import gpt2_encoding  # tiktoken's data, downloaded once into its cache
    enc = gpt2_encoding()
    eot = enc.eot_token
    char = byte_to_unicode()

    def spell(token):  # bytes -> the characters vocab.json and merges.txt write
        return "".join(char[b] for b in token)

    ranks = {}  # token bytes -> id, in id order
    for i in range(enc.n_vocab):
        if i != eot:
            ranks[enc.decode_single_token_bytes(i)] = i
    vocab = {spell(token): i for token, i in ranks.items()}
    vocab[EOT_TEXT] = eot
    merges = ["#version: 0.2"]
    for token, rank in ranks.items():
        if len(token) > 1:
            left, right = merge_parts(token, rank, ranks)
            merges.append(f"{spell(left)} {spell(right)}")
    special = dict(bos_token=EOT_TEXT, eos_token=EOT_TEXT, unk_token=EOT_TEXT)
    # split_special_tokens: <|endoftext|> inside a text is text; clean_up...=False: decode is exact
    config = dict(tokenizer_class="GPT2Tokenizer", model_max_length=block_size,
                  add_prefix_space=False, split_special_tokens=True,
                  clean_up_tokenization_spaces=False, errors="replace", **special)
    return {"vocab.json": json.dumps(vocab) + "\n",
            "merges.txt": "\n".join(merges) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}
