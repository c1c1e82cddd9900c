"""
All tests, CPU, tiny configs: python -m pytest -q test_dpo.py
(GPU-only tests skip cleanly without CUDA; tests of the real HH file skip only when ../shared is missing.)
"""
import collections
import dataclasses
import gzip
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F

import checkpoint
import dpo
import sample as sample_module
import model as model_module
import prepare as P
from dpo import LOSS_TYPES, Config, PairData, dpo_loss, parse_config, train
from model import GPT, GPTConfig


# =============================================================================
# model.py: GPT-2 against Hugging Face

# Tests for model.py against independent references: Hugging Face transformers' GPT-2 (eager attention),
# the safetensors package, naive loops and hand counts. Tiny configs, CPU, a few seconds.



import safetensors.torch as safetensors_torch  # noqa: E402  test-only references (requirements-dev.txt)
import transformers  # noqa: E402

TINY = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, block_size=64)


def hf_tiny(seed=0):
    """A random-weight HF GPT-2 with every tensor (biases, LayerNorms too) perturbed away from its init."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=64,
                                  bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def our_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**TINY, **kw}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = hf_tiny()
    hf.save_pretrained(d)  # safetensors
    assert os.path.isfile(d / "model.safetensors")
    return d, hf


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def tokens(B=2, T=20, seed=1):
    return torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(seed))

# -----------------------------------------------------------------------------
# loading and saving against transformers


def test_load_hf_safetensors(hf_dir):
    d, hf = hf_dir
    m = GPT.from_pretrained(d).eval()
    idx = tokens()
    assert (m(idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-4
    assert m.lm_head.weight is m.transformer.wte.weight  # still tied after loading
    assert m.num_params(non_embedding=False) == sum(p.numel() for p in hf.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in m.parameters())


def test_load_hf_pytorch_bin(hf_dir, tmp_path):
    d, hf = hf_dir
    shutil.copy(d / "config.json", tmp_path / "config.json")
    sd = dict(hf.state_dict())  # includes lm_head.weight
    # old checkpoints also carry the causal-mask buffers; they must be ignored
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    m = GPT.from_pretrained(tmp_path).eval()
    idx = tokens()
    assert (m(idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_unprefixed_half_precision(hf_dir, tmp_path, dtype):
    # the hub's gpt2 files name tensors without 'transformer.' and include attn.bias buffers
    d, hf = hf_dir
    shutil.copy(d / "config.json", tmp_path / "config.json")
    sd = {k.removeprefix("transformer."): v.to(dtype).contiguous() for k, v in hf.state_dict().items()
          if k != "lm_head.weight"}
    sd["h.1.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64)).to(dtype)
    safetensors_torch.save_file(sd, tmp_path / "model.safetensors")
    m = GPT.from_pretrained(tmp_path).eval()
    ref = hf_tiny()
    with torch.no_grad():  # the reference gets the same rounding
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    idx = tokens()
    assert (m(idx) - hf_logits(ref, idx)).abs().max().item() <= 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path, hf_dir):
    m = our_tiny(seed=3)
    m.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]  # no temp files
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    idx = tokens()
    assert (m(idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-4
    # same tensor names and shapes as transformers writes, readable by the safetensors package
    theirs = safetensors_torch.load_file(hf_dir[0] / "model.safetensors")
    ours = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    with open(tmp_path / "out" / "model.safetensors", "rb") as f:
        assert int.from_bytes(f.read(8), "little") % 8 == 0  # header padded to 8-byte alignment
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_ctx"] == cfg["n_positions"] == 64
    # and back into our model
    m2 = GPT.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(m2(idx), m(idx))


def test_save_pretrained_failure_leaves_old_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    our_tiny(seed=1).save_pretrained(out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def boom(tensors, path):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(model_module, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        our_tiny(seed=2).save_pretrained(out)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_save_pretrained_rejects_no_bias(tmp_path):
    with pytest.raises(ValueError, match="biases"):
        GPT(GPTConfig(**TINY, bias=False)).save_pretrained(tmp_path)

# -----------------------------------------------------------------------------
# download path, for real, from a file:// "hub"


def make_hub(tmp_path, hf_dir, name, truncate=False):
    src = tmp_path / "hub" / name / "resolve" / "main"
    src.mkdir(parents=True)
    data = (hf_dir[0] / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:len(data) // 2] if truncate else data)
    return (tmp_path / "hub").as_uri(), src / "model.safetensors"


def test_download_and_cache(hf_dir, tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(model_module.PRETRAINED, "tiny-gpt", TINY)
    base, src = make_hub(tmp_path, hf_dir, "tiny-gpt")
    monkeypatch.setenv("NANODPO_HF_BASE_URL", base)
    monkeypatch.setenv("NANODPO_CACHE", str(tmp_path / "cache"))
    m = GPT.from_pretrained("tiny-gpt").eval()
    idx = tokens()
    assert (m(idx) - hf_logits(hf_dir[1], idx)).abs().max().item() <= 1e-4
    err = capfd.readouterr().err
    assert "MB" in err and "100.0%" in err  # progress on stderr
    assert os.listdir(tmp_path / "cache" / "tiny-gpt") == ["model.safetensors"]
    os.remove(src)  # second load must come from the cache
    m2 = GPT.from_pretrained("tiny-gpt", dropout=0.1)
    assert m2.config.dropout == 0.1
    assert torch.equal(m2.eval()(idx), m(idx))


def test_download_truncated_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(model_module.PRETRAINED, "tiny-gpt", TINY)
    base, _ = make_hub(tmp_path, hf_dir, "tiny-gpt", truncate=True)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="tiny-gpt.*truncated"):
        GPT.from_pretrained("tiny-gpt", cache_dir=cache, base_url=base)
    assert [f for _, _, fs in os.walk(cache) for f in fs] == []


def test_download_missing_source(tmp_path, monkeypatch):
    monkeypatch.setitem(model_module.PRETRAINED, "tiny-gpt", TINY)
    with pytest.raises(OSError, match="could not download .*tiny-gpt/resolve/main/model.safetensors"):
        GPT.from_pretrained("tiny-gpt", cache_dir=tmp_path / "c", base_url=(tmp_path / "nohub").as_uri())
    assert [f for _, _, fs in os.walk(tmp_path / "c") for f in fs] == []

# -----------------------------------------------------------------------------
# bad inputs


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model name 'gpt3'.*gpt2-medium"):
        GPT.from_pretrained("gpt3")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        GPT.from_pretrained(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        GPT.from_pretrained(tmp_path)


def test_folder_without_weights(hf_dir, tmp_path):
    shutil.copy(hf_dir[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights file, expected model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)


def edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def test_config_shape_mismatch(hf_dir, tmp_path):
    d = copy_dir(hf_dir[0], tmp_path / "m")
    edit_config(d, vocab_size=999)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'transformer.wte.weight' has shape "
                                         r"\(1000, 64\), expected \(999, 64\)"):
        GPT.from_pretrained(d)


def test_config_more_layers_than_file(hf_dir, tmp_path):
    d = copy_dir(hf_dir[0], tmp_path / "m")
    edit_config(d, n_layer=3)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['transformer.h.2.ln_1.weight'"):
        GPT.from_pretrained(d)


def test_config_bad(hf_dir, tmp_path):
    d = copy_dir(hf_dir[0], tmp_path / "m")
    (d / "config.json").write_text('{"n_layer": 2,\n "n_head": }')
    with pytest.raises(ValueError, match="config.json, line 2: invalid JSON"):
        GPT.from_pretrained(d)
    (d / "config.json").write_text('{"n_layer": 2}')
    with pytest.raises(ValueError, match="missing GPT-2 config keys .*n_head"):
        GPT.from_pretrained(d)
    shutil.copy(hf_dir[0] / "config.json", d / "config.json")
    edit_config(d, activation_function="relu")
    with pytest.raises(ValueError, match="activation_function = 'relu' is not supported"):
        GPT.from_pretrained(d)


def test_truncated_safetensors(hf_dir, tmp_path):
    d = copy_dir(hf_dir[0], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"m/model.safetensors: truncated"):
        GPT.from_pretrained(d)
    (d / "model.safetensors").write_bytes(data[:100])  # cut inside the header
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        GPT.from_pretrained(d)


def write_modified(hf_dir, tmp_path, change):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(hf_dir[0] / "config.json", d / "config.json")
    sd = {k: v.contiguous() for k, v in hf_dir[1].state_dict().items() if k != "lm_head.weight"}
    change(sd)
    if sd.get("__bin__"):
        sd.pop("__bin__")
        torch.save(sd, d / "pytorch_model.bin")
    else:
        safetensors_torch.save_file(sd, d / "model.safetensors")
    return d


def test_unexpected_tensor(hf_dir, tmp_path):
    d = write_modified(hf_dir, tmp_path, lambda sd: sd.update({"transformer.h.0.attn.q_attn.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.0.attn.q_attn.weight'"):
        GPT.from_pretrained(d)


def test_missing_tensor(hf_dir, tmp_path):
    d = write_modified(hf_dir, tmp_path, lambda sd: sd.pop("transformer.ln_f.bias"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['transformer.ln_f.bias'\]"):
        GPT.from_pretrained(d)


def test_unsupported_dtype(hf_dir, tmp_path):
    d = write_modified(hf_dir, tmp_path, lambda sd: sd.update(
        {"transformer.ln_f.bias": sd["transformer.ln_f.bias"].to(torch.int8)}))
    with pytest.raises(ValueError, match="'transformer.ln_f.bias' has dtype 'I8'"):
        GPT.from_pretrained(d)


def test_untied_lm_head(hf_dir, tmp_path):
    d = write_modified(hf_dir, tmp_path, lambda sd: sd.update(
        {"__bin__": True, "lm_head.weight": torch.zeros(1000, 64)}))
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPT.from_pretrained(d)


def test_forward_bad_inputs():
    m = our_tiny()
    with pytest.raises(ValueError, match="sequence length 65 > block_size 64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position ids must lie in \[0, block_size=64\)"):
        m(torch.zeros(1, 4, dtype=torch.long), pos=torch.tensor([0, 1, 2, 64]))
    with pytest.raises(ValueError, match="pos must be a long tensor"):
        m(torch.zeros(1, 4, dtype=torch.long), pos=torch.arange(3))
    with pytest.raises(ValueError, match="attn_mask must be a bool tensor"):
        m(torch.zeros(1, 4, dtype=torch.long), attn_mask=torch.ones(1, 4, 4))


def test_n_head_must_divide_n_embd(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="n_head must divide n_embd, got n_head=3, n_embd=128"):
        GPT(GPTConfig(n_head=3, n_embd=128))
    d = copy_dir(hf_dir[0], tmp_path / "m")
    edit_config(d, n_head=3)  # the same mistake in a Hugging Face folder names the file
    with pytest.raises(ValueError, match=r"m/config.json: n_head=3 must divide n_embd=64"):
        GPT.from_pretrained(d)
    edit_config(d, n_head=0)
    with pytest.raises(ValueError, match=r"m/config.json: missing GPT-2 config keys \['n_head'\]"):
        GPT.from_pretrained(d)

# -----------------------------------------------------------------------------
# packed sequences, log-probs, checkpointing, generation, flops


def packed_inputs(m):
    # row 0: sequence a (5 tokens), sequence b (7 tokens), 3 padding tokens; row 1: one sequence of 15
    a, b, c = tokens(1, 5, seed=2), tokens(1, 7, seed=3), tokens(1, 15, seed=4)
    idx = torch.cat([torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1), c])
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(7), torch.zeros(3, dtype=torch.long)]),
                       torch.arange(15)])
    doc = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 3, [0] * 15])  # -1 = padding
    T = 15
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0) & causal  # padding attends to nothing
    refs = [m(a)[0], m(b)[0], m(c)[0]]
    return idx, pos, doc, mask, refs


def test_packed_sequences_match_separate_runs():
    m = our_tiny()
    idx, pos, doc, mask, (ra, rb, rc) = packed_inputs(m)
    for msk in (mask, mask[:, None]):
        out = m(idx, pos=pos, attn_mask=msk)
        assert torch.isfinite(out).all()  # padding rows included
        assert (out[0, :5] - ra).abs().max() <= 1e-5
        assert (out[0, 5:12] - rb).abs().max() <= 1e-5
        assert (out[1] - rc).abs().max() <= 1e-5
        # documented: a padding row that attends to nothing attends to itself alone
        assert (out[0, 12] - m(idx[:1, 12:13], pos=pos[:1, 12:13])[0, 0]).abs().max() <= 1e-5
    # (T,) positions broadcast over the batch
    assert (m(idx[1:], pos=torch.arange(15))[0] - rc).abs().max() <= 1e-5


def test_packed_sequences_flex_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask
    m = our_tiny()
    idx, pos, doc, mask, (ra, rb, rc) = packed_inputs(m)

    def mask_mod(b, h, q, k):
        return (doc[b, q] == doc[b, k]) & (doc[b, q] >= 0) & (q >= k)
    with warnings.catch_warnings(), torch.no_grad():  # flex_attention has no backward on CPU
        warnings.simplefilter("ignore")  # eager flex_attention on CPU warns that it is slow
        bm = create_block_mask(mask_mod, 2, None, 15, 15, device="cpu")
        out = m(idx, pos=pos, attn_mask=bm)
    assert (out[0, :5] - ra).abs().max() <= 1e-5
    assert (out[0, 5:12] - rb).abs().max() <= 1e-5
    assert (out[1] - rc).abs().max() <= 1e-5


def test_token_logprobs_matches_log_softmax():
    m = our_tiny()
    idx = tokens(3, 17)
    targets = tokens(3, 17, seed=5)
    w = torch.randn(3, 17)  # arbitrary weights so every position's gradient matters

    m.zero_grad()
    lp = m.token_logprobs(m.hidden(idx), targets, chunk_size=7)  # 51 rows: chunks of 7, last one partial
    (lp * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}

    m.zero_grad()
    ref = F.log_softmax(m(idx).float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    (ref * w).sum().backward()
    assert lp.dtype == torch.float32 and lp.shape == (3, 17)
    assert (lp - ref).abs().max() <= 1e-5
    for n, p in m.named_parameters():
        assert (grads[n] - p.grad).abs().max() <= 1e-5, n
    with torch.no_grad():
        assert (m.token_logprobs(m.hidden(idx), targets, chunk_size=5) - ref).abs().max() <= 1e-5


def test_token_logprobs_never_saves_full_logits():
    m = our_tiny()
    idx, targets = tokens(4, 16), tokens(4, 16, seed=7)  # N = 64 rows, V = 1000
    h = m.hidden(idx).detach().requires_grad_()
    saved = []
    params = list(m.parameters())  # the lm_head weight itself is saved, but it is no new memory
    pack = lambda t: saved.append(0 if any(t is p for p in params) else t.numel()) or t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = m.token_logprobs(h, targets, chunk_size=16)
    assert max(saved, default=0) < 64 * 1000 / 2  # at most one chunk's logits, here none
    lp.sum().backward()
    ref = F.log_softmax(m.lm_head(h).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(torch.autograd.grad(ref.sum(), h)[0], h.grad, atol=1e-6)


def test_token_logprobs_float32_under_bf16_autocast():
    m = our_tiny()
    idx, targets = tokens(2, 9), tokens(2, 9, seed=6)
    with torch.no_grad():
        ref = F.log_softmax(m(idx).double(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = m.token_logprobs(m.hidden(idx), targets)
    assert lp.dtype == torch.float32
    assert (lp.double() - ref).abs().max() <= 0.2  # bf16 matmuls, float32 normalization


def test_gradient_checkpointing_same_grads_less_memory():
    m = our_tiny().train()
    idx = tokens(2, 32)

    def run():
        m.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = m(idx).float().logsumexp(-1).mean()
        loss.backward()
        return sum(saved), {n: p.grad.clone() for n, p in m.named_parameters()}
    saved_plain, g_plain = run()
    m.gradient_checkpointing = True
    saved_ckpt, g_ckpt = run()
    assert saved_ckpt < saved_plain / 2  # block internals are not kept for backward
    for n in g_plain:
        assert (g_plain[n] - g_ckpt[n]).abs().max() <= 1e-6, n


def naive_greedy(m, idx, n):
    for _ in range(n):
        with torch.no_grad():
            nxt = m(idx[:, -m.config.block_size:])[:, -1].argmax(-1)
        idx = torch.cat([idx, nxt[:, None]], 1)
    return idx


def test_generate_greedy_and_eos():
    m = our_tiny(block_size=16)  # generating past 16 tokens exercises the context crop
    idx = tokens(2, 10)
    ref = naive_greedy(m, idx, 12)
    assert torch.equal(m.generate(idx, 12, temperature=0, eos_token_id=None), ref)
    # eos = a token row 0 produces; each row stops there and is padded with eos afterwards
    eos = ref[0, 13].item()
    out = m.generate(idx, 12, temperature=0, eos_token_id=eos)
    expected, ends = [], []
    for row in ref[:, 10:].tolist():
        end = row.index(eos) + 1 if eos in row else len(row)
        expected.append(row[:end] + [eos] * (len(row) - end))
        ends.append(end)
    assert out.shape == (2, 10 + max(ends))  # stops once every row has ended
    assert out[:, 10:].tolist() == [r[:max(ends)] for r in expected]
    assert torch.equal(out[:, :10], idx)


def test_generate_sampling():
    m = our_tiny()
    idx = tokens(2, 5)
    top1 = m.generate(idx, 6, temperature=0.7, top_k=1, eos_token_id=None)
    assert torch.equal(top1, naive_greedy(m, idx, 6))  # top_k=1 sampling is greedy
    a = m.generate(idx, 6, top_k=50, generator=torch.Generator().manual_seed(0), eos_token_id=None)
    b = m.generate(idx, 6, top_k=50, generator=torch.Generator().manual_seed(0), eos_token_id=None)
    assert torch.equal(a, b) and a.shape == (2, 11)
    assert not m.training


def test_flops_hand_count():
    m = GPT(GPTConfig(**TINY))
    L, C, V = 2, 64, 1000
    per_layer = (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 4 * C  # attn, mlp, 2 LN
    blocks = L * per_layer + 2 * C  # + ln_f; the lm_head (tied wte) only on predicted positions, wpe a lookup
    # 10 tokens in, 4 of them predict a response token, attention over 1+2+...+10 (query, key) pairs
    assert m.flops(10, 4, 55) == 6 * blocks * 10 + 6 * V * C * 4 + 12 * L * C * 55
    assert m.num_params(non_embedding=False) == L * per_layer + 2 * C + V * C + 64 * C


def test_init_scales():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=128, vocab_size=500, block_size=32))
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(m.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert abs(m.transformer.h[0].attn.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert m.transformer.h[0].attn.c_attn.bias.abs().max() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention kernels and bf16 autocast need CUDA")
def test_cuda_flex_and_sdpa_mask_agree_bf16():
    from torch.nn.attention.flex_attention import create_block_mask
    m = our_tiny().cuda().train()
    m.gradient_checkpointing = True
    idx, pos, doc, mask, _ = packed_inputs(m.cpu())
    m.cuda()
    idx, pos, doc, mask = idx.cuda(), pos.cuda(), doc.cuda(), mask.cuda()
    targets = torch.roll(idx, -1, 1)
    bm = create_block_mask(lambda b, h, q, k: (doc[b, q] == doc[b, k]) & (doc[b, q] >= 0) & (q >= k),
                           2, None, 15, 15, device="cuda")
    results = []
    for msk in (mask, bm):
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp = m.token_logprobs(m.hidden(idx, pos=pos, attn_mask=msk), targets, chunk_size=8)
        assert lp.dtype == torch.float32
        lp[doc >= 0].sum().backward()
        results.append((lp.detach()[doc >= 0], m.transformer.h[0].attn.c_attn.weight.grad.clone()))
    (lp_sdpa, g_sdpa), (lp_flex, g_flex) = results
    assert torch.isfinite(lp_sdpa).all() and torch.isfinite(g_sdpa).all()
    assert (lp_sdpa - lp_flex).abs().max() <= 0.05
    assert (g_sdpa - g_flex).norm() <= 0.05 * g_sdpa.norm()


# =============================================================================
# prepare.py: formats, shards, toy task
# Tests for prepare.py: formats, tokens, truncation, split, skip accounting, fatal inputs, shard reader, toy task.
# References are independent of prepare.py: literal expected strings, tiktoken's own encode(), a naive
# byte-level parse of the shard layout, and a separate re-implementation of the HH prompt rule.

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
if not os.environ.get("TIKTOKEN_CACHE_DIR") and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")



ENC = tiktoken.get_encoding("gpt2")
EOT = 50256
HH_FILE = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
HH_MISSING = (f"needs the real HH-RLHF pairs at {HH_FILE}: mkdir -p {HH_FILE.parent} && curl -L -o {HH_FILE} "
              "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/harmless-base/test.jsonl.gz")
ASSIST = "\n\nAssistant:"


def enc(text):  # the reference encoding: plain text, special-looking strings included
    return ENC.encode(text, disallowed_special=())


def ref_pair(prompt, chosen, rejected):
    return enc(prompt), enc(chosen) + [EOT], enc(rejected) + [EOT]


def write_rows(path, rows):
    """rows: dicts (json-dumped) or raw strings (written as-is), one per line; .gz compresses, .json = array."""
    path = Path(path)
    if path.name.endswith(".json"):
        path.write_text(json.dumps(rows))
        return path
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def run(tmp_path, rows, *args, name="in.jsonl", out="out"):
    path = rows if isinstance(rows, Path) else write_rows(tmp_path / name, rows)
    cfg = P.parse_args([f"--input={path}", f"--out_dir={tmp_path / out}", "--val_fraction=0", *args])
    return P.prepare(cfg, log=None), tmp_path / out


def read_split(out, split="train"):
    pairs = []
    for path in P.list_shards(out, split):
        shard = P.load_pairs(path)
        pairs += [tuple(x.tolist() for x in shard[i]) for i in range(len(shard))]
    return pairs


def read_all(out):
    return [p for s in ("train", "val") if list(Path(out).glob(f"{s}_*.bin")) for p in read_split(out, s)]

# -----------------------------------------------------------------------------
# formats: decoded tokens equal the source prompt and responses (+ end token)


HH_ROWS = [
    {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
     "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."},
    {"chosen": "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: d!",
     "rejected": "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: e?"},
]
HH_EXPECTED = [
    ("\n\nHuman: Hi there\n\nAssistant:", " Hello! How can I help?", " Go away."),
    ("\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant:", " d!", " e?"),
]


def test_hh_format(tmp_path):
    meta, out = run(tmp_path, HH_ROWS)
    assert meta["format"] == "hh"  # auto-detected
    pairs = read_split(out)
    assert pairs == [ref_pair(*e) for e in HH_EXPECTED]
    for (p, c, r), (ep, ec, er) in zip(pairs, HH_EXPECTED):
        assert (ENC.decode(p), ENC.decode(c), ENC.decode(r)) == (ep, ec + "<|endoftext|>", er + "<|endoftext|>")


def test_standard_format_custom_keys(tmp_path):
    rows = [{"q": "Question: 2+2?", "good": " Four.", "bad": " Five.", "extra": 1},
            {"q": "Name a color:", "good": " blue", "bad": " seven"}]
    for fmt in ("auto", "standard"):
        meta, out = run(tmp_path, rows, "--prompt_key=q", "--chosen_key=good", "--rejected_key=bad", f"--format={fmt}")
        assert meta["format"] == "standard"
        assert read_split(out) == [ref_pair("Question: 2+2?", " Four.", " Five."), ref_pair("Name a color:", " blue", " seven")]


def test_implicit_format(tmp_path):
    rows = [{"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."},
            {"chosen": "\n\nHuman: hi\n\nAssistant: I like it", "rejected": "\n\nHuman: hi\n\nAssistant: I hate it"},
            {"chosen": "Answer: yes", "rejected": "Answer: yes, but no"}]
    meta, out = run(tmp_path, rows, "--format=implicit")
    assert read_split(out) == [ref_pair("The capital of France is", " Paris.", " Rome."),  # cut at whitespace
                               ref_pair("\n\nHuman: hi\n\nAssistant:", " I like it", " I hate it"),  # turn boundary
                               ref_pair("Answer:", " yes", " yes, but no")]
    meta, out = run(tmp_path, rows[:1])
    assert meta["format"] == "implicit"  # auto: no prompt field, no HH transcript


def test_conversational_format(tmp_path):
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    rows = [{"chosen": [u("What is 2+2?"), a("4")], "rejected": [u("What is 2+2?"), a("5")]},
            {"prompt": [{"role": "system", "content": "Be nice."}, u("Hi")], "chosen": [a("Hello!")], "rejected": [a("What?")]},
            {"prompt": "Tell a joke", "chosen": [u("Tell a joke"), a("Knock knock")], "rejected": [u("Tell a joke"), a("No.")]},
            {"chosen": [u("q"), a("a1"), u("more?"), a("a2")], "rejected": [u("q"), a("b1")]}]
    meta, out = run(tmp_path, rows)
    assert meta["format"] == "conversational"
    expected = [("\n\nHuman: What is 2+2?\n\nAssistant:", " 4", " 5"),
                ("\n\nSystem: Be nice.\n\nHuman: Hi\n\nAssistant:", " Hello!", " What?"),
                ("\n\nHuman: Tell a joke\n\nAssistant:", " Knock knock", " No."),
                ("\n\nHuman: q\n\nAssistant:", " a1\n\nHuman: more?\n\nAssistant: a2", " b1")]
    assert read_split(out) == [ref_pair(*e) for e in expected]
    # the template is HH's: the same pair as an HH transcript gives the same tokens
    _, out2 = run(tmp_path, [{"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4",
                              "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"}], out="out2")
    assert read_split(out2)[0] == read_split(out)[0]


@pytest.mark.parametrize("name", ["in.json", "in.jsonl.gz", "in.json.gz"])
def test_json_array_and_gzip_inputs(tmp_path, name):
    path = tmp_path / name
    if name == "in.json.gz":
        with gzip.open(path, "wt") as f:
            json.dump(HH_ROWS, f)
    else:
        write_rows(path, HH_ROWS)
    meta, out = run(tmp_path, path)
    assert meta["rows_read"] == 2 and meta["pairs"]["train"] == 2
    assert read_split(out) == [ref_pair(*e) for e in HH_EXPECTED]


def test_endoftext_in_text_is_plain_text(tmp_path):
    rows = [{"prompt": "a <|endoftext|> b:", "chosen": " x<|endoftext|>y", "rejected": " <|endoftext|>"}]
    _, out = run(tmp_path, rows)
    (p, c, r), = read_split(out)
    assert (p, c, r) == ref_pair("a <|endoftext|> b:", " x<|endoftext|>y", " <|endoftext|>")
    assert EOT not in p and EOT not in c[:-1] and EOT not in r[:-1] and c[-1] == r[-1] == EOT
    assert ENC.decode(c[:-1]) == " x<|endoftext|>y"

# -----------------------------------------------------------------------------
# truncation


def words(n, tag):  # text of n distinct words
    return "".join(f" {tag}{i}" for i in range(n))


def test_truncation_rules(tmp_path):
    long_prompt, mid_prompt = "Q:" + words(60, "p"), "Q:" + words(12, "m")
    rows = [{"prompt": long_prompt, "chosen": " yes", "rejected": words(40, "r")},  # prompt and rejected cut
            {"prompt": mid_prompt, "chosen": " ok", "rejected": " no"},  # fits: nothing cut
            {"prompt": mid_prompt, "chosen": words(20, "c"), "rejected": " no"}]  # too long: only the prompt is cut
    meta, out = run(tmp_path, rows, "--max_length=64", "--max_prompt_length=16")
    got = read_split(out)
    P0, C0, R0 = ref_pair(*rows[0].values())
    assert len(P0) > 16 and len(R0) > 48
    assert got[0] == (P0[-16:], C0, R0[:48])  # prompt keeps its end; rejected loses its end (and its EOT)
    assert got[0][2][-1] != EOT
    assert got[1] == ref_pair(*rows[1].values())
    P2, C2, R2 = ref_pair(*rows[2].values())
    assert len(P2) + len(C2) > 64 and len(P2) > 16 and 16 + len(C2) <= 64
    assert got[2] == (P2[-16:], C2, R2)
    assert meta["truncated"] == {"prompts": 2, "chosen": 0, "rejected": 1, "pairs": 2}
    assert all(len(p) + max(len(c), len(r)) <= 64 for p, c, r in got)


def test_truncation_skips(tmp_path):
    rows = [{"prompt": "Q:", "chosen": " fine", "rejected": " bad"},
            {"prompt": "Q:" + words(30, "p"), "chosen": " a", "rejected": " b"},  # prompt fills max_length: no room
            {"prompt": "Q:", "chosen": words(40, "s") + " A", "rejected": words(40, "s") + " B"}]  # same after cut
    meta, out = run(tmp_path, rows, "--max_length=16", "--max_prompt_length=16")
    assert meta["skipped"]["empty_after_truncation"] == {"count": 1, "first_lines": [2]}
    assert meta["skipped"]["identical_after_truncation"] == {"count": 1, "first_lines": [3]}
    assert read_split(out) == [ref_pair("Q:", " fine", " bad")]

# -----------------------------------------------------------------------------
# split by prompt, determinism, sharding


def test_split_by_prompt_and_determinism(tmp_path):
    rows = [{"prompt": f"Prompt number {i}:", "chosen": f" good {j}", "rejected": f" bad {j}"}
            for i in range(120) for j in range(3)]
    path = write_rows(tmp_path / "in.jsonl", rows)
    outs = []
    for k, args in enumerate([["--num_workers=1"], ["--num_workers=2", "--batch_rows=7"], ["--num_workers=1"]]):
        cfg = P.parse_args([f"--input={path}", f"--out_dir={tmp_path / f'o{k}'}", "--val_fraction=0.3", *args])
        P.prepare(cfg, log=None)
        outs.append(tmp_path / f"o{k}")
    prompts = {s: {ENC.decode(p) for p, _, _ in read_split(outs[0], s)} for s in ("train", "val")}
    assert prompts["train"] and prompts["val"] and not prompts["train"] & prompts["val"]
    assert 0.1 < len(prompts["val"]) / 120 < 0.5
    assert len(read_split(outs[0], "train")) + len(read_split(outs[0], "val")) == 360
    for o in outs[1:]:  # byte-identical across runs and worker counts
        for f in ("train_000000.bin", "val_000000.bin"):
            assert (o / f).read_bytes() == (outs[0] / f).read_bytes()


def test_shards_bounded_and_ordered(tmp_path):
    rows = [{"prompt": f"P{i}:", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(20)]
    meta, out = run(tmp_path, rows, "--shard_pairs=7", "--batch_rows=3", "--num_workers=1")
    paths = P.list_shards(out, "train")
    assert [Path(p).name for p in paths] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert [len(P.load_pairs(p)) for p in paths] == [7, 7, 6]
    assert [s["pairs"] for s in meta["shards"]["train"]] == [7, 7, 6]
    assert read_split(out) == [ref_pair(*r.values()) for r in rows]
    # a rerun with fewer shards replaces the whole folder: no stale shard is left behind
    run(tmp_path, rows, "--shard_pairs=100")
    assert sorted(f.name for f in out.iterdir()) == ["meta.json", "train_000000.bin"]

# -----------------------------------------------------------------------------
# every row accounted for: bad rows are skipped with a reason and line number


def test_bad_rows_counted(tmp_path, capsys):
    good = HH_ROWS[0]
    lines = [good,                                                                             # 1
             '{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y", "rejected": ',                   # 2 malformed json
             {"chosen": "\n\nHuman: x\n\nAssistant: y"},                                        # 3 missing field
             {"chosen": 5, "rejected": "\n\nHuman: x\n\nAssistant: y"},                         # 4 wrong type
             "",                                                                                # 5 blank: not a row
             {"chosen": "\n\nHuman: x\n\nAssistant: ", "rejected": "\n\nHuman: x\n\nAssistant: y"},  # 6 empty
             {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: y"},  # 7 identical
             "[1, 2]",                                                                          # 8 not an object
             {"chosen": "no turns here", "rejected": "none here"},                              # 9 no assistant
             {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: b"},  # 10 mismatch
             {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",             # 11 recoverable
              "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: X\n\nAssistant: e"},
             HH_ROWS[1]]                                                                        # 12
    path = write_rows(tmp_path / "in.jsonl", lines)
    cfg = P.parse_args([f"--input={path}", f"--out_dir={tmp_path / 'out'}", "--val_fraction=0"])
    meta = P.prepare(cfg)  # prints the summary
    expected_skips = {"malformed_json": [2], "missing_field": [3], "wrong_type": [4, 8], "empty_text": [6],
                      "identical": [7], "no_assistant_turn": [9], "prompt_mismatch": [10]}
    assert meta["skipped"] == {k: {"count": len(v), "first_lines": v} for k, v in expected_skips.items()}
    assert meta["notes"] == {"prompt_mismatch_recovered": {"count": 1, "first_lines": [11]}}
    assert meta["rows_read"] == 11 and meta["pairs"] == {"train": 3, "val": 0}
    assert read_split(tmp_path / "out") == [
        ref_pair(*HH_EXPECTED[0]),
        ref_pair("\n\nHuman: a\n\nAssistant:", " b\n\nHuman: c\n\nAssistant: d", " b\n\nHuman: X\n\nAssistant: e"),
        ref_pair(*HH_EXPECTED[1])]
    printed = capsys.readouterr().out
    assert "rows read" in printed and "malformed_json" in printed and "prompt_mismatch" in printed
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"]["wrong_type"]["first_lines"] == [4, 8]
    # --hh_mismatch=skip: the recoverable row is skipped too
    meta, _ = run(tmp_path, path, "--hh_mismatch=skip", out="out2")
    assert meta["skipped"]["prompt_mismatch"] == {"count": 2, "first_lines": [10, 11]} and meta["notes"] == {}


@pytest.mark.parametrize("fmt,row,reason", [
    ("standard", {"prompt": ["x"], "chosen": " a", "rejected": " b"}, "wrong_type"),
    ("standard", {"prompt": "  ", "chosen": " a", "rejected": " b"}, "empty_text"),
    ("implicit", {"chosen": "abc", "rejected": "xyz"}, "no_shared_prompt"),
    ("conversational", {"chosen": [{"role": "robot", "content": "x"}], "rejected": []}, "wrong_type"),
    ("conversational", {"chosen": "text", "rejected": [{"role": "user", "content": "x"}]}, "wrong_type"),
    ("conversational", {"chosen": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                        "rejected": [{"role": "user", "content": "a"}, {"role": "user", "content": "c"}]}, "prompt_mismatch"),
    ("conversational", {"chosen": [{"role": "assistant", "content": "a"}],
                        "rejected": [{"role": "assistant", "content": "b"}]}, "no_shared_prompt"),
])
def test_bad_rows_per_format(tmp_path, fmt, row, reason):
    good = {"standard": {"prompt": "Q:", "chosen": " a", "rejected": " b"},
            "implicit": {"chosen": "Q: a", "rejected": "Q: b"},
            "conversational": {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]}}[fmt]
    meta, _ = run(tmp_path, [good, row], f"--format={fmt}")
    assert meta["skipped"] == {reason: {"count": 1, "first_lines": [2]}} and meta["pairs"]["train"] == 1

# -----------------------------------------------------------------------------
# input that is not the claimed format at all: a clear error naming file and line, nothing written


def _gzip_truncated(path):
    write_rows(path, HH_ROWS * 400)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


FATAL = [  # (file name, writer, error regex after the file name)
    ("notjson.jsonl", lambda p: p.write_text("hello world\n" + json.dumps(HH_ROWS[0]) + "\n"), r":1: not valid JSON"),
    ("late.jsonl", lambda p: p.write_text("\n\nthis is prose\n"), r":3: not valid JSON"),
    ("trunc.jsonl.gz", _gzip_truncated, r": broken gzip file after line \d+"),
    ("notgzip.jsonl.gz", lambda p: p.write_text(json.dumps(HH_ROWS[0])), r": broken gzip file after line 0"),
    ("empty.jsonl", lambda p: p.write_text(""), r":1: empty file"),
    ("blank.jsonl", lambda p: p.write_text("\n  \n"), r":1: empty file"),
    ("empty.json", lambda p: p.write_text("[]"), r":1: empty file"),
    ("unknown.jsonl", lambda p: write_rows(p, [{"foo": 1}, HH_ROWS[0]]), r":1: unknown format"),
    ("obj.json", lambda p: p.write_text('{"a": 1}'), r":1: expected a JSON array"),
    ("bad.json", lambda p: p.write_text('[\n{"chosen": }]'), r":2: not a valid JSON array"),
    ("mostly.jsonl", lambda p: write_rows(p, [HH_ROWS[0]] + ["garbage"] * 5), r": 5 of 6 lines are not valid JSON"),
    ("allskipped.jsonl", lambda p: write_rows(p, [{"chosen": "x", "rejected": "x"}] * 3), r": .*no train pairs"),
]


@pytest.mark.parametrize("name,make,pattern", FATAL, ids=[f[0] for f in FATAL])
def test_fatal_inputs_write_nothing(tmp_path, name, make, pattern):
    path = tmp_path / name
    make(path)
    out = tmp_path / "out"
    cfg = P.parse_args([f"--input={path}", f"--out_dir={out}"])
    with pytest.raises(P.PrepareError, match=re.escape(str(path)) + pattern):
        P.prepare(cfg, log=None)
    assert not out.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == [name]  # no staging folders left behind


def test_offline_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(P.tiktoken, "get_encoding", offline)
    out = tmp_path / "out"
    with pytest.raises(P.PrepareError, match="TIKTOKEN_CACHE_DIR"):
        P.prepare(P.parse_args([f"--out_dir={out}", "--num_workers=1"]), log=None)
    assert not out.exists()


def test_offline_tokenizer_message_is_accurate(tmp_path):
    # tiktoken's cache names each file by the SHA-1 of its URL, so a folder holding vocab.bpe and encoder.json under
    # their own names is no cache: the one-line error says so and how to fill one, and following it works offline
    import hashlib
    urls = [f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{f}" for f in ("vocab.bpe", "encoder.json")]
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent"))
    files = [cache / hashlib.sha1(u.encode()).hexdigest() for u in urls]
    if not all(f.is_file() for f in files):
        pytest.skip("no filled tiktoken cache (TIKTOKEN_CACHE_DIR) to copy")
    plain, copied = tmp_path / "plain", tmp_path / "copied"
    plain.mkdir()
    for f, u in zip(files, urls):
        shutil.copy(f, plain / u.rsplit("/", 1)[1])
    shutil.copytree(cache, copied)
    no_net = "http://127.0.0.1:9"  # every download goes to a closed local port: offline, whatever this machine has
    env = {**os.environ, **{k: no_net for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")},
           "NO_PROXY": "", "no_proxy": ""}
    cmd = [sys.executable, str(ROOT / "prepare.py"), "--toy_pairs=60"]
    r = subprocess.run(cmd + [f"--out_dir={tmp_path / 'a'}"], env={**env, "TIKTOKEN_CACHE_DIR": str(plain)},
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("prepare.py: error: could not load tiktoken's GPT-2 tokenizer")
    assert "SHA-1 of its URL" in r.stderr and "TIKTOKEN_CACHE_DIR=DIR" in r.stderr and "copy DIR" in r.stderr
    assert not (tmp_path / "a").exists()
    r = subprocess.run(cmd + [f"--out_dir={tmp_path / 'b'}"], env={**env, "TIKTOKEN_CACHE_DIR": str(copied)},
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and (tmp_path / "b" / "train_000000.bin").is_file(), r.stderr


def test_failed_run_keeps_previous_output(tmp_path):
    _, out = run(tmp_path, HH_ROWS)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    bad = tmp_path / "bad.jsonl.gz"
    _gzip_truncated(bad)
    with pytest.raises(P.PrepareError):
        run(tmp_path, bad)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.jsonl.gz", "in.jsonl", "out"]
    (out / "notes.txt").write_text("mine")  # a folder with foreign files is never replaced
    with pytest.raises(P.PrepareError, match="refusing"):
        run(tmp_path, HH_ROWS)
    assert (out / "notes.txt").read_text() == "mine"


def test_unwritable_output_is_one_line_and_keeps_previous_output(tmp_path, monkeypatch, capsys):
    # disk full while writing, a read-only folder at the final rename (once; then the old output goes back), and,
    # when not root (root ignores permissions), a real read-only parent folder: one "error:" line naming the
    # output folder, the previous output byte for byte, nothing else left
    import errno
    _, out = run(tmp_path, HH_ROWS)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    real_open, real_replace = open, os.replace
    def full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)
    def read_only_once(src, dst):
        if Path(dst) == out and not failed:
            failed.append(dst)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src), str(dst))
        return real_replace(src, dst)
    faults = [("open", full_disk, os.strerror(errno.ENOSPC)), ("replace", read_only_once, os.strerror(errno.EROFS))]
    if os.geteuid() != 0:
        faults.append(("chmod", None, os.strerror(errno.EACCES)))
    for name, fake, reason in faults:
        failed = []
        with monkeypatch.context() as m:
            if name == "open":
                m.setattr(P, "open", fake, raising=False)  # the files prepare.py opens itself
            elif name == "replace":
                m.setattr(os, "replace", fake)
            else:
                tmp_path.chmod(0o555)
            try:
                with pytest.raises(SystemExit) as e:
                    P.main([f"--input={tmp_path / 'in.jsonl'}", f"--out_dir={out}", "--num_workers=1"])
            finally:
                tmp_path.chmod(0o755)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1, (name, err)
        assert err.startswith(f"prepare.py: error: could not write {out}: {reason}"), (name, err)
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before, name
        assert sorted(f.name for f in tmp_path.iterdir()) == ["in.jsonl", "out"], name


def stop_prepare_while_it_tokenizes(tmp_path, sig, targets):
    # prepare.py with 6 workers and big batches (more results in flight) on input that keeps them busy far longer
    # than the test waits (a 10,000-row file read 12 times); sig goes to each of targets ("group": a Ctrl-C or a
    # scheduler, "parent": kill PID) once the workers' results are being written (into a hidden sibling of out)
    import signal
    import time
    _, out = run(tmp_path, HH_ROWS)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    big = tmp_path / "big.jsonl"
    text = " ".join(f"word{i % 97} and more" for i in range(60))
    big.write_text("".join(json.dumps({"prompt": f"Question {i}: {text}", "chosen": f" yes {i} {text}",
                                       "rejected": f" no {text}"}) + "\n" for i in range(10000)))
    cmd = [sys.executable, str(ROOT / "prepare.py"), "--input=" + ",".join([str(big)] * 12), f"--out_dir={out}",
           "--num_workers=6", "--batch_rows=500"]
    rng = random.Random(0)
    for attempt, target in enumerate(targets):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < 30 and not any(
                f.is_file() and f.stat().st_size for d in tmp_path.glob(".out*") for f in d.glob(".*")):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        assert p.poll() is None, f"try {attempt}: prepare.py ended before {sig.name} was sent: {p.communicate()}"
        if target == "group":
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        try:
            _, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            pytest.fail(f"try {attempt}: prepare.py still running 10 s after {sig.name}")
        assert p.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("prepare.py: interrupted; nothing was written"), err
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before
        assert sorted(f.name for f in tmp_path.iterdir()) == ["big.jsonl", "in.jsonl", "out"]


def test_ctrl_c_while_tokenizing_exits_at_once_and_keeps_previous_output(tmp_path):
    # Ctrl-C reaches the whole foreground process group; a worker killed while sending its result left the parent
    # waiting for the rest of the message forever (about 3 tries in 10). Here: 4 tries, SIGINT to the group while
    # the workers tokenize -> exit within seconds, one line
    import signal
    stop_prepare_while_it_tokenizes(tmp_path, signal.SIGINT, ["group"] * 4)


def test_sigterm_while_tokenizing_cleans_up_like_ctrl_c(tmp_path):
    # SIGTERM (kill PID, or a scheduler to the whole group) left the hidden staging folder data/.NAME.tmp-PID-...
    # until the next run; now it ends like Ctrl-C: one line, exit status 130, nothing staged left, the previous
    # output untouched (SIGKILL cannot be caught: the next run removes its staging, tested below)
    import signal
    stop_prepare_while_it_tokenizes(tmp_path, signal.SIGTERM, ["parent", "group"])


def test_sigkill_while_tokenizing_leaves_no_worker_behind(tmp_path):
    # SIGKILL cannot be caught: its workers waited for work forever; now they exit within seconds (the staging
    # folder goes at the next run: test_prepare_removes_the_staging_folder_of_a_run_killed_by_sigkill)
    import signal
    import time
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i} " + "word " * 50, "chosen": " yes", "rejected": " no"})
                           + "\n" for i in range(20000)))
    p = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), f"--input={src}", "--num_workers=3",
                          f"--out_dir={tmp_path / 'out'}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # its workers: the processes of its group
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 30 and not any(
            f.stat().st_size for f in tmp_path.glob(".out.tmp-*/.*.tokens.tmp")):
        time.sleep(0.01)
    assert p.poll() is None, "prepare.py ended before SIGKILL was sent"
    p.kill()
    p.wait()
    for _ in range(100):
        ps = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout.splitlines()
        left = [line for line in ps if line.split()[0] == str(p.pid) and not line.split()[1].startswith("Z")]
        if not left:
            break
        time.sleep(0.1)
    else:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"{len(left)} workers still running 10 s after prepare.py was killed")


def test_options_errors():
    with pytest.raises(P.PrepareError, match=r"did you mean --max_length\?.*valid keys: .*max_prompt_length"):
        P.parse_args(["--max_lenght=3"])
    with pytest.raises(P.PrepareError, match="expects int"):
        P.parse_args(["--max_length=big"])
    cfg = P.parse_args(["--max_length=1_024", "--val_fraction=0.1", "--format=hh"])
    assert (cfg.max_length, cfg.val_fraction, cfg.format) == (1024, 0.1, "hh")
    for bad in (["--max_prompt_length=600"], ["--format=xml"], ["--dataset=imdb"]):
        with pytest.raises(P.PrepareError):
            P.validate(P.parse_args(bad))

# -----------------------------------------------------------------------------
# shard reader


def naive_read(path):
    """Reference parse of the documented layout, straight from the bytes."""
    raw = Path(path).read_bytes()
    header = np.frombuffer(raw[:1024], dtype=np.int32)
    n, ntok = int(header[2]), int(header[3])
    lengths = np.frombuffer(raw[1024:1024 + 12 * n], dtype=np.int32).reshape(n, 3)
    tokens = np.frombuffer(raw[1024 + 12 * n:], dtype=np.uint16)
    assert len(tokens) == ntok
    pairs, pos = [], 0
    for p, c, r in lengths:
        pairs.append((tokens[pos:pos + p].tolist(), tokens[pos + p:pos + p + c].tolist(),
                      tokens[pos + p + c:pos + p + c + r].tolist()))
        pos += p + c + r
    return header, pairs


def test_reader_matches_layout(tmp_path):
    rows = [{"prompt": f"Prompt {i}:", "chosen": " yes" * (i % 5 + 1), "rejected": " no" * (i % 3 + 1)} for i in range(30)]
    _, out = run(tmp_path, rows)
    path = P.list_shards(out, "train")[0]
    header, ref = naive_read(path)
    assert header[0] == 20241127 and header[1] == 1 and header[2] == 30 and not header[4:].any()
    pairs = P.load_pairs(path)
    assert len(pairs) == 30 and pairs.lengths.shape == (30, 3) and pairs.offsets.shape == (30,)
    assert [tuple(x.tolist() for x in pairs[i]) for i in range(30)] == ref == [ref_pair(*r.values()) for r in rows]
    assert int(pairs.offsets[3]) == int(pairs.lengths[:3].sum())
    p, c, r = pairs[-1]
    assert p.dtype == np.uint16 and np.shares_memory(c, pairs.tokens)  # views into the memmap
    assert isinstance(pairs.tokens, np.memmap)
    with pytest.raises(IndexError):
        pairs[30]


def _corrupt(src, dst, edit):
    raw = bytearray(Path(src).read_bytes())
    edit(raw)
    Path(dst).write_bytes(bytes(raw))
    return dst


def _set_int(raw, i, value):
    raw[4 * i:4 * i + 4] = np.int32(value).tobytes()


@pytest.mark.parametrize("edit,pattern", [
    (lambda b: _set_int(b, 0, 12345), r"bad magic 12345"),
    (lambda b: _set_int(b, 1, 2), r"version 2"),
    (lambda b: b.__delitem__(slice(-2, None)), r"truncated or corrupted"),
    (lambda b: b.__delitem__(slice(500, None)), r"too small"),
    (lambda b: _set_int(b, 2, 99), r"header \(99 pairs"),
    (lambda b: _set_int(b, 256, int.from_bytes(b[1024:1028], "little") + 1), r"lengths sum to"),  # a length changed
    (lambda b: (_set_int(b, 256, int.from_bytes(b[1024:1028], "little") + int.from_bytes(b[1028:1032], "little")),
                _set_int(b, 257, 0)), r"empty response"),  # same sum, but chosen has no tokens
], ids=["magic", "version", "truncated", "tiny", "pair_count", "length_sum", "empty_response"])
def test_reader_errors(tmp_path, edit, pattern):
    _, out = run(tmp_path, HH_ROWS)
    bad = _corrupt(out / "train_000000.bin", out / "train_000001.bin", edit)
    with pytest.raises(ValueError, match=pattern) as e:
        P.load_pairs(bad)
    assert str(bad) in str(e.value) and "python prepare.py" in str(e.value)


def test_list_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + r".*python prepare.py"):
        P.list_shards(tmp_path, "train")


def hand_shard(path, lengths, tokens):  # the documented layout, by hand
    header = np.zeros(256, dtype=np.int32)
    header[:4] = 20241127, 1, len(lengths), len(tokens)
    Path(path).write_bytes(header.tobytes() + np.array(lengths, dtype=np.int32).tobytes()
                           + np.array(tokens, dtype=np.uint16).tobytes())
    return path


def test_no_pair_with_an_empty_prompt_is_written_or_read(tmp_path):
    # a pair with no prompt token would have its first response token predicted from the previous pair's tokens
    rows = [{"prompt": "", "chosen": " a", "rejected": " b"}, {"prompt": " \n ", "chosen": " a", "rejected": " b"},
            {"prompt": "Q:", "chosen": " a", "rejected": " b"}]
    meta, out = run(tmp_path, rows, "--max_length=2", "--max_prompt_length=1")  # the prompt is cut to 1 token
    assert meta["skipped"] == {"empty_text": {"count": 2, "first_lines": [1, 2]}}
    p, c, r = ref_pair(*rows[2].values())
    assert read_split(out) == [(p[-1:], c[:1], r[:1])]
    good = hand_shard(tmp_path / "good.bin", [[2, 1, 1], [1, 2, 1]], [7, 8, 9, 10, 11, 12, 13, 14])
    assert [tuple(x.tolist() for x in P.load_pairs(good)[i]) for i in range(2)] == naive_read(good)[1]
    bad = hand_shard(tmp_path / "train_000000.bin", [[2, 1, 1], [0, 3, 1]], [7, 8, 9, 10, 11, 12, 13, 14])
    with pytest.raises(P.ShardError, match=re.escape(str(bad)) + r": 1 pairs have an empty prompt.*python prepare.py"):
        P.load_pairs(bad)


def test_max_token(tmp_path):
    # the trainer checks token ids against its vocabulary once per shard, naming it: the largest id, read once
    path = hand_shard(tmp_path / "s.bin", [[1, 1, 1], [2, 1, 1]], [3, 50300, 5, 6, 7, 50256, 9])
    assert P.load_pairs(path).max_token == max(t for pair in naive_read(path)[1] for x in pair for t in x) == 50300
    assert P.load_pairs(hand_shard(tmp_path / "e.bin", [], [])).max_token == -1
    _, out = run(tmp_path, HH_ROWS)
    assert P.load_pairs(out / "train_000000.bin").max_token == max(t for pair in read_split(out) for x in pair for t in x)

# -----------------------------------------------------------------------------
# real data: every row of HH harmless-base test is accounted for and round-trips


def test_real_hh_file(tmp_path):
    if not HH_FILE.exists():
        pytest.skip(HH_MISSING)
    out = tmp_path / "hh"
    meta = P.prepare(P.parse_args([f"--input={HH_FILE}", f"--out_dir={out}"]))
    rows = [json.loads(line) for line in gzip.open(HH_FILE)]
    assert len(rows) == meta["rows_read"] == 2312
    nskip = sum(v["count"] for v in meta["skipped"].values())
    assert meta["pairs"]["train"] + meta["pairs"]["val"] + nskip == 2312
    print(f"\nHH harmless-base test: read {len(rows)}, written {meta['pairs']}, skipped {nskip} "
          f"{ {k: v['count'] for k, v in meta['skipped'].items()} }, truncated {meta['truncated']}")
    # independent reference: the longest prefix of chosen that ends with "\n\nAssistant:" and starts rejected
    expected, truncated, empty, mismatched = collections.Counter(), 0, 0, 0
    for row in rows:
        c, r = row["chosen"], row["rejected"]
        ends = [m.end() for m in re.finditer(re.escape(ASSIST), c)]
        k = max(e for e in ends if r.startswith(c[:e]))
        mismatched += k != ends[-1]
        if not c[k:].strip() or not r[k:].strip():
            empty += 1
            continue
        p, ch, rj = ref_pair(c[:k], c[k:], r[k:])
        if len(p) + max(len(ch), len(rj)) > 512:
            truncated += 1
        else:
            expected[(c[:k], c[k:] + "<|endoftext|>", r[k:] + "<|endoftext|>")] += 1
    assert mismatched == 4 == meta["notes"]["prompt_mismatch_recovered"]["count"]
    assert empty == nskip == meta["skipped"]["empty_text"]["count"]
    written = collections.Counter(tuple(ENC.decode(x) for x in pair) for pair in read_all(out))
    assert sum(written.values()) == 2312 - empty
    assert not expected - written  # every untruncated pair decodes back to exactly its source text
    assert sum((written - expected).values()) == truncated == meta["truncated"]["pairs"]
    for p, c, r in read_all(out):
        assert len(p) <= 256 or len(p) + max(len(c), len(r)) <= 512
        assert len(p) + max(len(c), len(r)) <= 512

# -----------------------------------------------------------------------------
# toy task


def test_toy_reward_reference():
    assert P.toy_reward(" good great bad the .") == pytest.approx((2 - 1) / 4)
    assert P.toy_reward(" terrible awful .") == -1.0 and P.toy_reward(" the pizza was .") == 0.0
    assert P.toy_reward("") == 0.0
    assert P.toy_reward(" Great nice .<|endoftext|> bad bad bad") == 1.0  # text after the end token is ignored


def test_toy_pairs():
    a, b = P.make_toy_pairs(400, seed=1), P.make_toy_pairs(400, seed=1)
    assert a == b and a != P.make_toy_pairs(400, seed=2)
    assert all(P.toy_reward(x["chosen"]) > P.toy_reward(x["rejected"]) for x in a)
    train, val = P.toy_prompts("train"), P.toy_prompts("val")
    assert set(x["prompt"] for x in a) <= set(train) | set(val) and not set(train) & set(val)
    assert P.toy_prompts("val", seed=3) != val and sorted(P.toy_prompts("val", seed=3)) == sorted(val)
    assert "Review of the pizza:" in train + val
    item = lambda prompt: prompt.split(" the ")[-1].rstrip(":")
    assert not {item(p) for p in train} & {item(p) for p in val} and len({item(p) for p in val}) >= 5
    # every word is one GPT-2 token, so sequences stay short
    for w in P.TOY_ITEMS + P.TOY_POSITIVE + P.TOY_NEGATIVE + P.TOY_NEUTRAL:
        assert len(enc(w)) == 1 and w.startswith(" "), w
    assert len(P.TOY_ITEMS) >= 50 and len(P.TOY_POSITIVE) >= 10 and len(P.TOY_NEGATIVE) >= 10
    for x in a:
        assert len(enc(x["prompt"])) <= 10 and len(enc(x["chosen"])) <= 13 and len(enc(x["rejected"])) <= 13
        assert 6 <= len(x["chosen"].split()) - 1 <= 10  # 6-10 words, then " ."


def test_toy_prepare(tmp_path):
    out = tmp_path / "toy"
    meta = P.prepare(P.parse_args(["--toy_pairs=600", f"--out_dir={out}"]), log=None)
    assert meta["pairs"]["train"] + meta["pairs"]["val"] == 600 and meta["pairs"]["val"] > 30
    decoded = {s: [tuple(ENC.decode(x) for x in pair) for pair in read_split(out, s)] for s in ("train", "val")}
    item = lambda prompt: prompt.split(" the ")[-1].rstrip(":")
    train_items = {item(p) for p, _, _ in decoded["train"]}
    assert not train_items & {item(p) for p, _, _ in decoded["val"]}  # held-out items never seen in train
    assert {p for p, _, _ in decoded["val"]} <= set(P.toy_prompts("val"))
    for p, c, r in decoded["train"] + decoded["val"]:
        assert c.endswith(" .<|endoftext|>") and P.toy_reward(c) > P.toy_reward(r)
    again = P.prepare(P.parse_args(["--toy_pairs=600", f"--out_dir={tmp_path / 'toy2'}"]), log=None)
    assert (tmp_path / "toy2" / "train_000000.bin").read_bytes() == (out / "train_000000.bin").read_bytes()
    assert again["tokens"] == meta["tokens"]

# -----------------------------------------------------------------------------
# downloads (file:// stands in for Hugging Face) and the command line


def test_hh_download_file_url(tmp_path):
    hub = tmp_path / "hub"
    for subset, rows in (("harmless-base", HH_ROWS), ("helpful-base", HH_ROWS[:1])):
        (hub / subset).mkdir(parents=True)
        write_rows(hub / subset / "train.jsonl.gz", rows)
    dl, out = tmp_path / "dl", tmp_path / "out"
    args = ["--dataset=hh", "--hh_subsets=harmless-base,helpful-base", f"--hh_base_url=file://{hub}",
            f"--download_dir={dl}", f"--out_dir={out}", "--val_fraction=0"]
    meta = P.prepare(P.parse_args(args), log=None)
    assert meta["rows_read"] == 3 and meta["pairs"]["train"] == 3 and meta["format"] == "hh"
    assert sorted(str(p.relative_to(dl)) for p in dl.rglob("*") if p.is_file()) == \
        ["harmless-base/train.jsonl.gz", "helpful-base/train.jsonl.gz"]  # no .partial left
    assert read_split(out) == [ref_pair(*e) for e in HH_EXPECTED] + [ref_pair(*HH_EXPECTED[0])]
    with pytest.raises(P.PrepareError, match="could not download file://"):
        P.prepare(P.parse_args(args[:2] + [f"--hh_base_url=file://{tmp_path}/nowhere", f"--download_dir={tmp_path}/dl2",
                                           f"--out_dir={tmp_path}/o2"]), log=None)
    assert not list((tmp_path / "dl2").rglob("*.partial"))


def test_hh_download_cut_short_leaves_nothing(tmp_path, monkeypatch):
    class Short(io.BytesIO):  # the server promised 1000 bytes, then closed the connection after 10
        headers = {"Content-Length": "1000"}
    monkeypatch.setattr(P.urllib.request, "urlopen", lambda url, timeout: Short(b"0123456789"))
    dest = tmp_path / "dl" / "train.jsonl.gz"
    # download is shared with model.py: an OSError naming the URL (prepare's HH step wraps it in a PrepareError)
    with pytest.raises(OSError, match=r"could not download https://example\.invalid/train\.jsonl\.gz: "
                                      "incomplete, got 10 of 1000 bytes"):
        P.download("https://example.invalid/train.jsonl.gz", dest, log=lambda *a: None)
    assert not dest.exists() and not list((tmp_path / "dl").iterdir())
    args = ["--dataset=hh", "--hh_base_url=https://example.invalid", f"--download_dir={tmp_path / 'dl'}",
            f"--out_dir={tmp_path / 'out'}"]
    with pytest.raises(P.PrepareError, match=r"could not download https://example\.invalid/harmless-base/train"
                                             r"\.jsonl\.gz: incomplete.*--hh_base_url"):
        P.prepare(P.parse_args(args), log=None)
    assert not [f for f in (tmp_path / "dl").rglob("*") if f.is_file()] and not (tmp_path / "out").exists()


def test_command_line(tmp_path):
    env = dict(os.environ)
    cmd = [sys.executable, str(ROOT / "prepare.py")]
    r = subprocess.run(cmd + ["--toy_pairs=200", f"--out_dir={tmp_path / 'toy'}"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "rows read" in r.stdout and (tmp_path / "toy" / "val_000000.bin").exists()
    r = subprocess.run(cmd + ["--max_lenght=5"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "did you mean --max_length" in r.stderr and "valid keys" in r.stderr
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "--max_prompt_length=256" in r.stdout
    (tmp_path / "bad.jsonl").write_text("not json\n")
    r = subprocess.run(cmd + [f"--input={tmp_path / 'bad.jsonl'}"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 1 and f"{tmp_path / 'bad.jsonl'}:1: not valid JSON" in r.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.jsonl", "toy"]  # nothing written (no data/)
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import prepare"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == r.stderr == ""  # importing has no side effects


# =============================================================================
# dpo.py: the loss family
# Tests for the DPO loss family. Every value is checked against an independent float64 formula
# written with python's math module on scalars (never against dpo_loss itself).

NEEDS_LENGTHS = {"ipo", "sigmoid_norm", "simpo", "sft", "orpo"}

# -----------------------------------------------------------------------------
# scalar reference formulas

def logsig(x):
    # log(1/(1+exp(-x))) without overflow
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

def sig(x):
    return math.exp(logsig(x))

def ref_losses(loss_type, pc, pr, rc, rr, lc, lr, beta, ls, gamma, delta, tau):
    """pc, pr, rc, rr, lc, lr: python lists of floats, one per pair. Returns a list of losses."""
    B = len(pc)
    cl = [pc[i] - rc[i] for i in range(B)]  # chosen log-ratio
    rl = [pr[i] - rr[i] for i in range(B)]  # rejected log-ratio
    cdpo = lambda u: -(1 - ls) * logsig(u) - ls * logsig(-u)
    out = []
    if loss_type == "aot":
        a = sorted(pc[i] - pr[i] for i in range(B))
        b = sorted(rc[i] - rr[i] for i in range(B))
        return [cdpo(beta * (a[i] - b[i])) for i in range(B)]
    if loss_type in ("aot_pair", "aot_unpaired"):
        a, b = sorted(cl), sorted(rl)
        return [cdpo(beta * (a[i] - b[i])) for i in range(B)]
    for i in range(B):
        h = beta * (cl[i] - rl[i])
        if loss_type == "sigmoid":
            v = cdpo(h)
        elif loss_type == "ipo":
            v = (cl[i] / lc[i] - rl[i] / lr[i] - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            v = max(0.0, 1 - h)
        elif loss_type == "robust":
            v = ((1 - ls) * -logsig(h) - ls * -logsig(-h)) / (1 - 2 * ls)
        elif loss_type == "exo_pair":
            e = ls if ls > 0 else 1e-3
            q = sig(h)  # model's probability that chosen wins
            v = q * math.log(q / (1 - e)) + (1 - q) * math.log((1 - q) / e)
        elif loss_type == "nca_pair":
            a, b = beta * cl[i], beta * rl[i]
            v = -logsig(a) - 0.5 * logsig(-a) - 0.5 * logsig(-b)
        elif loss_type == "bco_pair":
            a, b = beta * cl[i], beta * rl[i]
            v = -logsig(a - delta) - logsig(delta - b)
        elif loss_type == "sppo_hard":
            v = (cl[i] - 1 / (2 * beta)) ** 2 + (rl[i] + 1 / (2 * beta)) ** 2
        elif loss_type == "apo_zero":
            v = 1 - sig(beta * cl[i]) + sig(beta * rl[i])
        elif loss_type == "apo_down":
            v = sig(beta * cl[i]) + 1 - sig(h)
        elif loss_type == "discopop":
            m = sig(h / tau)
            v = -logsig(h) * (1 - m) + math.exp(-h) * m
        elif loss_type == "sigmoid_norm":
            v = cdpo(beta * (cl[i] / lc[i] - rl[i] / lr[i]))
        elif loss_type == "simpo":
            v = cdpo(beta * (pc[i] / lc[i] - pr[i] / lr[i]) - gamma)
        elif loss_type == "sft":
            v = -pc[i] / lc[i]
        elif loss_type == "orpo":  # the odds p / (1 - p) of the per-token average probability, naively
            odds = lambda a: math.exp(a) / (1 - math.exp(a))
            v = -pc[i] / lc[i] - beta * logsig(math.log(odds(pc[i] / lc[i]) / odds(pr[i] / lr[i])))
        else:
            raise AssertionError(loss_type)
        out.append(v)
    return out

def random_batch(B, seed, dtype=torch.float64):
    rng = random.Random(seed)
    lc = [rng.randint(3, 40) for _ in range(B)]
    lr = [rng.randint(3, 40) for _ in range(B)]
    pc = [-rng.uniform(0.5, 3.0) * n for n in lc]  # summed log-probs: about -0.5..-3 nats per token
    pr = [-rng.uniform(0.5, 3.0) * n for n in lr]
    rc = [x + rng.uniform(-4, 4) for x in pc]
    rr = [x + rng.uniform(-4, 4) for x in pr]
    t = lambda v: torch.tensor(v, dtype=dtype)
    return (pc, pr, rc, rr, lc, lr), (t(pc), t(pr), t(rc), t(rr), t(lc), t(lr))

def call(loss_type, tensors, **kw):
    pc, pr, rc, rr, lc, lr = tensors
    return dpo_loss(pc, pr, rc, rr, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr, **kw)

# -----------------------------------------------------------------------------
# the worked examples

def test_worked_example_reference_free():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-2.0])
    want = -math.log(1 / (1 + math.exp(-1.0)))  # -log sigmoid(1)
    for kwargs in (dict(reference_free=True), dict()):  # flag, or reference log-probs passed as None
        losses, cr, rjr = dpo_loss(pc, pr, None, None, beta=1.0, **kwargs)
        assert abs(losses.item() - want) < 1e-6
        assert round(losses.item(), 4) == 0.3133
        assert cr.item() == -1.0 and rjr.item() == -2.0
    # reference_free=True must ignore reference log-probs that are passed
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-7.0]), torch.tensor([3.0]), beta=1.0, reference_free=True)
    assert abs(losses.item() - want) < 1e-6

def test_worked_example_with_reference():
    # policy margin 1.0, reference margin 0.0 -> loss = -log sigmoid(0.1 * 1.0)
    pc, pr = torch.tensor([-1.0]), torch.tensor([-2.0])
    rc, rr = torch.tensor([-1.5]), torch.tensor([-1.5])
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert abs(losses.item() - math.log1p(math.exp(-0.1))) < 1e-6
    assert round(losses.item(), 4) == 0.6444
    assert abs(cr.item() - 0.05) < 1e-7 and abs(rjr.item() + 0.05) < 1e-7

# -----------------------------------------------------------------------------
# every loss type vs its float64 formula

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.0), (0.3, 0.2)])
def test_matches_formula(loss_type, beta, ls):
    gamma, delta, tau = 0.7, 0.25, 0.05
    plain, tensors = random_batch(9, seed=100 * LOSS_TYPES.index(loss_type) + int(10 * beta) + int(10 * ls))
    losses, cr, rjr = call(loss_type, tensors, beta=beta, label_smoothing=ls, gamma=gamma,
                           bco_delta=delta, discopop_tau=tau)
    want = ref_losses(loss_type, *plain, beta, ls, gamma, delta, tau)
    assert losses.shape == (9,) and losses.dtype == torch.float64
    for got, w in zip(losses.tolist(), want):
        assert got == pytest.approx(w, rel=1e-9, abs=1e-12), (loss_type, got, w)
    pc, pr, rc, rr, lc, lr = plain
    if loss_type in ("simpo", "orpo"):  # their own reward: beta * per-token average policy log-prob
        want_c = [beta * pc[i] / lc[i] for i in range(9)]
        want_r = [beta * pr[i] / lr[i] for i in range(9)]
    else:
        want_c = [beta * (pc[i] - rc[i]) for i in range(9)]
        want_r = [beta * (pr[i] - rr[i]) for i in range(9)]
    assert cr.tolist() == pytest.approx(want_c, rel=1e-12)
    assert rjr.tolist() == pytest.approx(want_r, rel=1e-12)

def test_rewards_detached():
    _, (pc, pr, rc, rr, lc, lr) = random_batch(4, seed=1)
    pc.requires_grad_(True); pr.requires_grad_(True)
    for loss_type in LOSS_TYPES:
        losses, cr, rjr = call(loss_type, (pc, pr, rc, rr, lc, lr))
        assert losses.requires_grad and not cr.requires_grad and not rjr.requires_grad

def test_reference_none_is_zero_and_simpo_ignores_reference():
    plain, (pc, pr, rc, rr, lc, lr) = random_batch(5, seed=2)
    zero = torch.zeros_like(pc)
    for loss_type in LOSS_TYPES:
        a = dpo_loss(pc, pr, None, None, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
        b = dpo_loss(pc, pr, zero, zero, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
        for x, y in zip(a, b):
            assert torch.equal(x, y), loss_type
    a = dpo_loss(pc, pr, rc, rr, loss_type="simpo", chosen_lengths=lc, rejected_lengths=lr)
    b = dpo_loss(pc, pr, None, None, loss_type="simpo", chosen_lengths=lc, rejected_lengths=lr)
    for x, y in zip(a, b):
        assert torch.equal(x, y)

def test_label_smoothing_sigmoid_cdpo():
    # margin h: cDPO = -(1-e) log sig(h) - e log sig(-h); e = 0.5 gives (softplus(h) + softplus(-h)) / 2
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-3.0, -7.0, -4.0, -6.0))
    h = 0.5 * ((-3.0 + 4.0) - (-7.0 + 6.0))  # = 1.0
    for e in (0.0, 0.1, 0.3, 0.49):
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=e)
        assert losses.item() == pytest.approx(-(1 - e) * logsig(h) - e * logsig(-h), rel=1e-12)
    # smoothing makes the loss grow (not vanish) as the margin grows: it penalizes overconfidence
    big = dpo_loss(pc * 0 + 100.0, pr * 0, None, None, beta=1.0, label_smoothing=0.1)[0].item()
    assert big == pytest.approx(0.1 * 100.0, rel=1e-3)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)

def test_exo_pair_default_epsilon():
    _, tensors = random_batch(5, seed=3)
    a = call("exo_pair", tensors, label_smoothing=0.0)[0]
    b = call("exo_pair", tensors, label_smoothing=1e-3)[0]
    assert torch.allclose(a, b, rtol=0, atol=0)

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "nca_pair", "hinge"])
def test_sft_weight_adds_chosen_nll_per_token(loss_type):
    plain, tensors = random_batch(6, seed=4)
    pc, lc = plain[0], plain[4]
    base = call(loss_type, tensors, beta=0.2)[0]
    for w in (0.5, 1.0, 2.0):
        mixed = call(loss_type, tensors, beta=0.2, sft_weight=w)[0]
        want = [w * -pc[i] / lc[i] for i in range(6)]
        assert (mixed - base).tolist() == pytest.approx(want, rel=1e-9)

def test_sft_weight_and_length_types_need_lengths():
    pc, pr = torch.tensor([-5.0, -6.0]), torch.tensor([-7.0, -8.0])
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, None, None, sft_weight=1.0)
    for loss_type in sorted(NEEDS_LENGTHS):
        with pytest.raises(ValueError, match="chosen_lengths"):
            dpo_loss(pc, pr, None, None, loss_type=loss_type)
        with pytest.raises(ValueError, match="rejected_lengths"):
            dpo_loss(pc, pr, None, None, loss_type=loss_type, chosen_lengths=torch.tensor([3, 4]))
        with pytest.raises(ValueError, match="shape"):
            dpo_loss(pc, pr, None, None, loss_type=loss_type, chosen_lengths=torch.tensor([3, 4, 5]),
                     rejected_lengths=torch.tensor([3, 4]))
    # the other types work without lengths
    for loss_type in set(LOSS_TYPES) - NEEDS_LENGTHS:
        losses, _, _ = dpo_loss(pc, pr, None, None, loss_type=loss_type)
        assert losses.shape == (2,)

def test_unknown_loss_type():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-2.0])
    with pytest.raises(ValueError) as err:
        dpo_loss(pc, pr, None, None, loss_type="kto")
    msg = str(err.value)
    assert "'kto'" in msg and all(name in msg for name in LOSS_TYPES)
    assert isinstance(LOSS_TYPES, tuple) and len(set(LOSS_TYPES)) == 18  # 17 losses + the aot_unpaired alias

def test_only_one_reference_is_an_error():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-2.0])
    with pytest.raises(ValueError, match="both reference"):
        dpo_loss(pc, pr, torch.tensor([-1.0]), None)

# -----------------------------------------------------------------------------
# gradients

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck(loss_type):
    # central finite differences vs autograd, float64, through all four log-prob inputs
    _, (pc, pr, rc, rr, lc, lr) = random_batch(5, seed=5)
    inputs = tuple(t.clone().requires_grad_(True) for t in (pc, pr, rc, rr))
    f = lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3, loss_type=loss_type, label_smoothing=0.1,
                                    chosen_lengths=lc, rejected_lengths=lr, sft_weight=0.5, bco_delta=0.1)[0]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)

def test_sigmoid_gradient_closed_form():
    # d/d(policy_chosen) of -log sig(beta*h) = -beta * sig(-beta*h); manual check with the formula
    plain, (pc, pr, rc, rr, lc, lr) = random_batch(6, seed=6)
    pc.requires_grad_(True)
    beta = 0.4
    dpo_loss(pc, pr, rc, rr, beta=beta)[0].sum().backward()
    P, R, RC, RR = plain[:4]
    want = [-beta * sig(-beta * ((P[i] - RC[i]) - (R[i] - RR[i]))) for i in range(6)]
    assert pc.grad.tolist() == pytest.approx(want, rel=1e-12)

# -----------------------------------------------------------------------------
# numerical stability at huge margins (float32, where exp overflows at ~88)

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_finite_at_huge_margins(loss_type, beta):
    for m in (1e4, -1e4):
        # realistic signs: the better response has log-prob -1, the worse one -1 - |m|
        pc = torch.tensor([-1.0, -1.0 - abs(m)] if m > 0 else [-1.0 - abs(m), -1.0], requires_grad=True)
        pr = torch.tensor([-1.0 - abs(m), -1.0] if m > 0 else [-1.0, -1.0 - abs(m)], requires_grad=True)
        for ref in (None, (torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -3.0]))):
            rc, rr = ref if ref is not None else (None, None)
            for ls in (0.0, 0.1):
                losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls,
                                           chosen_lengths=torch.tensor([1, 1]), rejected_lengths=torch.tensor([1, 1]),
                                           sft_weight=0.1)
                assert losses.dtype == torch.float32
                assert torch.isfinite(losses).all(), (loss_type, m, losses)
                assert torch.isfinite(cr).all() and torch.isfinite(rjr).all()
                pc.grad = pr.grad = None
                losses.sum().backward()
                assert torch.isfinite(pc.grad).all(), (loss_type, m)
                if loss_type == "sft":  # plain SFT never looks at the rejected response
                    assert pr.grad is None
                else:
                    assert torch.isfinite(pr.grad).all(), (loss_type, m)

def test_huge_margin_values_sigmoid():
    # -log sig(z): ~0 for z = +1000, exactly ~1000 for z = -1000 (naive form gives inf or nan)
    pc, pr = torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0])
    losses, _, _ = dpo_loss(pc, pr, None, None, beta=0.1)
    assert losses[0].item() < 1e-30 and losses[1].item() == pytest.approx(1000.0, rel=1e-6)

def test_discopop_large_negative_margin_value():
    # at h = -50 the exp branch is switched off (sigmoid(h/tau) ~ 1e-435): loss ~ softplus(50) = 50
    pc, pr = torch.tensor([-60.0], dtype=torch.float64), torch.tensor([-10.0], dtype=torch.float64)
    losses, _, _ = dpo_loss(pc, pr, None, None, beta=1.0, loss_type="discopop")
    assert losses.item() == pytest.approx(50.0 + math.log1p(math.exp(-50.0)), rel=1e-12)


# =============================================================================
# dpo.py: layouts, reference, training loop

# trainer tests: layouts against a naive loop, reference modes, resume, ddp, overfitting, config and data errors





def write_shard(path, pairs, magic=20241127, version=1):
    """an independent writer of the shard format: 256 int32 header, (N, 3) int32 lengths, uint16 tokens"""
    lengths = np.array([[len(p), len(c), len(r)] for p, c, r in pairs], dtype=np.int32)
    tokens = np.concatenate([np.concatenate([p, c, r]) for p, c, r in pairs]).astype(np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[:4] = [magic, version, len(pairs), len(tokens)]
    with open(path, "wb") as f:
        f.write(header.tobytes() + lengths.tobytes() + tokens.tobytes())


def random_pairs(n, vocab, seed, max_prompt=12, max_resp=10):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(0, vocab, rng.integers(1, max_prompt + 1))
        c = np.r_[rng.integers(0, vocab, rng.integers(0, max_resp)), 50256]
        r = np.r_[rng.integers(0, vocab, rng.integers(0, max_resp)), 50256]
        out.append((p, c, r))
    return out


def make_data(tmp_path, n_train=24, n_val=8, vocab=300, seed=0):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    write_shard(d / "train_000000.bin", random_pairs(n_train, vocab, seed))
    write_shard(d / "val_000000.bin", random_pairs(n_val, vocab, seed + 1))
    return str(d)


def tiny_cfg(tmp_path, data_dir, **kw):
    base = dict(out_dir=str(tmp_path / "out"), data_dir=data_dir, n_layer=2, n_head=2, n_embd=32, block_size=64,
                global_batch_size=8, batch_size=4, max_iters=6, eval_interval=3, log_interval=100,
                learning_rate=1e-3, warmup_iters=2, device="cpu", compile="false")
    base.update(kw)
    return Config(**base)


def sample_cfg(tmp_path, data_dir, **kw):
    return sample_module.SampleConfig(**dataclasses.asdict(tiny_cfg(tmp_path, data_dir)) | kw)


def layout_len(data, layout, multiple=64):
    """row length: the longest sequence (plain) or pair (packed), rounded up"""
    L = data.lengths
    longest = (L[:, 0] + np.maximum(L[:, 1], L[:, 2])) if layout == "plain" else L.sum(1)
    return int(-(-longest.max() // multiple) * multiple)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))


def naive_logps(model, p, resp):
    """one sequence at a time, full logits, float64 log-softmax: the reference for response log-probs"""
    idx = torch.from_numpy(np.concatenate([p, resp]).astype(np.int64))[None]
    logp = F.log_softmax(model(idx)[0].double(), -1)
    return sum(logp[len(p) - 1 + t, int(resp[t])] for t in range(len(resp)))


# -----------------------------------------------------------------------------
# log-probs: plain and packed layouts against a naive loop, values and gradients


def layout_logps(model, data, ids, layout, pack_len, batch_size=3):
    """layout: plain | packed (fixed shapes) | packed-step (rows as long as the longest pair given)"""
    cfg = Config(layout=layout.split("-")[0], batch_size=batch_size, pack_len=pack_len)
    shape = dpo.make_shape(cfg, [data], fixed=not layout.endswith("step"), multiple=8)  # 8: step rows shorter than pack_len
    module = dpo.SequenceLogps(model, chunk=7)  # a small chunk exercises the chunked lm_head
    chosen, rejected = {}, {}
    for b in dpo.micro_batches(data, ids, shape):
        c, r, _ = dpo.batch_logps(module, b)
        for k, i in enumerate(b.pair_ids):
            chosen[int(i)], rejected[int(i)] = c[k], r[k]
    return chosen, rejected


@pytest.mark.parametrize("layout", ["plain", "packed", "packed-step"])
def test_response_logps_match_naive_loop(tmp_path, layout):
    data = PairData(make_data(tmp_path), "train", 64)
    model = tiny_model()
    ids = np.arange(len(data))
    pack_len = layout_len(data, layout.split("-")[0])
    chosen, rejected = layout_logps(model, data, ids, layout, pack_len)
    assert sorted(chosen) == list(range(len(data)))
    for i in ids:
        p, c, r = data[i]
        assert abs(chosen[i].item() - naive_logps(model, p, c).item()) < 1e-4
        assert abs(rejected[i].item() - naive_logps(model, p, r).item()) < 1e-4


def test_packing_puts_several_pairs_in_a_row(tmp_path):
    data = PairData(make_data(tmp_path), "train", 64)
    pack_len = layout_len(data, "packed")
    mbs = dpo.micro_batches(data, np.arange(len(data)), dpo.make_shape(Config(layout="packed", batch_size=8), [data], fixed=True))
    assert sum(len(b.pair_ids) for b in mbs) == len(data)
    assert max(len(b.pair_ids) for b in mbs) > mbs[0].idx.shape[0]  # more pairs than rows: rows are shared
    for b in mbs:  # fixed shapes, and the prompt is laid once per pair
        assert b.idx.shape[1] == pack_len
        assert b.n_tokens == sum(int(data.lengths[i].sum()) for i in b.pair_ids)


def test_plan_packed_places_every_pair_once_without_overlap():
    rng = np.random.default_rng(0)
    for trial in range(50):
        need = rng.integers(1, 100, size=rng.integers(1, 30))
        row_len = int(need.max()) + int(rng.integers(0, 50))
        row, offset = dpo.plan_packed(need, row_len)
        rows = [[(k, offset[k]) for k in np.flatnonzero(row == j)] for j in range(row.max() + 1)]
        assert all(rows)  # rows are numbered 0, 1, ... with none left empty
        for items in rows:  # pairs sit end to end from offset 0 and the row holds them
            spans = sorted((o, o + need[k]) for k, o in items)
            assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert spans[-1][1] <= row_len
        # no two rows could be merged: first fit leaves no row that fits into another's space
        used = sorted(sum(need[k] for k, _ in items) for items in rows)
        assert len(used) < 2 or used[0] + used[1] > row_len
        # first fit decreasing, by a naive loop: each pair (longest first) into the first row with room
        free = []
        for k in sorted(range(len(need)), key=lambda k: -need[k]):
            j = next((j for j, f in enumerate(free) if f >= need[k]), len(free))
            free += [row_len] * (j == len(free))
            assert (row[k], offset[k]) == (j, row_len - free[j])
            free[j] -= need[k]


def test_step_shape_fits_the_longest_pair_and_the_token_budget(tmp_path):
    data = PairData(make_data(tmp_path, n_train=40), "train", 64)
    pack_len = layout_len(data, "packed")
    rng = np.random.default_rng(1)
    cfg = Config(batch_size=6, pack_rows=3)
    for _ in range(10):
        ids = rng.choice(len(data), size=12, replace=False)
        static = dpo.micro_batches(data, ids, dpo.make_shape(cfg, [data], fixed=True))
        step = dpo.micro_batches(data, ids, dataclasses.replace(dpo.make_shape(cfg, [data], fixed=False), multiple=8))
        longest = int(data.lengths[ids].sum(1).max())
        for b in step:
            assert b.idx.shape[1] == min(pack_len, -(-longest // 8) * 8) < pack_len
            assert b.idx.numel() <= 3 * pack_len
        assert all(b.idx.shape == (3, pack_len) for b in static)
        for mbs in (static, step):
            assert sorted(int(i) for b in mbs for i in b.pair_ids) == sorted(ids.tolist())


def packed_vs_plain(model, data, ids):
    """per-pair log-probs, losses and gradients of the plain layout and both packed shapes"""
    out = {}
    for layout in ("plain", "packed", "packed-step"):
        model.zero_grad()
        c, r = layout_logps(model, data, ids, layout, layout_len(data, layout.split("-")[0]), batch_size=4)
        pc = torch.stack([c[int(i)] for i in ids])
        pr = torch.stack([r[int(i)] for i in ids])
        losses, _, _ = dpo_loss(pc, pr, pc.detach() * 0.9, pr.detach() * 1.1, beta=0.1)
        losses.sum().backward()
        out[layout] = (pc.detach(), pr.detach(), losses.detach(), [p.grad.clone() for p in model.parameters()])
    return out


def assert_same_layouts(out):
    a = out["plain"]
    for b in (out["packed"], out["packed-step"]):
        for x, y in zip(a[:3], b[:3]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        for ga, gb in zip(a[3], b[3]):
            torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


def test_packed_equals_plain_random_pairs(tmp_path):
    data = PairData(make_data(tmp_path, n_train=16), "train", 64)
    assert_same_layouts(packed_vs_plain(tiny_model(1), data, np.arange(16)))


HH = str(HH_FILE)


@pytest.mark.skipif(not os.path.exists(HH), reason=HH_MISSING)
def test_packed_equals_plain_real_hh_pairs(tmp_path):
    import gzip
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    pairs = []
    with gzip.open(HH, "rt") as f:
        for line in f:
            row = json.loads(line)
            cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            prompt = row["chosen"][:cut]
            if not row["rejected"].startswith(prompt):
                continue
            p = enc.encode_ordinary(prompt)[-48:]
            c = enc.encode_ordinary(row["chosen"][cut:])[:40] + [50256]
            r = enc.encode_ordinary(row["rejected"][cut:])[:40] + [50256]
            pairs.append((np.array(p), np.array(c), np.array(r)))
            if len(pairs) == 12:
                break
    d = tmp_path / "hh"
    d.mkdir()
    write_shard(d / "train_000000.bin", pairs)
    data = PairData(str(d), "train", 128)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    assert_same_layouts(packed_vs_plain(model, data, np.arange(len(pairs))))


def test_attention_mask_blocks_chosen_from_rejected(tmp_path):
    # rejected tokens must not see chosen tokens: changing chosen leaves rejected's log-prob unchanged
    p, c, r = np.array([5, 6, 7]), np.array([8, 9, 50256]), np.array([10, 50256])
    d = tmp_path / "d"
    d.mkdir()
    write_shard(d / "train_000000.bin", [(p, c, r), (p, np.array([11, 12, 13, 50256]), r)])
    data = PairData(str(d), "train", 64)
    model = tiny_model()
    _, rej = layout_logps(model, data, np.arange(2), "packed", 64)
    assert abs(rej[0].item() - rej[1].item()) < 1e-6
    assert abs(rej[0].item() - naive_logps(model, p, r).item()) < 1e-4


# -----------------------------------------------------------------------------
# training


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_frozen_and_cached_reference_give_the_same_losses(tmp_path):
    data_dir = make_data(tmp_path)
    h_cached = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "a"), reference="cached"))
    assert any(n.startswith("ref_logps_train_") for n in os.listdir(data_dir))  # stored beside the shards
    h_model = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "b"), reference="model"))
    for a, b in zip(h_cached, h_model):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a["margin"] - b["margin"]) < 1e-5
    assert h_cached[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0


def test_resume_is_bit_exact(tmp_path):
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, dropout=0.1)
    full = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "full"), **kw))
    half = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "half"), **{**kw, "max_iters": 4}))
    rest = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "half"), init_from="resume", **kw))
    assert [h["loss"] for h in full] == [h["loss"] for h in half + rest]
    assert [h["iter"] for h in rest] == [4, 5, 6, 7]


def test_overfit_a_handful_of_pairs(tmp_path):
    data_dir = make_data(tmp_path, n_train=8, n_val=4)
    hist = train(tiny_cfg(tmp_path, data_dir, max_iters=60, learning_rate=3e-3, beta=0.5, eval_interval=0))
    assert hist[-1]["accuracy"] == 1.0
    assert hist[-1]["loss"] < 0.2 < math.log(2)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=3, eval_interval=1)
    train(cfg)
    ck = os.path.join(cfg.out_dir, "ckpt.pt")
    before = open(ck, "rb").read()
    # an absurd learning rate blows the weights up after the first resumed step
    with pytest.raises(FloatingPointError, match=r"step [45]: the (loss|gradient norm) is (nan|inf).*ckpt.pt"):
        train(tiny_cfg(tmp_path, data_dir, init_from="resume", max_iters=8, eval_interval=100, warmup_iters=0,
                       learning_rate=1e30, min_lr=1e30, grad_clip=0.0))
    assert open(ck, "rb").read() == before


def run_dpo(tmp_path, name, args, nproc=0):
    """dpo.py as users run it: plain python (nproc=0) or torchrun with nproc ranks; returns its metrics and weights"""
    launch = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    out = subprocess.run([*launch, "dpo.py", f"--out_dir={tmp_path}/{name}", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    ck = torch.load(f"{tmp_path}/{name}/ckpt.pt", weights_only=True)
    return read_metrics(f"{tmp_path}/{name}"), ck["model"]


def assert_same_runs(a, b, tol=1e-5):
    (ma, wa), (mb, wb) = a, b
    assert [r["iter"] for r in ma] == [r["iter"] for r in mb] and len(ma) >= 4
    for x, y in zip(ma, mb):
        for k in x:
            if k.startswith("val/") or k in ("loss", "accuracy", "margin", "chosen_reward", "grad_norm"):
                assert abs(x[k] - y[k]) < tol, (k, x, y)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=0, msg=k)


def torchrun_args(data_dir, layout, **kw):
    base = dict(data_dir=data_dir, n_layer=2, n_head=2, n_embd=32, block_size=64, global_batch_size=8, batch_size=2,
                max_iters=4, eval_interval=2, device="cpu", compile="false", learning_rate=1e-3, layout=layout,
                reference="model") | kw
    return [f"--{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_torchrun_ddp_and_fsdp_equal_one_process(tmp_path, layout):
    # the same losses, grad norms and final weights from 1 process, 2 DDP ranks and 2 FSDP ranks (gloo, float32)
    data_dir = make_data(tmp_path)
    args = torchrun_args(data_dir, layout)
    one = run_dpo(tmp_path, "one", args)
    assert_same_runs(one, run_dpo(tmp_path, "ddp", args, nproc=2))
    assert_same_runs(one, run_dpo(tmp_path, "fsdp", args + ["--fsdp=true"], nproc=2))


def test_fsdp_checkpoint_resumes_with_another_world_size(tmp_path):
    # an FSDP checkpoint is one full ckpt.pt: 2 sharded ranks stop at step 2, 1 rank (FSDP, then plain) continues,
    # and the result equals a run that never stopped (metrics.jsonl holds both parts)
    data_dir = make_data(tmp_path)
    args = torchrun_args(data_dir, "packed", reference="cached", lr_decay_iters=4)
    full = run_dpo(tmp_path, "full", args)
    run_dpo(tmp_path, "half", args + ["--max_iters=2", "--fsdp=true"], nproc=2)
    for name in ("fsdp1", "plain"):
        shutil.copytree(f"{tmp_path}/half", f"{tmp_path}/{name}")
    assert_same_runs(full, run_dpo(tmp_path, "fsdp1", args + ["--init_from=resume", "--fsdp=true"], nproc=1))
    assert_same_runs(full, run_dpo(tmp_path, "plain", args + ["--init_from=resume"]))


# -----------------------------------------------------------------------------
# config and data errors


def test_config_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*did you mean learning_rate.*valid keys: out_dir"):
        parse_config(["--learning_rat=1"])


def test_config_wrong_type_and_file(tmp_path):
    with pytest.raises(ValueError, match=r"--max_iters=ten: expected int"):
        parse_config(["--max_iters=ten"])
    with pytest.raises(ValueError, match=r"expected a bool"):
        parse_config(["--truncate=maybe"])
    f = tmp_path / "c.py"
    f.write_text("beta = 0.2\nmax_iters = 'many'\n")
    with pytest.raises(ValueError, match=r"c.py:2: max_iters expects int, got str"):
        parse_config([f"--config={f}"])
    f.write_text("beta = 0.2\nimport os\n")
    with pytest.raises(ValueError, match=r"c.py:2: expected `key = value`"):
        parse_config([f"--config={f}"])
    f.write_text("beta = 1\nmax_iters = 7\n")
    cfg = parse_config([f"--config={f}", "--max_iters=9"])  # the command line wins over the file
    assert (cfg.beta, cfg.max_iters) == (1.0, 9) and isinstance(cfg.beta, float)


def test_missing_and_corrupt_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        PairData(str(tmp_path / "nothing"), "train", 64)
    data_dir = make_data(tmp_path)
    path = os.path.join(data_dir, "train_000000.bin")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-3])
    with pytest.raises(ValueError, match="train_000000.bin"):
        PairData(data_dir, "train", 64)
    write_shard(path, random_pairs(3, 100, 0), magic=123)
    with pytest.raises(ValueError, match="magic"):
        PairData(data_dir, "train", 64)


def test_block_size_smaller_than_data(tmp_path):
    data_dir = make_data(tmp_path)
    with pytest.raises(ValueError, match=r"longer than block_size=16.*--truncate=true"):
        PairData(data_dir, "train", 16)
    data = PairData(data_dir, "train", 16, truncate=True)
    uncut = PairData(data_dir, "train", 10_000)
    assert data.n_cut > 0 and uncut.n_cut == 0
    for i in range(len(data)):
        p, c, r = data[i]
        full = uncut[i]
        assert len(p) + max(len(c), len(r)) <= 16 and len(c) > 0 and len(r) > 0
        assert list(p) == list(full[0][len(full[0]) - len(p):])  # the prompt kept its end
        assert list(c) == list(full[1][: len(c)])  # responses kept their start


def test_trained_model_exports_to_transformers(tmp_path):
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=2, export_hf=True)
    train(cfg)
    ours = checkpoint.load_model(cfg.out_dir, cfg).eval()  # from ckpt.pt
    hf = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(cfg.out_dir, "hf")).eval()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() < 1e-4


def test_flex_block_mask_equals_bool_mask_forward(tmp_path):
    # the CUDA path's FlexAttention mask must allow exactly what the CPU bool mask allows (forward only on CPU)
    data = PairData(make_data(tmp_path, n_train=12), "train", 64)
    model = tiny_model(3).eval()
    b = dpo.micro_batches(data, np.arange(12), dpo.make_shape(Config(layout="packed", batch_size=12), [data], True, 128))[0]
    cpu = torch.device("cpu")
    with torch.no_grad():
        h_bool = model.hidden(b.idx, pos=b.pos, attn_mask=dpo.attention_mask(b.doc, b.branch))
        h_flex = model.hidden(b.idx, pos=b.pos, attn_mask=dpo.flex_block_mask(b.doc, b.branch))
    real = (b.doc >= 0)[..., None]  # padding rows differ by design (zeros vs. attending to themselves)
    torch.testing.assert_close(h_flex * real, h_bool * real, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flex", [False, True])
def test_compiled_forward_is_one_graph_for_every_batch_of_a_shape(tmp_path, flex):
    # the trainer's compiled region: mask (a BlockMask built from the ids, or the bool mask), transformer, response
    # positions, chunked log-probs and sums. new pairs, same fixed shape: one graph, equal to the eager bool-mask
    # forward. flex runs forward-only on CPU, which is enough
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    data = PairData(make_data(tmp_path, n_train=24), "train", 64)
    model = tiny_model(4).eval()
    compiled = dpo.SequenceLogps(model, compile=True, chunk=16, flex=flex)
    shape = dpo.make_shape(Config(layout="packed", batch_size=4, pack_rows=1), [data], fixed=True, multiple=128)
    mbs = [b for i in range(0, 24, 8) for b in dpo.micro_batches(data, np.arange(i, i + 8), shape)]
    assert len(mbs) >= 4 and len({len(b.pair_ids) for b in mbs}) > 1  # different pairs and pair counts, one shape
    for b in mbs:
        with torch.no_grad():
            got = dpo.batch_logps(compiled, b)
            ref = dpo.batch_logps(dpo.SequenceLogps(model), b)  # eager, SDPA with the bool mask
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-5)
        for k, i in enumerate(b.pair_ids[:2]):  # and against the naive float64 loop
            p, c, r = data[i]
            assert abs(got[0][k].item() - naive_logps(model, p, c).item()) < 1e-3
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_compiled_training_matches_eager_with_fixed_shapes(tmp_path):
    # compile=true with the static packed shape: the same losses as eager, and the compiled hidden() is traced once
    # for training and once for evaluation (no_grad), not once per micro-batch
    from torch._dynamo.utils import counters
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=4, eval_interval=2, pack_rows=2)  # compiled: the fixed packed shape
    eager = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "eager"), **kw))
    torch._dynamo.reset()
    counters.clear()
    compiled = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "compiled"), compile="true", **kw))
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
    assert 1 <= counters["stats"]["unique_graphs"] <= 2


def test_bf16_autocast_training_tracks_float32(tmp_path):
    # the GPU default is bf16 autocast; on CPU the same code path runs with CPU autocast. log-probs and the loss stay
    # float32, so the losses follow the float32 run closely
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=4, eval_interval=0)
    f32 = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "f32"), dtype="float32", **kw))
    bf16 = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "bf16"), dtype="bfloat16", **kw))
    for a, b in zip(f32, bf16):
        assert math.isfinite(b["loss"]) and abs(a["loss"] - b["loss"]) < 2e-2
        assert abs(a["chosen_logp"] - b["chosen_logp"]) < 0.02 * abs(a["chosen_logp"])


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention kernels, bf16 autocast)")


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_flex_block_mask_equals_sdpa_bool_mask_values_and_grads(tmp_path, dtype):
    # the trainer's two masks for the packed layout: FlexAttention on CUDA, SDPA with a bool mask elsewhere
    data = PairData(make_data(tmp_path, n_train=16), "train", 64)
    b = dpo.micro_batches(data, np.arange(16), dpo.make_shape(Config(batch_size=16), [data], fixed=True, multiple=128))[0]
    model = tiny_model(5).cuda()
    out = []
    for flex in (False, True):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            c, r, _ = dpo.batch_logps(dpo.SequenceLogps(model, flex=flex), dpo.on_device(b, torch.device("cuda")))
        (c.sum() - 0.5 * r.sum()).backward()
        out.append((c.detach(), r.detach(), [p.grad.float().clone() for p in model.parameters()]))
    (c0, r0, g0), (c1, r1, g1) = out
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(c1, c0, atol=tol * c0.abs().max().item(), rtol=0)
    torch.testing.assert_close(r1, r0, atol=tol * r0.abs().max().item(), rtol=0)
    for a, b_ in zip(g0, g1):
        assert (a - b_).norm() <= 10 * tol * a.norm() + 1e-6


@CUDA
def test_cuda_compiled_packed_training_equals_eager_without_retracing(tmp_path):
    # new data every step, one fixed packed shape: the compiled run equals eager, and the steps after the second
    # (new pairs, same shape) trace no new graph (counted against a 2-step run: flex and create_block_mask compile too)
    from torch._dynamo.utils import counters
    data_dir = make_data(tmp_path)
    kw = dict(device="cuda", dtype="float32", eval_interval=0, pack_rows=2)

    def run(mode, steps):
        torch._dynamo.reset()
        counters.clear()
        hist = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / f"{mode}{steps}"), compile=mode, max_iters=steps, **kw))
        return hist, counters["stats"]["unique_graphs"]
    (eager, _), (compiled, graphs), (_, graphs_2) = run("false", 5), run("true", 5), run("true", 2)
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
    assert graphs == graphs_2 >= 1


@CUDA
def test_cuda_bf16_autocast_training_tracks_float32(tmp_path):
    data_dir = make_data(tmp_path)
    kw = dict(device="cuda", max_iters=4, eval_interval=0)
    f32 = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "f32"), dtype="float32", **kw))
    bf16 = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "bf16"), dtype="bfloat16", **kw))
    for a, b in zip(f32, bf16):
        assert math.isfinite(b["loss"]) and abs(a["loss"] - b["loss"]) < 2e-2
        assert abs(a["chosen_logp"] - b["chosen_logp"]) < 0.02 * abs(a["chosen_logp"])


def test_gpu_check_dry_runs_on_cpu(tmp_path):
    # .ci/gpu is the one command a GPU session runs; --cpu runs every stage with a tiny model, so the script itself
    # is known to work before any GPU does
    out, rows = gpu_check(tmp_path, "--cpu")
    assert [r["stage"] for r in rows] == ["CUDA tests", "bench plain", "bench packed", "torchrun ddp", "torchrun fsdp", "XL memory"]
    assert all(r["status"] == "ok" and r["pairs_per_s"] > 0 for r in rows[1:])
    assert "GPU check on CPU (dry run)" in out.stdout and "Name" in open(tmp_path / "out" / "profile.txt").read()


def test_missing_data_is_reported_before_the_weights_load(tmp_path, monkeypatch):
    # a user without data should not wait for a GPT-2 download first
    monkeypatch.setattr(checkpoint, "load_model", lambda *a: pytest.fail("weights loaded before the data was checked"))
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        train(tiny_cfg(tmp_path, str(tmp_path / "nothing"), init_from="gpt2"))


def test_demo_runs_from_any_folder(tmp_path, monkeypatch):
    # the demo's recipe files live beside dpo.py; its data and checkpoints go under the current folder
    import prepare as prep
    seen = []
    monkeypatch.setattr(prep, "main", lambda argv: seen.append(("prepare", argv)))
    monkeypatch.setattr(dpo, "train", lambda cfg: seen.append(("train", cfg)))
    monkeypatch.setattr(sample_module, "compare", lambda cfg, device: seen.append(("compare", cfg)))
    monkeypatch.chdir(tmp_path)
    sample_module.demo()
    assert [k for k, _ in seen] == ["prepare", "train", "train", "compare"]
    sft, dpo_cfg, cmp = (c for k, c in seen[1:])
    assert sft.loss_type == "sft" and sft.out_dir == "out/toy_sft"
    assert dpo_cfg.loss_type == "sigmoid" and dpo_cfg.init_from == "out/toy_sft"
    assert cmp.init_from == "out/toy_dpo" and cmp.data_dir == "data/toy"


def test_sample_policy_and_reference_side_by_side(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=2)
    train(cfg)
    ck = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    assert ck["ref_from"] == "scratch" and ck["config"]["max_iters"] == 2  # the config travels with the checkpoint
    sample_module.sample(sample_cfg(tmp_path, data_dir, init_from=cfg.out_dir, prompts="a|b\\nc", max_new_tokens=3,
                                    temperature=0.0), torch.device("cpu"))
    out = capsys.readouterr().out
    assert out.count("--- policy:") == 2 and out.count("--- reference (scratch):") == 2
    assert "=== 'b\\nc'" in out  # "\n" in --prompts is a newline


def test_toy_pipeline_sft_then_dpo_then_compare(tmp_path, capsys):
    # the demo's stages end to end on a tiny scale: the table is produced and its numbers are sane
    data_dir = str(tmp_path / "toy")
    P.prepare(P.parse_args(["--dataset=toy", "--toy_pairs=300", f"--out_dir={data_dir}", "--num_workers=1"]), log=None)
    model_kw = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, eval_interval=0, global_batch_size=16, batch_size=16)
    sft = tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "sft"), loss_type="sft", max_iters=4, **model_kw)
    hist = train(sft)
    assert hist[-1]["rejected_logp"] == 0.0  # sft never runs the rejected responses
    dpo_cfg = tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "dpo"), init_from=sft.out_dir, max_iters=3, **model_kw)
    hist = train(dpo_cfg)
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the SFT model is the reference
    res = sample_module.compare(sample_cfg(tmp_path, data_dir, init_from=dpo_cfg.out_dir, num_samples=2, max_new_tokens=8),
                                torch.device("cpu"))
    out = capsys.readouterr().out
    assert "reward, greedy" in out
    assert json.loads(out.strip().splitlines()[-1])["init_from"] == dpo_cfg.out_dir  # one JSON line for scripts
    for side in ("reference", "policy"):
        assert -1.0 <= res[side]["greedy"] <= 1.0 and -1.0 <= res[side]["sampled"] <= 1.0
        assert 0.0 <= res[side]["acc"] <= 1.0
    assert math.isfinite(res["kl"])


def test_prepare_replaces_its_output_with_dpo_reference_caches(tmp_path):
    # dpo.py stores reference log-probs beside the shards; re-preparing replaces them with the data, anything else
    # in the folder makes prepare refuse
    out = tmp_path / "toy"
    args = ["--dataset=toy", "--toy_pairs=50", f"--out_dir={out}", "--num_workers=1"]
    P.prepare(P.parse_args(args), log=None)
    (out / "ref_logps_train_0123abcd_4567ef89.pt").write_bytes(b"stale")
    P.prepare(P.parse_args(args), log=None)
    assert not (out / "ref_logps_train_0123abcd_4567ef89.pt").exists() and (out / "train_000000.bin").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(P.PrepareError, match="did not write"):
        P.prepare(P.parse_args(args), log=None)


# =============================================================================
# issue 11: faults and mistakes
# every failure is one `error:` line naming the file or option, with nothing half-written left behind; nothing is
# silently wrong and no step is lost. where the message is the point the CLI runs as users run it, or its main()
# in-process (the same code prints the same line) where a process per case would be too slow

import errno  # noqa: E402
import signal  # noqa: E402


def cli(script, *args, env=None, timeout=120):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_one_error(rc, err, *patterns):
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for p in patterns:
        assert re.search(p, lines[0]), (p, lines[0])


def main_error(capsys, argv, *patterns):
    """dpo.py's main() in-process: exit status 1 and one `error:` line on stderr"""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dpo.main(argv)
    assert_one_error(e.value.code, capsys.readouterr().err, *patterns)


