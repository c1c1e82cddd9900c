"""
GPT-2's weight files in Hugging Face's format, read and written by torch and the standard library
alone: config.json, safetensors (or a pytorch_model.bin), the hub download. GPT.from_pretrained and
GPT.save_pretrained (model.py) use them. Our parameter names are HF's, but its Conv1D weights are
(in, out), the transpose of nn.Linear's.
"""
import json
import math
import os

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


def download_weights(name, cache_dir=None, base_url=None):
    from prepare import download  # the shared downloader: progress, size check, no leftovers
    cache_dir = cache_dir or os.environ.get("NANODPO_CACHE") or os.path.expanduser("~/.cache/nanodpo")
    base_url = base_url or os.environ.get("NANODPO_HF_BASE_URL") or "https://huggingface.co"
    url = f"{base_url.rstrip('/')}/{name}/resolve/main/model.safetensors"
    path = os.path.join(cache_dir, name, "model.safetensors")
    if not os.path.isfile(path):  # fetched under a per-process name (ranks may race), then moved
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            download(url, tmp)
            load_safetensors(tmp, header_only=True)
            os.replace(tmp, path)
        except OSError as e:
            raise OSError(f"{e}; check the network, set $NANODPO_HF_BASE_URL, or pass a local "
                          f"model folder") from e
        except ValueError as e:
            raise ValueError(f"downloaded {url} is not a valid safetensors file: {e}") from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path
