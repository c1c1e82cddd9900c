"""
GPT-2 in one file: the model, plus loading and saving Hugging Face's GPT-2 weight format
(config.json + model.safetensors) with no dependency beyond torch and the standard library.

    model = GPT.from_pretrained("gpt2")          # downloads once into $NANODPO_CACHE (~/.cache/nanodpo)
    model = GPT.from_pretrained("path/to/dir")   # config.json + model.safetensors or pytorch_model.bin
    model.save_pretrained("out/dpo")             # loadable by transformers.GPT2LMHeadModel
"""
import json
import math
import os
import re
import struct
import sys
import time
import urllib.request
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024   # max positions (n_positions in HF)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # GPT-2 has biases in Linear and LayerNorm

# -----------------------------------------------------------------------------
# the model


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif isinstance(mask, torch.Tensor):  # (B, 1, T, T) bool, True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:  # a flex_attention BlockMask
            y = _flex_attention(q)(q, k, v, block_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


_compiled_flex = None

def _flex_attention(q):
    # imported lazily: CPU-only users never need it. eager flex_attention is a slow reference
    # implementation, so on CUDA we use the compiled kernel (compiled once, shared by all layers)
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if not q.is_cuda:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class TokenLogprobs(torch.autograd.Function):
    """log_softmax(h @ W.T)[target] chunk by chunk, with a hand-written backward.
    one chunk: its exp(logits - max) is kept and turned into the gradient in place (no extra (n, V) buffers).
    several chunks: only h is kept and each chunk's logits are recomputed in backward, so at most one chunk of
    (chunk_size, V) float32 logits is alive at a time. d logp / d logits = onehot(target) - softmax(logits)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size):
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        ctx.dtype, ctx.chunk = dtype, chunk_size
        out, lses, kept = [], [], None
        for i in range(0, h.size(0), chunk_size):
            logits = F.linear(h[i:i + chunk_size].to(dtype), weight.to(dtype)).float()  # (n, V)
            target_logit = logits.gather(1, targets[i:i + chunk_size, None]).squeeze(1)  # (n,)
            m = logits.amax(dim=1, keepdim=True)  # (n, 1)
            e = logits.sub_(m).exp_()  # in place: exp(logits - max), in (0, 1]; one exp pass for forward and backward
            s = e.sum(dim=1)  # (n,)
            lse = m.squeeze(1) + s.log()
            out.append(target_logit - lse)
            lses.append(lse)
            kept = (e, s) if h.size(0) <= chunk_size else None  # softmax = e / s
        ctx.kept = kept
        ctx.save_for_backward(h, weight, targets, torch.cat(lses))
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, lse = ctx.saved_tensors
        dtype, w = ctx.dtype, weight.to(ctx.dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = None
        for i in range(0, h.size(0), ctx.chunk):
            hc, g, t = h[i:i + ctx.chunk], grad_out[i:i + ctx.chunk].float(), targets[i:i + ctx.chunk]
            if ctx.kept is not None:  # in place: exp(logits - max) -> -g * softmax
                e, s = ctx.kept
                grad = e.mul_((-g / s)[:, None])
            else:  # recompute this chunk's logits, then the same in place
                grad = F.linear(hc.to(dtype), w).float().sub_(lse[i:i + ctx.chunk, None]).exp_().mul_(-g[:, None])
            grad[torch.arange(len(t), device=t.device), t] += g  # + g * onehot(target)
            grad = grad.to(dtype)
            if grad_h is not None:
                grad_h[i:i + ctx.chunk] = (grad @ w).to(h.dtype)
            if ctx.needs_input_grad[1]:
                part = (grad.t() @ hc.to(dtype)).float()  # (V, C)
                grad_w = part if grad_w is None else grad_w.add_(part)
        ctx.kept = None
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute each Block in backward to save activation memory
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        # GPT-2 init: N(0, 0.02), residual projections scaled down by 1/sqrt(2 * n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True) -> int:
        """Parameter count (the tied wte/lm_head matrix counted once). non_embedding=True leaves out
        both embedding tables, wte and wpe: Kaplan et al.'s "non-embedding parameters"."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, context_len: int) -> float:
        """Training FLOPs (forward + backward) per token, as in PaLM (Chowdhery et al. 2022), appendix B:
        6*N for the matmuls with the N weights (2 flops per multiply-add forward, 4 backward), where N counts
        the non-embedding parameters plus the lm_head matmul once (the embedding lookups cost nothing), plus
        12 * n_layer * n_embd * context_len for the attention scores and the weighted sum over values."""
        c = self.config
        n = self.num_params(non_embedding=True) + c.n_embd * c.vocab_size
        return 6.0 * n + 12.0 * c.n_layer * c.n_embd * context_len

    def hidden(self, idx, pos=None, attn_mask=None) -> torch.Tensor:
        """Final hidden states (B, T, n_embd), after ln_f.
        idx: (B, T) token ids. pos: None -> 0..T-1, else (T,) or (B, T) position ids (positions may restart
        inside a row when several sequences are packed into it). attn_mask: None -> causal; a bool (B, T, T)
        or (B, 1, T, T) tensor, True = query may attend to key, causality already included by the caller
        (the diagonal is forced True so padding rows that attend to nothing give finite garbage, never NaN);
        or a flex_attention BlockMask (rows with no keys give zeros)."""
        B, T = idx.size()
        bs = self.config.block_size
        if pos is None:
            if T > bs:  # with explicit positions a packed row may be longer: only the positions must fit
                raise ValueError(f"sequence length {T} > block_size {bs}: crop the input to at most {bs} tokens")
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            if pos.dtype != torch.long or pos.shape not in ((T,), (B, T)):
                raise ValueError(f"pos must be a long tensor of shape ({T},) or ({B}, {T}), "
                                 f"got {pos.dtype} {tuple(pos.shape)}")
            # the check syncs with the GPU once; under torch.compile the embedding's own bounds check is left
            if not torch.compiler.is_compiling() and ((pos < 0) | (pos >= bs)).any():
                raise ValueError(f"position ids must lie in [0, block_size={bs}), got range "
                                 f"[{pos.min().item()}, {pos.max().item()}]")
        if isinstance(attn_mask, torch.Tensor):
            if attn_mask.dtype != torch.bool or attn_mask.shape not in ((B, T, T), (B, 1, T, T)):
                raise ValueError(f"attn_mask must be a bool tensor of shape ({B}, {T}, {T}) or ({B}, 1, {T}, {T}), "
                                 f"got {attn_mask.dtype} {tuple(attn_mask.shape)}")
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(1)  # broadcast over heads
            attn_mask = attn_mask | torch.eye(T, dtype=torch.bool, device=idx.device)  # no all-False rows
        elif attn_mask is not None and self.training and self.config.dropout > 0:
            raise ValueError("flex_attention has no attention dropout: use dropout=0.0 with a BlockMask")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            x = checkpoint(block, x, attn_mask, use_reentrant=False) if ckpt else block(x, attn_mask)
        return self.transformer.ln_f(x)

    def forward(self, idx, pos=None, attn_mask=None) -> torch.Tensor:
        """Logits (B, T, vocab_size); arguments as in hidden()."""
        return self.lm_head(self.hidden(idx, pos, attn_mask))

    def token_logprobs(self, h, targets, chunk_size=4096) -> torch.Tensor:
        """log p(target | h) in float32, shape of targets, for hidden states h (..., n_embd).
        Rows go through the lm_head chunk_size at a time (see TokenLogprobs), so the full (N, vocab) float32
        logits and their gradient never exist at once."""
        shape = targets.shape
        h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        if h.size(0) == 0:
            return h.new_zeros(shape, dtype=torch.float32)
        return TokenLogprobs.apply(h, self.lm_head.weight, targets, chunk_size).view(shape)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_token_id=50256,
                 generator: torch.Generator = None) -> torch.Tensor:
        """Append up to max_new_tokens to idx (B, T) and return (B, T + n_new). temperature 0 = greedy.
        A row that produced eos_token_id gets eos padding afterwards; stops when every row has ended.
        Runs in eval mode (no dropout) and restores the previous mode. No KV cache: O(T^2) per token."""
        was_training = self.training
        self.eval()
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        try:
            for _ in range(max_new_tokens):
                ctx = idx[:, -self.config.block_size:]  # crop to the context window
                logits = self.lm_head(self.hidden(ctx)[:, -1, :]).float()  # (B, V), last position only
                if temperature == 0:
                    nxt = logits.argmax(dim=-1)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                if eos_token_id is not None:
                    nxt = nxt.masked_fill(done, eos_token_id)
                    done |= nxt == eos_token_id
                idx = torch.cat((idx, nxt[:, None]), dim=1)
                if eos_token_id is not None and done.all():
                    break
        finally:
            self.train(was_training)
        return idx

    # -------------------------------------------------------------------------
    # Hugging Face GPT-2 format: same names as ours (with a 'transformer.' prefix), but GPT-2's Conv1D
    # layers store their weight as (in, out), the transpose of nn.Linear's (out, in)

    @classmethod
    def from_pretrained(cls, name_or_path, cache_dir=None, base_url=None, dropout=0.0) -> "GPT":
        """Load 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (downloaded once from the Hugging Face hub,
        or $NANODPO_HF_BASE_URL) or a local folder with config.json and model.safetensors / pytorch_model.bin."""
        name = str(name_or_path)
        if os.path.isdir(name):
            config = _read_hf_config(os.path.join(name, "config.json"), dropout)
            weights = _find_weights(name)
        elif name in PRETRAINED:
            config = GPTConfig(**PRETRAINED[name], dropout=dropout)
            weights = _download_weights(name, cache_dir, base_url)
        elif os.sep in name or name.startswith((".", "~")):
            raise FileNotFoundError(f"model folder {name} does not exist (expected a folder with config.json "
                                    f"and model.safetensors, or one of {', '.join(PRETRAINED)})")
        else:
            raise ValueError(f"unknown model name {name!r}: expected one of {', '.join(PRETRAINED)}, "
                             f"or a local folder with config.json and model.safetensors")
        if weights.endswith(".bin"):
            try:
                sd = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{weights}: could not read PyTorch weights ({e})") from e
        else:
            sd = load_safetensors(weights)
        # build on the meta device (no init work), check everything, only then attach real tensors
        with torch.device("meta"):
            model = cls(config)
        sd = _from_hf_layout(sd, model.state_dict(), weights)
        model.load_state_dict(sd, strict=True, assign=True)
        model.transformer.wte.weight = model.lm_head.weight  # assign=True made two Parameters: re-tie
        return model

    def save_pretrained(self, directory) -> None:
        """Write config.json and model.safetensors (float32) in Hugging Face's GPT-2 layout."""
        c = self.config
        if not c.bias:
            raise ValueError("Hugging Face GPT-2 always has biases: cannot save a bias=False model in its format")
        config = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
            "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
            "torch_dtype": "float32",
        }
        eot = 50256 if c.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if this vocab has it
        config["bos_token_id"] = config["eos_token_id"] = eot
        tensors = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied to transformer.wte.weight
            tensors[k] = v.t() if k.endswith(_CONV1D) else v
        os.makedirs(directory, exist_ok=True)
        # each file is written next to its final name, then atomically renamed over it
        paths = [os.path.join(directory, f) for f in ("model.safetensors", "config.json")]
        tmps = [os.path.join(directory, f".{os.path.basename(p)}.{os.getpid()}.tmp") for p in paths]
        try:
            save_safetensors(tensors, tmps[0])
            with open(tmps[1], "w") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
            for tmp, path in zip(tmps, paths):
                os.replace(tmp, path)
        finally:
            for tmp in tmps:
                if os.path.exists(tmp):
                    os.remove(tmp)