def tiny_args(tmp_path, data_dir, **kw):
    """tiny_cfg as command-line options (those that differ from the defaults)"""
    cfg = dataclasses.asdict(tiny_cfg(tmp_path, data_dir, **kw))
    return [f"--{k}={v}" for k, v in cfg.items() if v != getattr(Config, k)]


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("bad, pattern", [
    ("--global_batch_size=0", r"--global_batch_size=0: must be > 0"),
    ("--batch_size=0", r"--batch_size=0: must be > 0"),
    ("--beta=0", r"--beta=0.0: must be > 0"),
    ("--max_iters=-1", r"--max_iters=-1: must be >= 0"),
    ("--log_interval=0", r"--log_interval=0: must be > 0"),
    ("--device=gpu", r"--device=gpu: expected auto, cpu, cuda, cuda:N or mps"),
    ("--device=bogus", r"--device=bogus: expected auto, cpu, cuda, cuda:N or mps"),
    ("--n_head=3", r"--n_head=3 must divide --n_embd=32"),
    ("--dtype=fp16", r"--dtype=fp16: expected one of auto \| float32 \| bfloat16"),
    ("--compile=maybe", r"--compile=maybe: expected one of auto \| true \| false"),
    ("--layout=pack", r"--layout=pack: expected one of packed \| plain"),
    ("--reference=frozen", r"--reference=frozen: expected one of cached \| model"),
    ("--loss_type=dpo", r"--loss_type=dpo: expected one of sigmoid \| ipo"),
    ("--label_smoothing=0.5", r"--label_smoothing=0.5: must be in \[0, 0.5\)"),
    ("config syntax error", r"bad\.py:2: syntax error .*expected `key = value` lines"),
])
def test_bad_option_values_are_one_line_before_any_work(tmp_path, capsys, bad, pattern):
    data_dir = make_data(tmp_path)
    if bad == "config syntax error":
        (tmp_path / "bad.py").write_text("beta = 0.2\nmax_iters = = 3\n")
        bad = f"--config={tmp_path / 'bad.py'}"
    main_error(capsys, tiny_args(tmp_path, data_dir) + [bad], pattern)
    assert not (tmp_path / "out").exists() and sorted(os.listdir(data_dir)) == ["train_000000.bin", "val_000000.bin"]


