"""
GPT-2 in one file; weights.py reads and writes Hugging Face's weight files for it.

    model = GPT.from_pretrained("gpt2")         # downloaded once into ~/.cache/nanodpo (or "user/repo")
    model = GPT.from_pretrained("path/to/dir")  # config.json + model.safetensors, or a run's ckpt.pt
    model.save_pretrained("out/dpo/hf")         # loadable by transformers' AutoModelForCausalLM, AutoTokenizer
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from weights import (GPT2_VOCAB, find_weights, from_hf_layout, gpt2_tokenizer_files, hf_config,
                     save_safetensors, to_hf_layout)


@dataclass
class GPTConfig:
    block_size: int = 1024   # max positions (n_positions in HF)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # GPT-2 has biases in Linear and LayerNorm
    reward_head: bool = False  # a reward model (reward.py): a scalar head `score` beside lm_head

# -----------------------------------------------------------------------------
# the model


class KVCache:
    """Generation's keys and values so far: per layer a (B, n_head, max_len, head_size) buffer
    each, made at the first write. Attention writes its new ones at pos and reads 0..pos + T;
    GPT.hidden then moves pos on by T."""

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.pos = 0  # positions held; 0 starts over
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    def add(self, layer, k, v):
        """store one layer's new k, v (B, nh, T, hs) at pos; -> all it holds (B, nh, pos + T, hs)"""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions, {end} were asked for")
        if self.k[layer] is None:  # the dtype attention computes in (autocast or not)
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[layer] = k.new_empty(shape)
            self.v[layer] = v.new_empty(shape)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.layer = layer  # its index in a KVCache
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:  # generation: the earlier positions' keys and values come first
            k, v = cache.add(self.layer, k, v)  # (B, nh, Tk, hs)
        p = self.dropout if self.training else 0.0
        if mask is None or isinstance(mask, torch.Tensor):  # causal, or bool (B, 1, T, Tk)
            causal = mask is None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
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
    if q.is_cuda and _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex if q.is_cuda else flex_attention


# -----------------------------------------------------------------------------
# the attention mask of packed rows (batches.py), built on the device from doc (which pair, -1:
# padding) and branch (0 prompt, 1 chosen, 2 rejected)

def attention_mask(doc, branch):
    """(R, 1, T, T) bool, True = may attend: causal, same pair, never chosen <-> rejected.
    padding (doc -1) attends causally to other padding: no row is empty (no NaN from softmax)"""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    same_pair = doc[:, :, None] == doc[:, None, :]
    key_is_prompt = branch[:, None, :] == 0
    same_branch = branch[:, :, None] == branch[:, None, :]
    return (causal & same_pair & (key_is_prompt | same_branch))[:, None]