# -----------------------------------------------------------------------------
# weight files

# the hub models; a module-level table so tests can register a tiny entry
PRETRAINED = {
    "gpt2":        dict(n_layer=12, n_head=12, n_embd=768),   # 124M params
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large":  dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl":     dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # old HF causal-mask buffers, not weights


def _read_hf_config(path, dropout):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a model folder needs a Hugging Face GPT-2 config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from e
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions") if k not in hf]
    if missing:
        raise ValueError(f"{path}: missing GPT-2 config keys {missing}")
    # reject what this implementation does not do, instead of silently computing something else
    checks = [("model_type", hf.get("model_type", "gpt2") == "gpt2", "'gpt2'"),
              ("activation_function", hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
               "'gelu_new'"),
              ("n_inner", hf.get("n_inner") in (None, 4 * hf["n_embd"]), f"null or {4 * hf['n_embd']}"),
              ("layer_norm_epsilon", abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "1e-5"),
              ("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False), "false"),
              ("n_embd", hf["n_embd"] % hf["n_head"] == 0, f"a multiple of n_head={hf['n_head']}")]
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"{path}: {key} = {hf.get(key)!r} is not supported, expected {want}")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True)


def _find_weights(folder):
    for f in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, f)):
            return os.path.join(folder, f)
    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        raise ValueError(f"{folder}: sharded checkpoints (model.safetensors.index.json) are not supported; "
                         f"re-save with a single model.safetensors")
    raise FileNotFoundError(f"{folder}: no weights file, expected model.safetensors or pytorch_model.bin")