def test_help_the_old_mode_option_and_no_cuda_from_the_command_line(tmp_path):
    r = cli("dpo.py", "--help")
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert re.search(r"^  --beta=0\.1 +strength of the KL leash", r.stdout, re.M) and "  --device=auto" in r.stdout
    r = cli("dpo.py", "--mode=compare", "--init_from=out/toy_dpo")  # the CLI before sample.py
    assert_one_error(r.returncode, r.stderr, r"unknown config key 'mode' .*python sample\.py --mode=sample\|compare\|demo")
    if not torch.cuda.is_available():
        r = cli("dpo.py", "--device=cuda", f"--out_dir={tmp_path / 'out'}")
        assert_one_error(r.returncode, r.stderr, r"--device=cuda, but this torch sees no CUDA GPU \(try --device=cpu\)")
        assert not (tmp_path / "out").exists()


def test_resume_rebuilds_a_scratch_reference_from_the_checkpoint_not_the_command_line(tmp_path):
    # the resumed run's command line names another model size: its policy and its reference still come from the
    # checkpoint, so it continues exactly as a run that never stopped (it used to build a different random reference)
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=4, lr_decay_iters=4, eval_interval=2, reference="model")
    full = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "full"), **kw))
    half = tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "half"), **{**kw, "max_iters": 2})
    train(half)
    ck = torch.load(os.path.join(half.out_dir, "ckpt.pt"), weights_only=True)
    other = dict(n_layer=3, n_head=4, n_embd=48, block_size=32)
    rest = train(tiny_cfg(tmp_path, data_dir, out_dir=half.out_dir, init_from="resume", **{**kw, "max_iters": 3}, **other))
    rest += train(tiny_cfg(tmp_path, data_dir, out_dir=half.out_dir, init_from="resume", **kw, n_layer=1))  # twice
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[2:]]
    # sample.py's "reference (scratch)" is that model too, whatever seed and size its command line says
    cfg = sample_cfg(tmp_path, data_dir, init_from=half.out_dir, seed=7, **other)
    _, reference, ref_from = sample_module.load_pair_of_models(cfg, torch.device("cpu"))
    assert ref_from == "scratch" and checkpoint.weights_hash(reference) == ck["ref_hash"]