def flex_block_mask(doc, branch, block=128):
    """the same mask as a FlexAttention BlockMask, built by tensor ops inside the compiled forward
    (no host sync, nothing compiled per call): a (query block, key block) tile where nothing may
    attend is skipped, one where everything may runs without mask_mod"""
    from torch.nn.attention.flex_attention import BlockMask
    R, T = doc.shape  # T: a multiple of block (batches.make_shape)
    tiles = attention_mask(doc, branch).view(R, T // block, block, T // block, block)
    some = tiles.any(4).any(2)  # (R, T/block, T/block)
    every = tiles.all(4).all(2)

    def kv_blocks(tile):  # per query block: how many key blocks, and which (those first)
        order = torch.argsort(tile.to(torch.int8), dim=-1, descending=True, stable=True)
        return tile.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def mask_mod(b, h, q, k):
        causal = k <= q
        same_pair = doc[b, q] == doc[b, k]
        key_is_prompt = branch[b, k] == 0
        same_branch = branch[b, k] == branch[b, q]
        return causal & same_pair & (key_is_prompt | same_branch)

    partial_count, partial = kv_blocks(some & ~every)
    full_count, full = kv_blocks(every)
    return BlockMask.from_kv_blocks(partial_count, partial, full_count, full, BLOCK_SIZE=block,
                                    mask_mod=mask_mod)


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

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class TokenLogprobs(torch.autograd.Function):
    """log_softmax(h @ W.T)[target] chunk by chunk, backward by hand: d logp / d logits =
    onehot - softmax. One chunk: its exp(logits - max) is kept and turned into the gradient in
    place (no more (n, V) buffers). Several: only h is kept, backward recomputes each chunk's
    (chunk_size, V) float32 logits."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, sum_sq=False):
        ctx.dtype = h.dtype
        if torch.is_autocast_enabled(h.device.type):
            ctx.dtype = torch.get_autocast_dtype(h.device.type)
        ctx.chunk, ctx.kept = chunk_size, None
        logps, lses, sum_sqs = [], [], []
        for i in range(0, h.size(0), chunk_size):
            rows = slice(i, i + chunk_size)
            logits = F.linear(h[rows].to(ctx.dtype), weight.to(ctx.dtype)).float()  # (n, V)
            target_logit = logits.gather(1, targets[rows, None]).squeeze(1)  # (n,)
            m = logits.amax(dim=1, keepdim=True)  # (n, 1)
            e = logits.sub_(m).exp_()  # in place: exp(logits - max), also backward's softmax * s
            s = e.sum(dim=1)  # (n,)
            lse = m.squeeze(1) + s.log()
            logps.append(target_logit - lse)
            lses.append(lse)
            if sum_sq:  # WPO: log sum_v p(v)^2
                sum_sqs.append(2 * (torch.linalg.vector_norm(e, dim=1) / s).log())
            if h.size(0) <= chunk_size:  # the only chunk: softmax = e / s
                ctx.kept = (e, s)
        sq = torch.cat(sum_sqs) if sum_sq else h.new_zeros(0)
        ctx.save_for_backward(h, weight, targets, torch.cat(lses))
        ctx.mark_non_differentiable(sq)
        return torch.cat(logps), sq

    @staticmethod
    def backward(ctx, grad_out, _):
        h, weight, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = None
        for i in range(0, h.size(0), ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            g, t = grad_out[rows].float(), targets[rows]
            if ctx.kept is not None:  # in place: exp(logits - max) -> -g * softmax
                e, s = ctx.kept
                grad = e.mul_((-g / s)[:, None])
            else:  # recompute this chunk's logits, then the same in place
                logits = F.linear(h[rows].to(ctx.dtype), w).float()
                grad = logits.sub_(lse[rows, None]).exp_().mul_(-g[:, None])
            grad[torch.arange(len(t), device=t.device), t] += g  # + g * onehot(target)
            grad = grad.to(ctx.dtype)
            if grad_h is not None:
                grad_h[rows] = (grad @ w).to(h.dtype)
            if ctx.needs_input_grad[1]:
                part = (grad.t() @ h[rows].to(ctx.dtype)).float()  # (V, C)
                grad_w = part if grad_w is None else grad_w.add_(part)
        ctx.kept = None
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def sample_token(logits, temperature, top_k=None, generator=None):
    """one token id per row of logits (B, V): the likeliest at temperature 0, else one drawn from
    softmax(logits / temperature) over the top_k likeliest (all if None)"""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits[logits < kth] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_head must divide n_embd, got n_head={config.n_head}, n_embd={config.n_embd}")
        self.config = config
        self.gradient_checkpointing = False  # recompute each Block in backward: less memory
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        if config.reward_head:  # HF's GPT2ForSequenceClassification names it score too
            self.score = nn.Linear(config.n_embd, 1, bias=False)
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
        """Parameters, the tied wte/lm_head once; non_embedding leaves out wte, wpe (Kaplan et al.)"""
        emb = self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return sum(p.numel() for p in self.parameters()) - (emb if non_embedding else 0)

    def flops(self, n_tokens, n_predicted, ctx_sum) -> float:
        """training FLOPs as in PaLM, appendix B: 6 per weight per token for the blocks (lookups are
        free), the lm_head on the n_predicted positions only, 12 * n_layer * n_embd per (query, key)
        pair (ctx_sum) for attention"""
        c, n = self.config, self.num_params(non_embedding=True)
        weights = 6.0 * (n * n_tokens + c.n_embd * c.vocab_size * n_predicted)
        return weights + 12.0 * c.n_layer * c.n_embd * ctx_sum

    def hidden(self, idx, pos=None, attn_mask=None, cache=None) -> torch.Tensor:
        """Final hidden states (B, T, n_embd). idx: (B, T) token ids. pos: None -> 0..T-1 (after
        the cached ones), else (T,) or (B, T) (packed rows restart them). attn_mask: None ->
        causal; a bool (B, T, Tk) or (B, 1, T, Tk) tensor, True = may attend, causality included
        (the diagonal is forced True, so padding rows stay finite); or a flex BlockMask.
        cache: a KVCache (generation) whose keys come first, Tk = cache.pos + T (else Tk = T);
        this call's keys and values are added to it."""
        (B, T), bs, dev = idx.size(), self.config.block_size, idx.device
        past = 0 if cache is None else cache.pos
        if pos is None:  # with explicit positions a packed row may be longer: only they must fit
            if past + T > bs:
                raise ValueError(f"sequence length {past + T} > block_size {bs}: crop the input to at most "
                                 f"{bs} tokens")
            pos = torch.arange(past, past + T, device=dev)
        elif pos.dtype != torch.long or pos.shape not in ((T,), (B, T)):
            raise ValueError(f"pos must be a long tensor of shape ({T},) or ({B}, {T}), got {pos.dtype} "
                             f"{pos.shape}")
        elif pos.device.type == "cpu" and not torch.compiler.is_compiling():  # a GPU would wait
            if ((pos < 0) | (pos >= bs)).any():
                raise ValueError(f"position ids must lie in [0, block_size={bs})")
        if cache is not None and attn_mask is None:  # causal over the cached positions and these
            causal = torch.ones(T, past + T, dtype=torch.bool, device=dev).tril(past)  # (T, Tk)
            attn_mask = causal.expand(B, -1, -1)
        if isinstance(attn_mask, torch.Tensor):
            if attn_mask.dtype != torch.bool:  # a float mask would silently be added to the scores
                raise ValueError(f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}")
            own_key = F.pad(torch.eye(T, dtype=torch.bool, device=dev), (past, 0))  # (T, Tk)
            attn_mask = attn_mask.reshape(B, 1, T, past + T) | own_key
        elif attn_mask is not None and cache is not None:
            raise ValueError("a KVCache takes a bool attn_mask tensor or None, not a BlockMask")
        elif attn_mask is not None and self.training and self.config.dropout > 0:
            raise ValueError("flex_attention has no attention dropout: use dropout=0.0 with a BlockMask")
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        training = self.training and torch.is_grad_enabled()
        ckpt = self.gradient_checkpointing and training and cache is None  # a cache is written once
        for block in self.transformer.h:
            if ckpt:
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, pos=None, attn_mask=None, cache=None) -> torch.Tensor:
        """Logits (B, T, vocab_size); arguments as in hidden()."""
        return self.lm_head(self.hidden(idx, pos, attn_mask, cache))

    def token_logprobs(self, h, targets, chunk_size=4096, sum_sq=False):
        """log p(target | h) in float32, shape of targets, for hidden states h (..., n_embd).
        Rows go through the lm_head chunk_size at a time (TokenLogprobs): the (N, vocab) logits
        never exist at once. sum_sq=True returns (that, log sum_v p(v | h)^2), the second
        detached (WPO)."""
        shape = targets.shape
        h = h.reshape(-1, h.size(-1))
        targets = targets.reshape(-1)
        if len(h):
            lp, sq = TokenLogprobs.apply(h, self.lm_head.weight, targets, chunk_size, sum_sq)
        else:  # no rows, no chunk to compute
            lp = sq = targets * 0.0
        return (lp.view(shape), sq.view(shape)) if sum_sq else lp.view(shape)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_token_id=50256,
                 generator: torch.Generator = None, pad_left=None) -> torch.Tensor:
        """idx (B, T) -> (B, T + up to max_new_tokens); temperature 0 = greedy. Prompts of
        different lengths come right-aligned: row b's first pad_left[b] tokens are padding, ignored
        (its positions start after them). A row that produced eos_token_id is padded with eos;
        stops once every row has. Eval mode (no dropout). The prompt fills a KVCache, then each
        step runs only the new token; past block_size, the last block_size tokens run afresh."""
        (B, T), dev, bs = idx.shape, idx.device, self.config.block_size
        pad = torch.zeros(B, dtype=torch.long, device=dev)
        if pad_left is not None:
            pad = pad_left.to(dev, torch.long)
        if pad.shape != (B,) or ((pad < 0) | (pad >= T)).any():
            raise ValueError(f"generate: pad_left must have shape ({B},) and values in [0, {T})")
        was_training, seq = self.training, idx
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        cache = KVCache(self.config.n_layer, min(T + max_new_tokens, bs))
        self.eval()
        try:
            for step in range(max_new_tokens):
                if step == 0 or seq.size(1) > bs:  # prefill: the prompt, or a window that slid
                    x = seq[:, -bs:]
                    x_pad = (pad - (seq.size(1) - x.size(1))).clamp(min=0)  # (B,) padding in x
                    cache.pos = 0
                else:  # decode: only the newest token, the ones before are in the cache
                    x = seq[:, -1:]
                col = torch.arange(cache.pos + x.size(1), device=dev)  # (Tk,) the cache's, then x's
                x_col = col[-x.size(1):]  # (Tq,)
                pos = (x_col - x_pad[:, None]).clamp(min=0)  # (B, Tq) padding at position 0
                real = col >= x_pad[:, None]  # (B, Tk) the keys that are not padding
                causal = x_col[:, None] >= col  # (Tq, Tk)
                mask = real[:, None, :] & causal  # (B, Tq, Tk); hidden() lets padding see itself
                logits = self.lm_head(self.hidden(x, pos, mask, cache)[:, -1]).float()  # (B, V)
                nxt = sample_token(logits, temperature, top_k, generator)
                if eos_token_id is not None:
                    nxt = nxt.masked_fill(done, eos_token_id)
                    done |= nxt == eos_token_id
                seq = torch.cat((seq, nxt[:, None]), dim=1)
                if eos_token_id is not None and done.all():
                    break
        finally:
            self.train(was_training)
        return seq

    # -------------------------------------------------------------------------
    # Hugging Face's GPT-2 weight files (weights.py)

    @classmethod
    def from_pretrained(cls, name_or_path, cache_dir=None, base_url=None, dropout=0.0) -> "GPT":
        """'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a hub repo 'user/name' in GPT-2's layout
        (downloaded once from the Hugging Face hub, or $NANODPO_HF_BASE_URL, into $NANODPO_CACHE); a
        folder with config.json and model.safetensors / pytorch_model.bin; or a dpo.py run (its folder
        or ckpt.pt). weights.find_weights reads them."""
        found = find_weights(str(name_or_path), cache_dir, base_url)
        with torch.device("meta"):  # no init work: all is checked, then real tensors are attached
            model = cls(GPTConfig(**found.config, dropout=dropout))
        sd = found.tensors
        if not found.ours:  # Hugging Face's names and Conv1D layout, checked tensor by tensor
            sd = from_hf_layout(sd, model.state_dict(), found.path)
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:  # a run's tensors that do not fit its model_config
            why = " ".join(str(e).split())[:200]
            raise ValueError(f"{found.path}: its weights do not match its model config ({why})") from None
        model.transformer.wte.weight = model.lm_head.weight  # assign=True made two tensors: re-tie
        return model

    def save_pretrained(self, directory, state_dict=None) -> list:
        """Write config.json, model.safetensors (float32) and, when the vocabulary holds GPT-2's, its
        tokenizer files, in Hugging Face's GPT-2 layout -> the file names (export.py, --export_hf).
        state_dict: the full weights to write (FSDP: gathered by the caller), else this model's."""
        if not self.config.bias:
            raise ValueError("Hugging Face GPT-2 always has biases: cannot save a bias=False model in its format")
        texts = {"config.json": json.dumps(hf_config(self.config), indent=2) + "\n"}
        if self.config.vocab_size >= GPT2_VOCAB:  # tiktoken's data: read before any file is written
            texts.update(gpt2_tokenizer_files(self.config.block_size))
        files = ["model.safetensors", *texts]
        made = not os.path.isdir(directory)
        os.makedirs(directory, exist_ok=True)
        # every file is written beside its final name, then all are renamed: a failure keeps the old
        tmp = os.path.join(directory, f".tmp{os.getpid()}-")
        try:
            weights = self.state_dict() if state_dict is None else state_dict
            save_safetensors(to_hf_layout(weights), tmp + files[0])
            for name, text in texts.items():
                with open(tmp + name, "w", encoding="utf-8") as f:
                    f.write(text)
            for f in files:
                os.replace(tmp + f, os.path.join(directory, f))
        finally:  # after a failure (or Ctrl-C), whatever was written, and the folder if it is new
            for f in [f for f in files if os.path.exists(tmp + f)]:
                os.remove(tmp + f)
            if made and not os.listdir(directory):
                os.rmdir(directory)
        return files