def _from_hf_layout(sd, expected, source):
    """HF GPT-2 state dict -> ours (float32), fully checked against `expected` (our state_dict)."""
    out = {}
    for k, v in sd.items():
        key = k[len("transformer."):] if k.startswith("transformer.") else k
        if _IGNORED.fullmatch(key) or k == "lm_head.weight":
            continue  # lm_head is tied to wte (checked below)
        key = "transformer." + key
        if key not in expected:
            raise ValueError(f"{source}: unexpected tensor {k!r} (not part of GPT-2)")
        v = v.t() if key.endswith(_CONV1D) else v
        if tuple(v.shape) != tuple(expected[key].shape):
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected "
                             f"{tuple(expected[key].shape)} from the config (Conv1D weights are stored (in, out))")
        out[key] = v.to(torch.float32).contiguous()
    missing = [k for k in expected if k not in out and k != "lm_head.weight"]
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"].float(), out["transformer.wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight, but GPT-2 ties them")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_header(path):
    """Parse and check a safetensors header: 8-byte little-endian length, JSON, then raw tensor bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path}: not a valid safetensors file (header length {n}, file size {size} bytes); "
                             f"the file is truncated or corrupt, delete it and download again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from e
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, "
                             f"supported: {', '.join(_ST_DTYPES)}")
        begin, end = info["data_offsets"]
        nbytes = math.prod(info["shape"]) * _ST_DTYPES[info["dtype"]].itemsize
        if end - begin != nbytes or begin < 0:
            raise ValueError(f"{path}: tensor {name!r} data_offsets {begin}..{end} do not fit its shape "
                             f"{info['shape']} ({nbytes} bytes)")
        if 8 + n + end > size:
            raise ValueError(f"{path}: truncated, tensor {name!r} ends at byte {8 + n + end} "
                             f"but the file has {size} bytes; delete it and download again")
    return header, 8 + n


def load_safetensors(path) -> dict:
    header, start = _safetensors_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            begin, end = info["data_offsets"]
            buf = bytearray(end - begin)
            f.seek(start + begin)
            f.readinto(buf)
            dtype = _ST_DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(info["shape"])
    return out


def save_safetensors(tensors: dict, path) -> None:
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, v in tensors.items():
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + v.numel() * 4]}
        offset += v.numel() * 4
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # pad so the tensor data starts 8-byte aligned
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for v in tensors.values():
            f.write(v.numpy().tobytes())


def _download_weights(name, cache_dir=None, base_url=None):
    """Fetch {base_url}/{name}/resolve/main/model.safetensors into the cache, once. The download goes to a
    .partial file that is renamed into place only after its size and safetensors header check out."""
    cache_dir = cache_dir or os.environ.get("NANODPO_CACHE") or os.path.expanduser("~/.cache/nanodpo")
    base_url = (base_url or os.environ.get("NANODPO_HF_BASE_URL") or "https://huggingface.co").rstrip("/")
    path = os.path.join(cache_dir, name, "model.safetensors")
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    url = f"{base_url}/{name}/resolve/main/model.safetensors"
    tmp = f"{path}.{os.getpid()}.partial"  # per process, so concurrent ranks do not write the same file
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                total = r.headers.get("Content-Length")
                total = int(total) if total else None
                got, t0, last = 0, time.time(), 0.0
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    got += len(chunk)
                    now = time.time()
                    if now - last > 0.5 or got == total:
                        last = now
                        pct = f" {100 * got / total:5.1f}%" if total else ""
                        of = f" / {total / 1e6:.1f}" if total else ""
                        print(f"\rdownloading {url}: {got / 1e6:.1f}{of} MB{pct} "
                              f"{got / 1e6 / max(now - t0, 1e-9):.1f} MB/s", end="", file=sys.stderr, flush=True)
                print(file=sys.stderr)
        except OSError as e:  # URLError, HTTPError, timeouts, disk full
            raise OSError(f"could not download {url} ({e}); check the network, or set $NANODPO_HF_BASE_URL, "
                          f"or pass a local folder") from e
        if total is not None and got != total:
            raise OSError(f"download of {url} incomplete: got {got} of {total} bytes")
        try:
            _safetensors_header(tmp)
        except ValueError as e:
            raise ValueError(f"downloaded {url} is not a valid safetensors file: {e}") from e
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