def test_a_replaced_reference_is_refused_and_a_moved_run_finds_its_own(tmp_path, monkeypatch, capsys):
    data_dir = make_data(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path / "runs")
    kw = dict(max_iters=2, eval_interval=0)
    train(tiny_cfg(tmp_path, data_dir, out_dir="sft", loss_type="sft", **kw))
    train(tiny_cfg(tmp_path, data_dir, out_dir="dpo", init_from="sft", **kw))  # relative paths, as users type them
    assert torch.load("dpo/ckpt.pt", weights_only=True)["ref_from"] == str(tmp_path / "runs" / "sft")
    # resumed from another folder, then after runs/ moved as a whole: the reference is found
    monkeypatch.chdir(tmp_path)
    train(tiny_cfg(tmp_path, data_dir, out_dir="runs/dpo", init_from="resume", **{**kw, "max_iters": 3}))
    shutil.move("runs", "moved")
    train(tiny_cfg(tmp_path, data_dir, out_dir="moved/dpo", init_from="resume", **{**kw, "max_iters": 4}))
    assert [r["iter"] for r in read_metrics("moved/dpo")] == [0, 1, 2, 3]
    # the reference retrained in place: resuming against other weights is refused, the checkpoint untouched
    train(tiny_cfg(tmp_path, data_dir, out_dir="moved/sft", loss_type="sft", seed=5, **kw))
    before = open("moved/dpo/ckpt.pt", "rb").read()
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir="moved/dpo", init_from="resume", max_iters=5),
               r"its reference .*sft changed since this run started .*restore it, or start a new run")
    assert open("moved/dpo/ckpt.pt", "rb").read() == before
    with pytest.raises(ValueError, match=r"moved/dpo/ckpt\.pt: its reference .*sft changed since this run started"):
        sample_module.load_pair_of_models(sample_cfg(tmp_path, data_dir, init_from="moved/dpo"), torch.device("cpu"))
    # a run never overwrites the checkpoint its own reference comes from
    before = open("moved/sft/ckpt.pt", "rb").read()
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir="moved/sft", init_from="moved/sft"),
               r"init_from=moved/sft is out_dir's own checkpoint.*choose another --out_dir")
    assert open("moved/sft/ckpt.pt", "rb").read() == before


def test_weights_that_are_not_finite_are_never_saved(tmp_path, capsys):
    # a checkpoint every step; an absurd learning rate makes the weights inf in a step whose loss and gradients
    # were finite: the next save refuses, and the last good checkpoint stays the last good one
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=2, eval_interval=1)
    train(cfg)
    ck = os.path.join(cfg.out_dir, "ckpt.pt")
    before = open(ck, "rb").read()
    main_error(capsys, tiny_args(tmp_path, data_dir, init_from="resume", max_iters=6, eval_interval=1, warmup_iters=0,
                                 learning_rate=1e39, min_lr=1e39),
               r"step 3: the weights are not finite; not saved \(the last good checkpoint is .*ckpt\.pt\)")
    assert open(ck, "rb").read() == before
    assert all(v.isfinite().all() for v in torch.load(ck, weights_only=True)["model"].values())


def test_unreadable_or_mismatched_checkpoints_are_one_line(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "good"), max_iters=1, eval_interval=0)
    train(cfg)
    good = open(os.path.join(cfg.out_dir, "ckpt.pt"), "rb").read()
    ck = torch.load(io.BytesIO(good), weights_only=True)
    cases = {"empty": (b"", "not a readable checkpoint"),
             "truncated": (good[: len(good) // 2], "not a readable checkpoint"),
             "text": (b"model = 1\n", "not a readable checkpoint"),
             "foreign": (torch_bytes({"weights": torch.zeros(3)}), "not a dpo.py checkpoint"),
             "config": (torch_bytes({**ck, "model_config": {**ck["model_config"], "n_embd": 64}}),
                        "its weights do not match its model config"),
             "weights": (torch_bytes({**ck, "model": {k: v for k, v in ck["model"].items() if ".h.1." not in k}}),
                         "its weights do not match its model config")}
    for name, (raw, reason) in cases.items():
        run = tmp_path / name
        run.mkdir()
        (run / "ckpt.pt").write_bytes(raw)
        where = re.escape(str(run / "ckpt.pt")) + ": " + reason
        main_error(capsys, [f"--out_dir={run}", "--init_from=resume"], where)  # the rest from the checkpoint
        main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(tmp_path / "new"), init_from=str(run)), where)
        assert (run / "ckpt.pt").read_bytes() == raw and not (tmp_path / "new" / "ckpt.pt").exists()
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(tmp_path / "none"), init_from="resume"),
               r"init_from=resume: no checkpoint at .*none/ckpt\.pt")


def test_a_corrupt_reference_cache_is_computed_again(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    first = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "a"), max_iters=2, eval_interval=0))
    [cache] = Path(data_dir).glob("ref_logps_train_*.pt")
    good = torch.load(cache, weights_only=True)
    for bad in (cache.read_bytes()[:60], b"", torch_bytes({"chosen": torch.zeros(3), "rejected": torch.zeros(3)})):
        cache.write_bytes(bad)
        capsys.readouterr()
        again = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "b"), max_iters=2, eval_interval=0))
        out = capsys.readouterr().out
        assert re.search(re.escape(str(cache)) + r": unreadable reference cache \(.*\); computing it again", out), out
        assert [h["loss"] for h in again] == [h["loss"] for h in first]
        torch.testing.assert_close(torch.load(cache, weights_only=True), good)  # written again


def test_token_ids_beyond_the_vocabulary_and_an_empty_train_split_are_one_line(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    shard = Path(data_dir) / "train_000000.bin"
    pairs = random_pairs(6, 300, 0)
    pairs[3] = (pairs[3][0], np.r_[pairs[3][1][:-1], 60000, 50256], pairs[3][2])
    write_shard(shard, pairs)
    main_error(capsys, tiny_args(tmp_path, data_dir),
               re.escape(str(shard)) + r": token id 60000 >= the model's vocabulary \(50257\)")
    header = np.zeros(256, dtype=np.int32)
    header[:4] = 20241127, 1, 0, 0  # a valid shard of no pairs
    shard.write_bytes(header.tobytes())
    main_error(capsys, tiny_args(tmp_path, data_dir), re.escape(data_dir) + r": the train split has no pairs")
    assert not [f for f in os.listdir(data_dir) if f.startswith("ref_logps")]
    assert not (tmp_path / "out" / "ckpt.pt").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_disk_full_or_read_only_while_saving_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    # tests run as root, where permissions stop nothing: the faults are raised where the files are written
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=2, eval_interval=0)
    train(cfg)
    ck = Path(cfg.out_dir) / "ckpt.pt"
    before, names = ck.read_bytes(), sorted(os.listdir(cfg.out_dir))

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"part of it")  # some bytes reached the disk first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src), str(dst))

    faults = [(torch, "save", full_disk, os.strerror(errno.ENOSPC)), (os, "replace", read_only, os.strerror(errno.EROFS))]
    for module, name, fake, reason in faults:
        with monkeypatch.context() as m:
            m.setattr(module, name, fake)
            main_error(capsys, tiny_args(tmp_path, data_dir, init_from="resume", max_iters=4, eval_interval=0),
                       f"could not write the checkpoint {re.escape(str(ck))} \\({reason}\\); the previous file is intact")
        assert ck.read_bytes() == before and sorted(os.listdir(cfg.out_dir)) == names, name
    for f in Path(data_dir).glob("ref_logps_*"):
        f.unlink()
    for module, name, fake, reason in faults:  # the reference cache of a fresh run: no temp file beside the shards
        with monkeypatch.context() as m:
            m.setattr(module, name, fake)
            main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(tmp_path / "fresh")),
                       rf"could not write the reference cache .*ref_logps_train_\w+\.pt \({reason}\)")
        assert sorted(os.listdir(data_dir)) == ["train_000000.bin", "val_000000.bin"], name


def test_sigterm_stops_after_the_step_saves_and_resume_loses_no_step(tmp_path):
    # a cluster preempts with SIGTERM: the step ends, a checkpoint is saved, exit 130; the resumed run continues
    # from the next step and ends where a run that never stopped ends
    data_dir = make_data(tmp_path)
    kw = dict(eval_interval=0, log_interval=1, warmup_iters=0, min_lr=1e-3)  # constant lr: any max_iters, same steps
    out_dir = str(tmp_path / "out")
    p = subprocess.Popen([sys.executable, "dpo.py", *tiny_args(tmp_path, data_dir, max_iters=100000, **kw)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in p.stdout:
            if line.startswith("iter 2:"):
                break
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    stopped = int(re.search(r"^stopped after step (\d+): saved .*ckpt\.pt; continue with: python dpo.py --init_from=resume --out_dir=.*out$", out, re.M)[1])
    assert torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["iter_num"] == stopped + 1
    assert [r["iter"] for r in read_metrics(out_dir)] == list(range(stopped + 1))
    r = cli("dpo.py", *tiny_args(tmp_path, data_dir, init_from="resume", max_iters=stopped + 3, **kw))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = read_metrics(out_dir)
    assert [r["iter"] for r in resumed] == list(range(stopped + 3))
    full = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "full"), max_iters=stopped + 3, **kw))
    for a, b in zip(resumed, full, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)


def test_a_second_trainer_on_the_same_out_dir_is_refused_and_a_second_signal_quits_at_once(tmp_path):
    data_dir = make_data(tmp_path)
    args = tiny_args(tmp_path, data_dir, max_iters=100000, eval_interval=0, log_interval=100000, global_batch_size=24)
    p = subprocess.Popen([sys.executable, "dpo.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in p.stdout:
            if line.startswith("iter 0:"):
                break
        r = cli("dpo.py", *args)
        assert_one_error(r.returncode, r.stderr, r"out_dir=.*out is in use by another running trainer")
        assert p.poll() is None
        p.send_signal(signal.SIGINT)  # Ctrl-C, and another signal before the step ends: quit now, save nothing
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err and "stopped after" not in out, err[-3000:]
    assert not (tmp_path / "out" / "ckpt.pt").exists()
    iters = [r["iter"] for r in read_metrics(tmp_path / "out")]  # the refused trainer never touched the log
    assert iters and iters == list(range(len(iters)))


def test_a_fresh_run_into_a_used_out_dir_says_so_and_starts_a_fresh_log(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=2, eval_interval=0)
    train(cfg)
    capsys.readouterr()
    train(dataclasses.replace(cfg, max_iters=3))
    assert (f"note: {os.path.join(cfg.out_dir, 'ckpt.pt')} from an earlier run will be replaced "
            f"(--init_from=resume continues it instead)") in capsys.readouterr().out
    assert [r["iter"] for r in read_metrics(cfg.out_dir)] == [0, 1, 2]


def test_the_reference_pass_says_its_size_eta_and_how_to_skip_it_first(tmp_path, capsys):
    data_dir = make_data(tmp_path, n_train=40)
    train(tiny_cfg(tmp_path, data_dir, batch_size=1, max_iters=1, eval_interval=0))
    out = capsys.readouterr().out
    first = out.index("reference log-probs train: 40 pairs, computed once and cached beside the shards "
                      "(--reference=model skips this pass")
    assert first < out.index("reference log-probs train: 16/40 pairs, eta ")  # the eta after the first chunk


def test_sample_py_says_what_it_needs_that_a_model_is_untrained_and_its_progress(tmp_path, capsys):
    r = cli("sample.py", "--mode=compare")
    assert_one_error(r.returncode, r.stderr, r"--init_from=scratch records no reference model to compare against: "
                                             r"pass a DPO checkpoint, e\.g\. --config=config/toy_dpo\.py --init_from=")
    with pytest.raises(ValueError, match=r"--top_k=-1 .*top_k >= 0"):
        sample_module.main(["--top_k=-1", "--device=cpu"])
    data_dir = make_data(tmp_path, n_val=3)
    sample_module.sample(sample_cfg(tmp_path, data_dir, prompts="hi", max_new_tokens=2), torch.device("cpu"))
    assert "init_from=scratch is an untrained random model" in capsys.readouterr().out
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=1, eval_interval=0)
    train(cfg)
    capsys.readouterr()
    sample_module.compare(sample_cfg(tmp_path, data_dir, init_from=cfg.out_dir, num_samples=2, max_new_tokens=4),
                          torch.device("cpu"))
    assert re.search(r"compare: 1/3 prompts, \d+s", capsys.readouterr().err)


def test_sample_py_offline_tokenizer_error_is_its_own_one_line(tmp_path):
    # no network (every download goes to a closed local port) and an empty tiktoken cache
    no_net = "http://127.0.0.1:9"
    env = {**{k: no_net for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}, "NO_PROXY": "",
           "no_proxy": "", "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")}
    r = cli("sample.py", "--prompts=hi", "--device=cpu", env=env)
    assert_one_error(r.returncode, r.stderr, r"could not load tiktoken's GPT-2 tokenizer .*SHA-1 of its URL")
    assert "prepare.py" not in r.stderr


def test_readme_install_section():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Install and the offline toy run")[1].split("\n## ")[0]
    for needed in ("python3 -m venv .venv", "Python 3.10 or newer", "pip install torch --index-url "
                   "https://download.pytorch.org/whl/cpu", "pip install -r requirements.txt", "python sample.py --mode=demo",
                   "tiktoken's GPT-2 tokenizer", "TIKTOKEN_CACHE_DIR", "SHA-1"):
        assert needed in section, needed
    assert "dpo.py --mode" not in section and "with no download" not in section


# -----------------------------------------------------------------------------
# issue 14: every loss type moves the preferences the right way (a broken sign or scale in any type fails here)

def signal_pairs(n, seed):
    """chosen responses are made of tokens 1-50, rejected of 51-100: a preference a tiny model learns in steps"""
    rng = np.random.default_rng(seed)
    return [(rng.integers(200, 300, rng.integers(2, 6)), np.r_[rng.integers(1, 51, rng.integers(2, 6)), 50256],
             np.r_[rng.integers(51, 101, rng.integers(2, 6)), 50256]) for _ in range(n)]


# rpo is sigmoid plus the chosen NLL. (discopop's default tau = 0.05 pushes the margin negative at z = 0, as on the
# toy task in README, but at beta 0.5 and this learning rate it gets past that within the 12 steps)
SETTINGS = {"rpo": dict(loss_type="sigmoid", sft_weight=1.0)}


@pytest.mark.parametrize("name", [t for t in LOSS_TYPES if t != "sft"] + ["rpo"])
def test_every_loss_type_learns_the_preference(tmp_path, name):
    d = tmp_path / "data"
    d.mkdir()
    write_shard(d / "train_000000.bin", signal_pairs(32, 0))
    write_shard(d / "val_000000.bin", signal_pairs(16, 1))
    kw = dict(loss_type=name, max_iters=12, eval_interval=12, learning_rate=1e-2, warmup_iters=0, min_lr=1e-2,
              global_batch_size=16, batch_size=16, n_layer=1, beta=0.5) | SETTINGS.get(name, {})
    hist = train(tiny_cfg(tmp_path, str(d), **kw))
    val = read_metrics(str(tmp_path / "out"))[-1]
    assert hist[0]["accuracy"] == 0.0 or name in ("simpo", "orpo")  # policy = reference at the start: no margin yet
    assert val["val/accuracy"] >= 0.75, (name, val)  # the preference is learned, on held-out pairs too
    assert hist[-1]["loss"] < hist[0]["loss"], name


# -----------------------------------------------------------------------------
# issue 18: the host off the critical path (packer, prefetch, one compiled forward, one sync a step)

def naive_packed(data, pair, row, offset, rows, row_len):
    """the packed layout pair by pair in plain python (the reference for the vectorized packer)"""
    idx, pos, doc, branch = np.full((rows, row_len), EOT), np.zeros((rows, row_len), int), np.full((rows, row_len), -1), np.zeros((rows, row_len), int)
    src, tgt, seq = [], [], []
    for k, (i, j, o) in enumerate(zip(pair, row, offset)):
        p, c, r = (list(x) for x in data[i])
        for t, tok in enumerate(p + c + r):
            idx[j, o + t], doc[j, o + t] = tok, k
            pos[j, o + t] = t if t < len(p) + len(c) else t - len(c)
            branch[j, o + t] = 0 if t < len(p) else 1 if t < len(p) + len(c) else 2
        for t, tok in enumerate(c):
            src, tgt, seq = src + [j * row_len + o + len(p) - 1 + t], tgt + [tok], seq + [2 * k]
        for t, tok in enumerate(r):
            at = o + len(p) - 1 if t == 0 else o + len(p) + len(c) + t - 1
            src, tgt, seq = src + [j * row_len + at], tgt + [tok], seq + [2 * k + 1]
    return idx, pos, doc, branch, src, tgt, seq


def test_vectorized_packer_equals_a_naive_loop(tmp_path):
    # every field of every micro-batch, fixed and per-step shapes, truncated pairs and two shards
    d = tmp_path / "d"
    d.mkdir()
    write_shard(d / "train_000000.bin", random_pairs(20, 300, 0))
    write_shard(d / "train_000001.bin", random_pairs(15, 300, 1) + [(np.arange(1, 50), np.arange(2, 30), np.arange(3, 9))])
    data = PairData(str(d), "train", 48, truncate=True)
    assert data.n_cut > 0 and len(data.shards) == 2
    for fixed in (True, False):
        shape = dpo.make_shape(Config(batch_size=5), [data], fixed=fixed, multiple=8)
        rng = np.random.default_rng(2)
        for _ in range(5):
            ids = rng.choice(len(data), 12, replace=False)
            mbs = dpo.micro_batches(data, ids, shape)
            assert sorted(i for b in mbs for i in b.pair_ids) == sorted(ids)
            for b in mbs:
                R, T = b.idx.shape  # each pair's row and offset, read off its doc ids; the naive loop rebuilds the rest
                where = [np.argwhere(b.doc.numpy() == k)[0] for k in range(len(b.pair_ids))]
                want = naive_packed(data, b.pair_ids, [w[0] for w in where], [w[1] for w in where], R, T)
                n = len(want[4])
                for got, ref in zip((b.idx, b.pos, b.doc, b.branch), want[:4]):
                    assert (got.numpy() == ref).all()
                for got, ref in zip((b.src[:n], b.tgt[:n], b.seq[:n]), want[4:]):
                    assert got.tolist() == ref
                assert b.n_tokens == sum(int(data.lengths[i].sum()) for i in b.pair_ids)
                assert b.lengths.tolist() == [[float(data.lengths[i][1]) for i in b.pair_ids], [float(data.lengths[i][2]) for i in b.pair_ids]]
                if fixed:  # padded to the shape's response count, into the spare last sequence slot
                    assert len(b.tgt) == shape.n_pred >= n and (b.seq[n:] == b.n_seq - 1).all() and b.n_seq == 2 * len(ids) + 1


@pytest.mark.parametrize("layout,reference", [("packed", "cached"), ("packed", "model"), ("plain", "cached"), ("plain", "model")])
def test_prefetch_on_and_off_train_bit_for_bit(tmp_path, layout, reference):
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=5, eval_interval=0, layout=layout, reference=reference)
    runs = [train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / str(p)), prefetch=p, **kw)) for p in (True, False)]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]
    assert [r["grad_norm"] for r in runs[0]] == [r["grad_norm"] for r in runs[1]]
    on, off = (torch.load(tmp_path / str(p) / "ckpt.pt", weights_only=True)["model"] for p in (True, False))
    assert all(torch.equal(on[k], off[k]) for k in on)


def test_an_error_while_building_ahead_is_the_same_one_line_error(tmp_path, monkeypatch, capsys):
    # the next step's micro-batches are built in the main process (no thread, no worker): a bad shard or any other
    # failure there ends the run as it would have one step later, and leaves no thread behind
    import threading
    data_dir = make_data(tmp_path)
    real, calls = dpo.micro_batches, []

    def failing(data, ids, shape):
        calls.append(len(ids))
        if len(calls) == 4:  # step 1's pairs, built ahead while step 0 runs (calls 1-2: the reference pass)
            raise ValueError(f"{data.data_dir}/train_000000.bin: lengths sum to 1 tokens, the header says 2 (corrupted)")
        return real(data, ids, shape)
    monkeypatch.setattr(dpo, "micro_batches", failing)
    threads = threading.active_count()
    with pytest.raises(SystemExit) as e:
        dpo.main(tiny_args(tmp_path, data_dir, eval_interval=0, max_iters=6))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and re.fullmatch(r"error: .*train_000000\.bin: .*\(corrupted\)", err[0])
    assert threading.active_count() == threads and not os.path.exists(tmp_path / "out" / "ckpt.pt")


@pytest.mark.parametrize("layout", ["packed", "plain"])
def test_compiled_steps_equal_eager_and_trace_nothing_after_the_first(tmp_path, layout):
    # the whole forward is compiled (mask, transformer, gather, chunked lm_head, sums); fixed shapes and padded
    # response tokens: the steps after the first (new pairs, other pair counts) add no graph
    from torch._dynamo.utils import counters
    data_dir = make_data(tmp_path)
    kw = dict(eval_interval=0, pack_rows=2, layout=layout, logprob_chunk=32)

    def run(mode, steps):
        torch._dynamo.reset()
        counters.clear()
        hist = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / f"{mode}{steps}"), compile=mode, max_iters=steps, **kw))
        return hist, counters["stats"]["unique_graphs"]
    (eager, _), (compiled, graphs), (_, graphs_1) = run("false", 5), run("true", 5), run("true", 1)
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]
    assert graphs == graphs_1 == 1


@CUDA
def test_cuda_micro_steps_never_wait_for_the_gpu(tmp_path):
    # a whole step's micro-batches (prepared ahead, as the trainer does) run forward, loss and backward with any
    # host-device synchronization an error
    data_dir = make_data(tmp_path, n_train=64)
    cfg = tiny_cfg(tmp_path, data_dir, device="cuda", compile="true", global_batch_size=32, batch_size=8)
    run = checkpoint.setup(cfg)
    data = PairData(data_dir, "train", 64)
    run.shape = dpo.make_shape(cfg, [data], fixed=True, multiple=128)
    model = tiny_model().cuda()
    module = dpo.SequenceLogps(model, compile=True, flex=run.flex)
    ref = lambda b, split: (None, None)  # reference-free: the policy's own work is what is tested
    for warm in (True, False):  # the first pass compiles (which may sync); the second must not
        mbs = dpo.load(data, np.arange(32), ref, run, "train")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(0 if warm else "error")
        try:
            for b, w, rc, rr in mbs:
                losses, cr, rr_, pc, pr = dpo.micro_step(module, b, None, None, run)
                (losses.sum() * w).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(mbs) > 1


# -----------------------------------------------------------------------------
# issue 18: the quick GPU check (the packed bench alone, for measure-change-measure rounds on a card)

def gpu_check(tmp_path, *args, rc=0):
    """bash .ci/gpu ARGS on generated pairs (the project never needs ../shared): its output and its table's rows"""
    rng = random.Random(0)
    words = "good bad fine awful great poor nice meh tasty bland".split()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(120):
            say = lambda n: " " + " ".join(rng.choices(words, k=rng.randint(2, n)))
            f.write(json.dumps({"prompt": f"Q{i}:" + say(20), "chosen": say(30), "rejected": say(30)}) + "\n")
    out = subprocess.run(["bash", ".ci/gpu", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HH": str(tmp_path / "pairs.jsonl"), "OUT": str(tmp_path / "out"),
                              "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert out.returncode == rc, out.stdout[-3000:] + out.stderr[-3000:]
    path = tmp_path / "out" / "gpu_check.jsonl"
    return out, [json.loads(l) for l in open(path)] if path.exists() else []


def test_gpu_quick_check_dry_runs_on_cpu(tmp_path):
    out, rows = gpu_check(tmp_path, "--quick", "--cpu")
    assert [r["stage"] for r in rows] == ["bench packed"]  # nothing else ran
    r = rows[0]
    assert r["status"] == "ok" and r["pairs_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mb"] > 0
    # a packed pair is its prompt once and both responses: 3 to ~100 tokens in this data (at most 21 + 2 x 31 words)
    assert 3 < r["tokens_per_s"] / r["pairs_per_s"] < 100
    assert "GPU check on CPU (dry run)" in out.stdout and not (tmp_path / "out" / "tests.log").exists()
    (tmp_path / "typo").mkdir()
    out, rows = gpu_check(tmp_path / "typo", "--quick", "--fast", rc=2)  # a typo runs nothing, and says so
    assert out.stderr.startswith("error: unknown option --fast") and rows == []


# -----------------------------------------------------------------------------
# issue 22: resume continues the run as it was, and the rough edges a newcomer meets

TIMING = ("ms", "pairs_per_s", "tokens_per_s", "flops_per_s", "mfu")


def run_args(tmp_path, data_dir, out_dir, **kw):
    """a tiny run as a user starts it: data, length and model on the command line, everything else the defaults"""
    base = dict(data_dir=data_dir, out_dir=out_dir, max_iters=8, eval_interval=2, n_layer=1, n_head=2, n_embd=32,
                global_batch_size=8, batch_size=4, dropout=0.1, log_interval=1) | kw  # device auto: here the cpu
    return [f"--{k}={v}" for k, v in base.items()]


def same_run(a, b):
    """metrics.jsonl without the timings, and the final weights: equal to the bit"""
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING} for r in recs]
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    wa, wb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def interrupt(args, after, sig):
    """dpo.py as a user runs it, sent `sig` once it printed the line starting with `after`"""
    p = subprocess.Popen([sys.executable, "dpo.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in p.stdout:
            if line.startswith(after):
                break
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out, err


@pytest.fixture
def one_thread():
    """in-process runs compute like the OMP_NUM_THREADS=1 subprocesses, so their results compare to the bit"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resume_alone_continues_the_run_bit_for_bit(tmp_path, capsys, one_thread):
    # kill -9 after a checkpoint and two more steps (they are redone, and logged once), or Ctrl-C (it stops after the
    # step): `--init_from=resume --out_dir=X` alone then ends exactly where the run that never stopped ends
    data_dir = make_data(tmp_path)
    full = str(tmp_path / "full")
    dpo.main(run_args(tmp_path, data_dir, full))
    for sig, after in ((signal.SIGKILL, "iter 5:"), (signal.SIGINT, "iter 2:")):
        cut = str(tmp_path / signal.Signals(sig).name)
        rc, out, err = interrupt(run_args(tmp_path, data_dir, cut), after, sig)
        if sig == signal.SIGINT:
            assert rc == 130 and f"continue with: python dpo.py --init_from=resume --out_dir={cut}" in out, err[-2000:]
        else:
            assert rc == -9 and torch.load(f"{cut}/ckpt.pt", weights_only=True)["iter_num"] == 4
        capsys.readouterr()
        dpo.main(["--init_from=resume", f"--out_dir={cut}"])
        out = capsys.readouterr().out
        assert "resume:" not in out and out.strip().splitlines()[-1] == (f"saved {cut}/ckpt.pt (step 8); metrics in "
                                                                         f"{cut}/metrics.jsonl")
        same_run(full, cut)


def test_resume_prints_what_the_command_line_changes_and_refuses_what_would_break_the_run(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    out_dir = str(tmp_path / "run")
    dpo.main(run_args(tmp_path, data_dir, out_dir, max_iters=2, eval_interval=0))
    ck = Path(out_dir) / "ckpt.pt"
    before = ck.read_bytes()
    resume = ["--init_from=resume", f"--out_dir={out_dir}"]
    refused = {"--seed=7": "seed=1337", "--loss_type=ipo": "loss_type=sigmoid", "--global_batch_size=16":
               "global_batch_size=8", "--layout=plain": "layout=packed", "--reference=model": "reference=cached",
               "--truncate=true": "truncate=false", "--n_layer=2": "n_layer=1", "--n_embd=64": "n_embd=32",
               "--block_size=256": r"block_size=\d+", "--bias=false": "bias=true"}
    for arg, was in refused.items():
        main_error(capsys, resume + [arg], rf"^error: resume: {arg} would break the run in {re.escape(str(ck))} "
                   rf"\({was} there\): drop it to continue the run as it was, or start a new run from its weights: "
                   rf"--init_from={re.escape(str(ck))} --out_dir=NEW$")
    main_error(capsys, resume + ["--seed=7", "--n_layer=2"], r"--seed=7, --n_layer=2 would break .*drop them")
    (tmp_path / "c.py").write_text("seed = 7\n")  # a --config file names its options too
    main_error(capsys, resume + [f"--config={tmp_path / 'c.py'}"], r"--seed=7 would break .*drop it \(from the command "
               rf"line or {re.escape(str(tmp_path / 'c.py'))}\) to continue")
    # other data under the run's data_dir, or another data_dir: refused; the same data moved: a change
    (tmp_path / "o").mkdir()
    other = make_data(tmp_path / "o", seed=5)
    main_error(capsys, resume + [f"--data_dir={other}"], rf"resume: {re.escape(other)} holds other data than the run in "
               rf"{re.escape(str(ck))} trained on \(from {re.escape(data_dir)}\)")
    assert ck.read_bytes() == before and sorted(os.listdir(out_dir)) == [".lock", "ckpt.pt", "metrics.jsonl"]
    moved = str(tmp_path / "moved")
    shutil.copytree(data_dir, moved)
    dpo.main(resume + [f"--data_dir={moved}", "--max_iters=3", "--learning_rate=5e-3", "--seed=1337", "--n_layer=1"])
    out = capsys.readouterr().out.splitlines()
    assert [l for l in out if l.startswith("resume:")] == [f"resume: data_dir {data_dir} -> {moved}",
                                                             "resume: max_iters 2 -> 3", "resume: learning_rate 0.0001 -> 0.005"]
    ck3 = torch.load(ck, weights_only=True)
    assert ck3["iter_num"] == 3 and ck3["config"]["learning_rate"] == 5e-3 and ck3["config"]["beta"] == 0.1
    write_shard(Path(moved) / "val_000000.bin", random_pairs(8, 300, 9))  # prepared again in place: other data
    main_error(capsys, resume + ["--max_iters=4"], rf"resume: {re.escape(moved)} holds other data than the run in ")


def test_a_checkpoint_missing_what_resume_needs_is_one_line_and_still_starts_a_new_run(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=1, eval_interval=0)
    train(cfg)
    ck = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    for key, what in (("optimizer", "optimizer state"), ("rng_cpu", "random state"), ("iter_num", "step"),
                      ("config", "options")):
        run = tmp_path / key
        run.mkdir()
        (run / "ckpt.pt").write_bytes(torch_bytes({k: v for k, v in ck.items() if k != key}))
        path = re.escape(str(run / "ckpt.pt"))
        main_error(capsys, ["--init_from=resume", f"--out_dir={run}"],
                   rf"^error: {path}: no {what} \({key}\) saved, which --init_from=resume needs; "
                   rf"--init_from={path} starts a new run from its weights$")
        with pytest.raises(ValueError, match=rf"{path}: no {what} \({key}\) saved"):  # train() refuses it too
            train(tiny_cfg(tmp_path, data_dir, out_dir=str(run), init_from="resume"))
        hist = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / f"new_{key}"), init_from=str(run), max_iters=1))
        assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # its weights: policy and reference


def test_a_full_disk_in_torch_save_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    # torch.save on a full disk raises a RuntimeError from its zip writer, not an OSError
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=1, eval_interval=0)
    train(cfg)
    ck = Path(cfg.out_dir) / "ckpt.pt"
    before, names = ck.read_bytes(), sorted(os.listdir(cfg.out_dir))

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 part of it")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4308")

    monkeypatch.setattr(torch, "save", full_disk)
    main_error(capsys, ["--init_from=resume", f"--out_dir={cfg.out_dir}", "--max_iters=2"],
               rf"^error: could not write the checkpoint {re.escape(str(ck))} \(the disk is full\? torch\.save: \[enforce "
               rf"fail at inline_container\.cc:672\] \. unexpected pos 4416 vs 4308\); the previous file is intact; free space on the disk of {re.escape(cfg.out_dir)} \(\d+\.\d GiB free now\)$")
    assert ck.read_bytes() == before and sorted(os.listdir(cfg.out_dir)) == names
    for f in Path(data_dir).glob("ref_logps_*"):
        f.unlink()
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(tmp_path / "fresh")),
               rf"^error: could not write the reference cache {re.escape(data_dir)}/ref_logps_train_\w+\.pt \(the disk is "
               rf"full\? torch\.save: .*\); the previous file is intact; free space on the disk of {re.escape(data_dir)} ")
    assert sorted(os.listdir(data_dir)) == ["train_000000.bin", "val_000000.bin"] and not (tmp_path / "fresh").exists()


def test_prepare_removes_the_staging_folder_of_a_run_killed_by_sigkill(tmp_path):
    # killed as soon as its staging folder exists, long before its 50,000 rows are tokenized
    src, data = tmp_path / "pairs.jsonl", tmp_path / "data"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": " yes", "rejected": " no"}) + "\n" for i in range(50000)))
    p = subprocess.Popen([sys.executable, "prepare.py", f"--input={src}", "--num_workers=1", f"--out_dir={data / 'mine'}"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            stage = list(data.glob(".mine.tmp-*"))
            if stage or p.poll() is not None:
                break
            subprocess.run(["sleep", "0.02"])
        p.kill()
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -9 and stage and stage[0].name.startswith(f".mine.tmp-{p.pid}-") and stage[0].exists()
    alive = data / f".other.tmp-{os.getpid()}-1.5"  # another prepare.py still running: left alone
    alive.mkdir()
    r = cli("prepare.py", "--toy_pairs=60", "--num_workers=1", f"--out_dir={data / 'toy'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(data)) == [alive.name, "toy"]


def test_the_end_of_a_run_says_where_its_result_is(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    for kw, end in ((dict(), "saved {o}/ckpt.pt (step 2); metrics in {o}/metrics.jsonl"),
                    (dict(export_hf=True), "saved {o}/ckpt.pt (step 2) and {o}/hf (transformers); metrics in {o}/metrics.jsonl"),
                    (dict(save_checkpoint=False), "finished step 2, no checkpoint (--save_checkpoint=false); metrics in "
                                                  "{o}/metrics.jsonl")):
        o = str(tmp_path / f"out{len(kw) and list(kw)[0]}")
        capsys.readouterr()
        dpo.main(tiny_args(tmp_path, data_dir, out_dir=o, max_iters=2, **kw))
        assert capsys.readouterr().out.strip().splitlines()[-1] == end.format(o=o)
        assert os.path.isfile(f"{o}/ckpt.pt") == kw.get("save_checkpoint", True)
        assert os.path.isfile(f"{o}/hf/model.safetensors") == kw.get("export_hf", False)


def test_a_failed_start_leaves_nothing_in_a_new_out_dir(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    new = tmp_path / "runs" / "a" / "b"
    main_error(capsys, tiny_args(tmp_path, str(tmp_path / "nothing"), out_dir=str(new)), r"no train shards")
    assert not (tmp_path / "runs").exists()  # neither the .lock nor the folders made for it
    shard = Path(data_dir) / "train_000000.bin"
    pairs = random_pairs(6, 300, 0)
    pairs[2] = (pairs[2][0], np.r_[60000, 50256], pairs[2][2])
    write_shard(shard, pairs)  # found after the lock, the model and the shards are loaded
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(new)), r"token id 60000")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "used").mkdir()  # a folder that was there before stays, with what it held
    (tmp_path / "used" / "notes.txt").write_text("mine")
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(tmp_path / "used")), r"token id 60000")
    assert os.listdir(tmp_path / "used") == ["notes.txt"]


def test_sample_py_help_and_options_come_from_the_run(tmp_path, capsys):
    r = cli("sample.py", "--help")
    assert r.returncode == 0 and not r.stderr
    assert r.stdout.index("--mode=sample") < r.stdout.index("--num_samples=8") < r.stdout.index("--out_dir=out")
    assert "default to the run's own with --init_from=RUN" in r.stdout.splitlines()[1]
    # compare without --data_dir or --seed: the run's own (its data is not the default data/toy)
    data_dir = make_data(tmp_path, n_val=2)
    out_dir = str(tmp_path / "run")
    dpo.main(tiny_args(tmp_path, data_dir, out_dir=out_dir, max_iters=1, eval_interval=0, seed=5))
    capsys.readouterr()
    sample_module.main(["--mode=compare", f"--init_from={out_dir}", "--num_samples=1", "--max_new_tokens=2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seed"] == 5


def test_block_size_comes_from_the_data_when_the_model_is_made_from_scratch(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    longest = max(len(p) + max(len(c), len(r)) for s in (0, 1) for p, c, r in random_pairs((24, 8)[s], 300, s))
    cfg = parse_config(tiny_args(tmp_path, data_dir, max_iters=1, eval_interval=0)[:-1] + ["--block_size=0"])
    assert cfg.block_size == 0 and Config.block_size == 0
    train(dataclasses.replace(cfg, block_size=0))
    assert torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)["model_config"]["block_size"] == longest
    long = tmp_path / "long"
    long.mkdir()
    pairs = random_pairs(4, 300, 0)
    pairs[1] = (np.arange(1000) % 300, np.r_[np.arange(99), 50256], pairs[1][2])
    write_shard(long / "train_000000.bin", pairs)  # one pair of 1100 tokens: GPT-2's 1024 positions, then the flag
    main_error(capsys, [f"--data_dir={long}", f"--out_dir={tmp_path / 'o'}", "--n_layer=1", "--n_embd=32", "--n_head=2",
                        "--device=cpu"], r"1 pairs are longer than block_size=1024 .* Set --truncate=true to cut them")


def test_readme_for_a_newcomer():
    text = (ROOT / "README.md").read_text()
    tests = text.split("## Tests")[1].split("\n## ")[0]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in tests and "torch==" not in tests
    assert "../shared/data/hh-rlhf-harmless-base-test.jsonl.gz" in tests and "harmless-base/test.jsonl.gz" in tests
    hh = re.search(r"first: (python prepare\.py [^)]*)\)", (ROOT / "config" / "hh_gpt2.py").read_text())[1]
    assert hh in text.split("## Real data")[1]
    assert "python dpo.py --init_from=resume --out_dir=" in text.split("Ctrl-C or SIGTERM")[1].split("\n- ")[0]
    throughput = text.split("## Throughput")[1].split("\n## ")[0]
    assert "a748c32" not in throughput and "bench/README.md" in throughput and "python bench.py" in throughput
    assert "a748c32" in (ROOT / "bench" / "README.md").read_text()


# -----------------------------------------------------------------------------
# ---- issue 21: TRL's DPO options: combined losses (MPO), f-divergences, orpo, LD-DPO, WPO, TR-DPO

from decimal import Decimal, getcontext  # noqa: E402

F_PRIME = {  # f'(t) of each f-divergence at t = pi / pi_ref (f-DPO, Wang et al. 2023), written in t
    "reverse_kl": lambda t, a: math.log(t),
    "forward_kl": lambda t, a: 1 - 1 / t,
    "js_divergence": lambda t, a: math.log(2 * t / (1 + t)),
    "alpha_divergence": lambda t, a: (t ** (a - 1) - 1) / (a - 1) if a != 1 else math.log(t),
}


@pytest.mark.parametrize("f_div, alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                          ("alpha_divergence", 0.2), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", dpo.F_DIVERGENCE_LOSSES)
def test_f_divergence_matches_formula(loss_type, f_div, alpha):
    # the log-ratios u become f'(e^u) before the margin; the reference formula gets them in place of the log-ratios
    beta, ls, n = 0.3, 0.1 if loss_type in ("robust", "exo_pair") else 0.0, 9
    plain, tensors = random_batch(n, seed=7 + dpo.F_DIVERGENCE_LOSSES.index(loss_type))
    pc, pr, rc, rr, lc, lr = plain
    losses, cr, rjr = call(loss_type, tensors, beta=beta, label_smoothing=ls, f_divergence_type=f_div,
                           f_alpha_divergence_coef=alpha)
    f = lambda u: F_PRIME[f_div](math.exp(u), alpha)
    sw, sl = [f(pc[i] - rc[i]) for i in range(n)], [f(pr[i] - rr[i]) for i in range(n)]
    zero = [0.0] * n
    want = (ref_losses("sft", pc, pr, rc, rr, lc, lr, beta, ls, 0, 0, 0.05) if loss_type == "sft" else
            ref_losses(loss_type, sw, sl, zero, zero, lc, lr, beta, ls, 0, 0, 0.05))
    assert losses.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert cr.tolist() == pytest.approx([beta * (pc[i] - rc[i]) for i in range(n)], rel=1e-12)  # rewards: plain ratios


def test_alpha_divergence_is_clamped_as_trl_and_other_types_are_refused():
    # (alpha - 1) u is clamped at 80 (TRL's float32 bound), so exp stays finite: u = -400 at alpha 0.5 gives e^80
    pc, pr = torch.tensor([-401.0, -1.0]), torch.tensor([-1.0, -1.0])
    rc, rr = torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.0])
    z = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="hinge", f_divergence_type="alpha_divergence")[0]
    assert z.tolist() == pytest.approx([1 - (math.exp(80) - 1) / -0.5, 1.0], rel=1e-6)
    for t in set(LOSS_TYPES) - set(dpo.F_DIVERGENCE_LOSSES):
        with pytest.raises(ValueError, match="f_divergence_type"):
            dpo_loss(pc, pr, rc, rr, loss_type=t, f_divergence_type="forward_kl",
                     chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2))


def test_combined_losses_are_the_weighted_sum_and_sft_weight_is_sft_in_the_list():
    plain, tensors = random_batch(7, seed=11)
    kw = dict(beta=0.2, label_smoothing=0.1)
    types, weights = ["sigmoid", "bco_pair", "sft", "ipo"], [0.8, 0.2, 1.0, -0.3]
    got = call(",".join(types), tensors, loss_weights=weights, **kw)[0]
    assert torch.equal(got, call(types, tensors, loss_weights=[str(w) for w in weights], **kw)[0])
    want = [sum(w * ref_losses(t, *plain, 0.2, 0.1, 0.5, 0.0, 0.05)[i] for t, w in zip(types, weights)) for i in range(7)]
    assert got.tolist() == pytest.approx(want, rel=1e-9)
    assert call("sigmoid,sigmoid", tensors)[0].tolist() == pytest.approx((2 * call("sigmoid", tensors)[0]).tolist())
    rpo = call("sigmoid", tensors, sft_weight=0.7)[0]
    assert rpo.tolist() == pytest.approx(call("sigmoid,sft", tensors, loss_weights=[1, 0.7])[0].tolist(), rel=1e-12)
    for bad in (dict(loss_type="sigmoid,kto"), dict(loss_type="sigmoid,sft", loss_weights=[1.0])):
        with pytest.raises(ValueError, match="loss_type"):
            call(bad.pop("loss_type"), tensors, **bad)


def test_orpo_log_odds_near_zero_and_minus_infinity():
    # ORPO: -a_w + lambda * -log sigmoid(log odds(a_w) - log odds(a_l)), a the per-token average log-prob,
    # log odds(a) = log(e^a / (1 - e^a)); the reference in 60-digit decimals
    getcontext().prec = 60
    def want(aw, al, lam):
        odds = lambda a: Decimal(a).exp() / (1 - Decimal(a).exp())
        d = (odds(aw) / odds(al)).ln()
        return float(-Decimal(aw) + lam * (1 + (-d).exp()).ln())
    a = [-1e-12, -1e-8, -1e-4, -0.5, -0.69, -0.7, -3.0, -40.0, -1e3, -1e4]
    aw, al = torch.tensor(a, dtype=torch.float64), torch.tensor(a[::-1], dtype=torch.float64)
    n = torch.tensor([3.0] * len(a), dtype=torch.float64)  # summed log-probs are 3 x the average
    losses, cr, rjr = dpo_loss(3 * aw, 3 * al, None, None, beta=0.25, loss_type="orpo", chosen_lengths=n, rejected_lengths=n)
    assert losses.tolist() == pytest.approx([want(x, y, Decimal("0.25")) for x, y in zip(a, a[::-1])], rel=1e-12)
    assert cr.tolist() == pytest.approx([0.25 * x for x in a], rel=1e-12)  # TRL's ORPO reward: lambda * a
    # float32 at the ends, including a = 0 exactly (every token certain): finite values and gradients
    pc = torch.tensor([0.0, -1e-7, -3e4, -1.0], requires_grad=True)
    pr = torch.tensor([0.0, -2.0, -1.0, -3e4], requires_grad=True)
    one = torch.ones(4)
    losses = dpo_loss(pc, pr, None, None, beta=0.1, loss_type="orpo", chosen_lengths=one, rejected_lengths=one)[0]
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert losses[0].item() == pytest.approx(0.1 * math.log(2), rel=1e-6)  # equal odds: -log sigmoid(0)
    assert losses[2].item() == pytest.approx(3e4 + 0.1 * (3e4 - 1 - math.log(-math.expm1(-1.0))), rel=1e-6)


def test_orpo_is_reference_free():
    _, (pc, pr, rc, rr, lc, lr) = random_batch(5, seed=12)
    a = dpo_loss(pc, pr, rc, rr, loss_type="orpo", chosen_lengths=lc, rejected_lengths=lr)
    b = dpo_loss(pc, pr, None, None, loss_type="orpo", chosen_lengths=lc, rejected_lengths=lr)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bad, pattern", [
    (["--loss_type=sigmoid,dpo"], r"--loss_type=sigmoid,dpo: expected one of sigmoid \| .* \(or a comma list\)"),
    (["--loss_type=sigmoid,"], r"--loss_type=sigmoid,: expected one of"),
    (["--loss_weights=0.8,0.2"], r"--loss_weights=0.8,0.2: expected 1 comma-separated numbers, one per --loss_type"),
    (["--loss_type=sigmoid,sft", "--loss_weights=1,x"], r"--loss_weights=1,x: expected 2 comma-separated numbers"),
    (["--f_divergence_type=kl"], r"--f_divergence_type=kl: expected one of reverse_kl \| forward_kl \| js_divergence"),
    (["--f_divergence_type=forward_kl", "--loss_type=sigmoid,nca_pair"],
     r"--f_divergence_type=forward_kl works with --loss_type sigmoid \| .* only .*, not nca_pair$"),
    (["--f_divergence_type=js_divergence", "--loss_type=orpo"], r"js_divergence works with .* not orpo$"),
    (["--ld_alpha=1.5"], r"--ld_alpha=1.5: must be in \[0, 1\]"),
    (["--ld_alpha=0.5", "--loss_type=sft"], r"--ld_alpha=0.5: .*not with sft alone"),
    (["--use_weighting=true", "--loss_type=sigmoid,aot_pair"], r"--use_weighting=true: not with --loss_type aot_pair"),
    (["--sync_ref_model=true"], r"--sync_ref_model=true needs --reference=model"),  # tiny_cfg: reference cached
    (["--sync_ref_model=true", "--reference=model", "--loss_type=simpo"], r"and a loss type with a reference"),
    (["--sync_ref_model=true", "--reference=model", "--ref_model_mixup_alpha=2"], r"--ref_model_mixup_alpha=2.0: must be in"),
    (["--ref_model_sync_steps=0"], r"--ref_model_sync_steps=0: must be > 0"),
])
def test_issue21_bad_options_are_one_line_before_any_work(tmp_path, capsys, bad, pattern):
    data_dir = make_data(tmp_path)
    main_error(capsys, tiny_args(tmp_path, data_dir) + bad, pattern)
    assert not (tmp_path / "out").exists() and sorted(os.listdir(data_dir)) == ["train_000000.bin", "val_000000.bin"]


def test_help_lists_the_trl_options():
    text = __import__("configurator").help_text(Config)
    for opt in ("--loss_weights=", "--f_divergence_type=reverse_kl", "--f_alpha_divergence_coef=0.5", "--ld_alpha=1.0",
                "--use_weighting=False", "--sync_ref_model=False", "--ref_model_mixup_alpha=0.6", "--ref_model_sync_steps=512"):
        assert re.search(rf"^  {re.escape(opt)} +\S", text, re.M), opt


def test_combined_loss_run_is_the_weighted_sum_of_its_single_losses_step_by_step(tmp_path, monkeypatch):
    # TRL's MPO example. every training micro-step also evaluates each single loss on the same log-probs; the run's
    # loss must be their weighted sum at every step (while it trains, lr > 0), and at step 0 (same weights) the
    # separate single-loss runs' losses weighted and summed
    data_dir = make_data(tmp_path)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    orig, parts = dpo.dpo_loss, []

    def spy(*args, **kw):
        if torch.is_grad_enabled():  # training (evaluation runs under no_grad)
            detached = [a.detach() if torch.is_tensor(a) else a for a in args]
            parts.append([orig(*detached, **{**kw, "loss_type": t, "loss_weights": None})[0].sum().item() for t in types])
        return orig(*args, **kw)

    monkeypatch.setattr(dpo, "dpo_loss", spy)
    kw = dict(max_iters=4, learning_rate=3e-3, eval_interval=0)
    hist = train(tiny_cfg(tmp_path, data_dir, loss_type=",".join(types), loss_weights="0.8,0.2,1.0", **kw))
    monkeypatch.setattr(dpo, "dpo_loss", orig)
    per_step = len(parts) // len(hist)  # micro-batches per step (packed: the same count every step here)
    assert per_step * len(hist) == len(parts)
    for k, h in enumerate(hist):
        sums = np.sum(parts[k * per_step: (k + 1) * per_step], axis=0) / 8  # global_batch_size 8
        assert h["loss"] == pytest.approx(float(np.dot(weights, sums)), rel=1e-6), k
    single = [train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / t), loss_type=t, **kw))[0]["loss"] for t in types]
    assert hist[0]["loss"] == pytest.approx(float(np.dot(weights, single)), rel=1e-6)


ISSUE21_OPTIONS = {
    "mpo": dict(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.0"),
    "js_ipo": dict(loss_type="ipo", f_divergence_type="js_divergence"),
    "alpha": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    "orpo": dict(loss_type="orpo"),
    "ld_alpha": dict(ld_alpha=0.3),
    "wpo": dict(use_weighting=True, loss_type="sigmoid,sft"),
    "tr_dpo": dict(reference="model", sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5),
}


@pytest.mark.parametrize("name", ISSUE21_OPTIONS)
def test_issue21_options_packed_equals_plain(tmp_path, name):
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=3, eval_interval=3, learning_rate=3e-3, **ISSUE21_OPTIONS[name])
    runs = [train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / lay), layout=lay, **kw)) for lay in ("plain", "packed")]
    for a, b in zip(*runs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["margin"] == pytest.approx(b["margin"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert runs[0][-1]["loss"] != runs[0][0]["loss"]  # it trained


@pytest.mark.parametrize("chunk", [7, 1000])  # several chunks (recomputed in backward), one chunk (kept)
def test_token_logprobs_sum_sq_matches_a_full_softmax_and_leaves_the_gradient(chunk):
    # WPO's per-token term log sum_v p(v)^2, from the chunked lm_head, against float64 full-vocabulary softmaxes
    m = tiny_model(3)
    idx = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(1))
    h = m.hidden(idx)
    lp, sq = m.token_logprobs(h, targets, chunk_size=chunk, sum_sq=True)
    logp = F.log_softmax(m.lm_head(h).double(), -1)  # (3, 17, V)
    want = torch.log((logp.exp() ** 2).sum(-1))
    assert sq.shape == (3, 17) and not sq.requires_grad
    torch.testing.assert_close(sq.double(), want, atol=1e-5, rtol=1e-5)
    assert (want < 0).all() and (want > logp.max(-1).values * 2 - 1e-9).all()  # log max p^2 <= it <= 0
    plain = m.token_logprobs(h, targets, chunk_size=chunk)
    assert torch.equal(lp, plain)
    g1 = torch.autograd.grad(lp.sum(), h, retain_graph=True)[0]
    g2 = torch.autograd.grad(plain.sum(), h)[0]
    assert torch.equal(g1, g2)


def test_tr_dpo_reference_after_a_sync_is_the_mix_and_the_next_step_uses_it(tmp_path):
    # sync after optimizer steps tau, 2 tau, ... (TRL's SyncRefModelCallback, global_step % tau == 0): with tau = 2 the
    # reference after step 2 is 0.6 * policy + 0.4 * reference, and step index 2 (the third) is scored against it
    data_dir = make_data(tmp_path)
    kw = dict(reference="model", learning_rate=3e-3, eval_interval=0, sync_ref_model=True, ref_model_sync_steps=2,
              ref_model_mixup_alpha=0.6)
    hist = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "a"), max_iters=2, **kw))
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    init = checkpoint.load_model("scratch", tiny_cfg(tmp_path, data_dir)).state_dict()  # the first reference
    for k, v in ck["ref_model"].items():
        want = 0.6 * ck["model"][k].double() + 0.4 * init[k].double()
        torch.testing.assert_close(v.double(), want, atol=1e-7, rtol=1e-6)
    assert not torch.equal(ck["ref_model"]["lm_head.weight"], init["lm_head.weight"])
    # the third step's loss with the policy after step 2 and that mixed reference, computed naively
    third = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "b"), max_iters=3, **kw))
    assert [h["loss"] for h in third[:2]] == [h["loss"] for h in hist]
    data = PairData(data_dir, "train", 64)
    policy, ref = tiny_model(), tiny_model()
    policy.load_state_dict(ck["model"]), ref.load_state_dict(ck["ref_model"])
    ids = dpo.step_pairs(len(data), 1337, 2, 8, 0, 1)
    with torch.no_grad():
        lp = {(n, i): [naive_logps(m, data[i][0], data[i][j]) for j in (1, 2)] for n, m in (("p", policy), ("r", ref)) for i in ids}
    z = [0.1 * ((lp["p", i][0] - lp["r", i][0]) - (lp["p", i][1] - lp["r", i][1])) for i in ids]
    assert third[2]["loss"] == pytest.approx(float(np.mean([-logsig(float(x)) for x in z])), rel=1e-5)
    # tau = 3: no sync within two steps, the reference is the first one exactly
    train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "c"), max_iters=2, **{**kw, "ref_model_sync_steps": 3}))
    ck3 = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(v, init[k]) for k, v in ck3["ref_model"].items())


def test_resume_with_sync_ref_model_is_bit_exact(tmp_path):
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=6, lr_decay_iters=6, eval_interval=3, dropout=0.1, reference="model", sync_ref_model=True,
              ref_model_sync_steps=2, learning_rate=3e-3)  # syncs after steps 2, 4, 6; the checkpoint at 3 holds one
    full = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "full"), **kw))
    half = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "half"), **{**kw, "max_iters": 3}))
    rest = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "half"), init_from="resume", **kw))
    assert [h["loss"] for h in full] == [h["loss"] for h in half + rest]
    assert [h["iter"] for h in rest] == [3, 4, 5]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("full", "half"))
    assert all(torch.equal(v, b["ref_model"][k]) for k, v in a["ref_model"].items())


def naive_token_logps(model, p, resp):
    """per response token, from full float64 softmaxes: log p(y_t) and log sum_v p(v)^2"""
    idx = torch.from_numpy(np.concatenate([p, resp]).astype(np.int64))[None]
    logp = F.log_softmax(model(idx)[0].double(), -1)[len(p) - 1: len(p) - 1 + len(resp)]  # (n, V)
    return logp[torch.arange(len(resp)), torch.from_numpy(resp.astype(np.int64))], torch.logsumexp(2 * logp, -1)


def option_logps(model, data, ids, layout, **kw):
    """pair id -> (chosen sum, rejected sum, WPO weight or None) through the trainer's micro-batches"""
    shape = dpo.make_shape(Config(layout=layout.split("-")[0], batch_size=3), [data], fixed=not layout.endswith("step"), multiple=8)
    module, out = dpo.SequenceLogps(model, chunk=7, **kw), {}
    for b in dpo.micro_batches(data, ids, shape):
        c, r, w = dpo.batch_logps(module, b)
        for k, i in enumerate(b.pair_ids):
            out[int(i)] = (c[k].item(), r[k].item(), None if w is None else w[k].item())
    return out


@pytest.mark.parametrize("layout", ["plain", "packed", "packed-step"])
def test_ld_alpha_and_wpo_weights_match_a_naive_loop(tmp_path, layout):
    # LD-DPO: tokens past the shorter response of the pair count alpha times; WPO: w = exp(mean_t (log p(y_t) -
    # log sum_v p(v)^2)) per response, the pair's weight w_chosen * w_rejected; both against full softmaxes
    data = PairData(make_data(tmp_path, n_train=12), "train", 64)
    model, ids = tiny_model(4), np.arange(12)
    got = option_logps(model, data, ids, layout, ld_alpha=0.3, wpo=True)
    assert sorted(got) == list(range(12))
    with torch.no_grad():
        for i in ids:
            p, c, r = data[i]
            m = min(len(c), len(r))
            (lc, sc), (lr, sr) = naive_token_logps(model, p, c), naive_token_logps(model, p, r)
            assert got[i][0] == pytest.approx((lc[:m].sum() + 0.3 * lc[m:].sum()).item(), abs=1e-4)
            assert got[i][1] == pytest.approx((lr[:m].sum() + 0.3 * lr[m:].sum()).item(), abs=1e-4)
            w = math.exp((lc - sc).mean().item()) * math.exp((lr - sr).mean().item())
            assert got[i][2] == pytest.approx(w, rel=1e-4)
    assert any(len(data[i][1]) != len(data[i][2]) for i in ids)  # some pairs have a tail
    plain = option_logps(model, data, ids, layout)
    assert all(v[2] is None for v in plain.values())
    for i in ids:  # alpha 1 is the plain sum
        p, c, r = data[i]
        assert plain[i][0] == pytest.approx(naive_logps(model, p, c).item(), abs=1e-4)


def test_ld_alpha_cached_reference_has_its_own_file_and_equals_the_frozen_copy(tmp_path):
    data_dir = make_data(tmp_path)
    kw = dict(ld_alpha=0.5, max_iters=3, eval_interval=3)
    a = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "a"), reference="cached", **kw))
    b = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "b"), reference="model", **kw))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["margin"] == pytest.approx(y["margin"], abs=1e-5)
    train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "c"), reference="cached", max_iters=1))
    caches = [n for n in os.listdir(data_dir) if n.startswith("ref_logps_train_")]
    assert len(caches) == 2 and sum("_ld0.5_" in n for n in caches) == 1  # the key includes ld_alpha


def test_issue21_options_compiled_equals_eager(tmp_path):
    # every option at once (weights, f-divergence, LD-DPO, WPO, TR-DPO syncing every step) through torch.compile
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=3, eval_interval=3, pack_rows=2, learning_rate=3e-3, loss_type="sigmoid,sft", loss_weights="1,0.5",
              f_divergence_type="js_divergence", ld_alpha=0.5, use_weighting=True, reference="model", sync_ref_model=True,
              ref_model_sync_steps=1)
    eager = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "eager"), **kw))
    torch._dynamo.reset()
    compiled = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "compiled"), compile="true", **kw))
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
    assert eager[-1]["loss"] != eager[0]["loss"]


def test_tr_dpo_prefetch_on_equals_off(tmp_path):
    # the step after a sync is not built ahead (its reference log-probs would come from the reference before the sync)
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=5, eval_interval=0, reference="model", sync_ref_model=True, ref_model_sync_steps=2, learning_rate=3e-3)
    runs = [train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / str(p)), prefetch=p, **kw)) for p in (True, False)]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]


# -----------------------------------------------------------------------------
# ---- issue 20: generate's KV cache against a naive uncached loop; online DPO (sample, judge, train) end to end

import online as online_module  # noqa: E402


def naive_generate(m, prompts, n, temperature, top_k, eos, g):
    """today's algorithm, one row at a time: each step the row's own tokens (its last block_size) run in full"""
    rows, done = [list(p) for p in prompts], [False] * len(prompts)
    for _ in range(n):
        with torch.no_grad():
            logits = torch.stack([m(torch.tensor([r[-m.config.block_size:]]))[0, -1] for r in rows]).float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k:
                logits[logits < torch.topk(logits, top_k).values[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=g)[:, 0]
        for i, t in enumerate(nxt.tolist()):
            rows[i].append(eos if done[i] else t)
            done[i] = done[i] or t == eos
        if all(done):
            break
    return [r[len(p):] for r, p in zip(rows, prompts)]


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 20)])
def test_generate_kv_cache_matches_uncached(temperature, top_k):
    m = our_tiny(block_size=16)  # prompt + 14 new tokens > 16 for the longer rows: the window slides there
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (3, 9, 1, 6)]
    T = max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # right-aligned, any padding token
    pad = torch.tensor([T - len(p) for p in prompts])
    for eos in (None, naive_generate(m, prompts, 3, 0.0, None, None, None)[0][2]):  # eos: a token row 0 makes
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        ref = naive_generate(m, prompts, 14, temperature, top_k, eos, g2)
        out = m.generate(idx, 14, temperature, top_k, eos_token_id=eos, generator=g1, pad_left=pad)
        assert out[:, T:].tolist() == ref and torch.equal(out[:, :T], idx)
    same = torch.tensor([prompts[1][:5], prompts[3][:5]])  # no padding: the same as today's batched call
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ref = naive_generate(m, same.tolist(), 8, temperature, top_k, None, g2)
    assert m.generate(same, 8, temperature, top_k, eos_token_id=None, generator=g1)[:, 5:].tolist() == ref
    with pytest.raises(ValueError, match="pad_left"):
        m.generate(idx, 2, pad_left=torch.tensor([0, 0, T, 0]))


@pytest.fixture(scope="module")
def toy_sft(tmp_path_factory):
    """toy data and a tiny model trained with SFT until its samples hold sentiment words (so the toy judge rarely ties)"""
    root = tmp_path_factory.mktemp("toy_online")
    data = root / "data"
    P.prepare(P.parse_args(["--toy_pairs=300", f"--out_dir={data}", "--num_workers=1"]), log=None)
    train(tiny_cfg(root, str(data), out_dir=str(root / "sft"), loss_type="sft", max_iters=40, eval_interval=0,
                   learning_rate=1e-2, global_batch_size=16, batch_size=16))
    return root


def online_cfg(tmp_path, toy_sft, **kw):
    base = dataclasses.asdict(tiny_cfg(tmp_path, str(toy_sft / "data"), init_from=str(toy_sft / "sft"), max_iters=4,
                                       global_batch_size=4, batch_size=4, eval_interval=0))
    return online_module.OnlineConfig(**base | dict(rounds=2, prompts_per_round=6, num_samples=2, max_new_tokens=12) | kw)


def write_judge(tmp_path, monkeypatch, name, body):
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:score"


def check_rounds(cfg, score):
    """every round's pairs: best over worst by the judge (re-scored here), the shard holds the same tokens, and the
    checkpoints chain: one step count through the rounds, the SFT model the reference of each"""
    enc = tiktoken.get_encoding("gpt2")
    for r in range(cfg.rounds):
        d = Path(cfg.out_dir) / f"round_{r:03d}"
        rows = [json.loads(line) for line in open(d / "pairs" / "pairs.jsonl")]
        shard = P.load_pairs(str(d / "pairs" / "train_000000.bin"))
        assert len(rows) == len(shard) == cfg.prompts_per_round
        for i, row in enumerate(rows):
            strip = lambda s: s.replace("<|endoftext|>", "")
            assert row["chosen_score"] == score(row["prompt"], strip(row["chosen"])) > \
                   row["rejected_score"] == score(row["prompt"], strip(row["rejected"]))
            assert [enc.decode(x.tolist()) for x in shard[i]] == [row["prompt"], row["chosen"], row["rejected"]]
        ck = torch.load(d / "ckpt.pt", weights_only=True)
        assert ck["iter_num"] == (r + 1) * cfg.max_iters // cfg.rounds
        assert ck["ref_from"] == os.path.abspath(cfg.init_from)  # not the previous round: the reference stays SFT
        its = [m["iter"] for m in read_metrics(str(d)) if "loss" in m]
        assert its == list(range(r * cfg.max_iters // cfg.rounds, ck["iter_num"]))
        assert json.loads((d / "round.json").read_text())["pairs"] == cfg.prompts_per_round


def test_online_toy_judge_end_to_end_and_resume(tmp_path, toy_sft):
    cfg = online_cfg(tmp_path, toy_sft)
    online_module.online(cfg)
    check_rounds(cfg, lambda p, r: P.toy_reward(r))
    r0, r1 = (torch.load(tmp_path / "out" / f"round_00{r}" / "ckpt.pt", weights_only=True)["model"] for r in (0, 1))
    assert any(not torch.equal(r0[k], r1[k]) for k in r0)  # round 1 trained further
    # stopped in round 1: it is done again from round 0's checkpoint, the same pairs; round 0 is not touched
    first = (tmp_path / "out" / "round_001" / "pairs" / "pairs.jsonl").read_text()
    stamp = os.path.getmtime(tmp_path / "out" / "round_000" / "ckpt.pt")
    shutil.rmtree(tmp_path / "out" / "round_001")
    online_module.online(cfg)
    assert (tmp_path / "out" / "round_001" / "pairs" / "pairs.jsonl").read_text() == first
    assert os.path.getmtime(tmp_path / "out" / "round_000" / "ckpt.pt") == stamp


def test_online_judge_from_module(tmp_path, toy_sft, monkeypatch):
    spec = write_judge(tmp_path, monkeypatch, "judge_words", "def score(prompt, response):\n"
                       "    assert prompt.startswith(('Review of', 'My review of', 'Thoughts on')), prompt\n"
                       "    return float(len(response.split()))\n")
    cfg = online_cfg(tmp_path, toy_sft, judge=spec, num_samples=3)
    online_module.online(cfg)
    check_rounds(cfg, lambda p, r: float(len(r.split())))


@pytest.mark.parametrize("body, pattern", [
    ("def score(prompt, response):\n    raise KeyError('no reward model')\n", r"raised KeyError: 'no reward model'"),
    ("def score(prompt, response):\n    return float('nan')\n", r"returned nan \(float\)"),
    ("def score(prompt, response):\n    return 'good'\n", r"returned 'good' \(str\)"),
])
def test_online_bad_judge_is_one_clear_error_and_done_rounds_stay(tmp_path, toy_sft, monkeypatch, body, pattern):
    online_module.online(online_cfg(tmp_path, toy_sft, rounds=1, max_iters=2))  # round 0 with the toy judge
    r0 = tmp_path / "out" / "round_000"
    before = {p: p.read_bytes() for p in r0.rglob("*") if p.is_file()}
    spec = write_judge(tmp_path, monkeypatch, f"judge_bad{len(body)}", body)
    with pytest.raises(ValueError, match=rf"^judge {spec} {pattern}") as e:
        online_module.online(online_cfg(tmp_path, toy_sft, judge=spec))
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in r0.rglob("*") if p.is_file()} == before  # round 0 intact
    assert not (tmp_path / "out" / "round_001").exists()  # nothing half-written for round 1
    with pytest.raises(ValueError, match="could not load"):
        online_module.main([f"--judge={spec}x", "--device=cpu"])
