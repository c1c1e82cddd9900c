"""
From shards to tensors: reading pairs (PairData), the plain and packed layouts against a naive loop,
the packer and its shapes, micro-batches and attention masks.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import batches
import dpo
from dpo import Config, PairData, dpo_loss
from model import GPT, GPTConfig
from testlib import (EOT, HH_FILE, HH_MISSING, make_data, naive_logps, random_pairs, tiny_model,
                     write_shard)


# -----------------------------------------------------------------------------
# reading pairs: missing, corrupt and too long shards


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


# -----------------------------------------------------------------------------
# log-probs: plain and packed layouts against a naive loop, values and gradients


def layout_len(data, layout, multiple=64):
    """row length: the longest sequence (plain) or pair (packed), rounded up"""
    L = data.lengths
    longest = (L[:, 0] + np.maximum(L[:, 1], L[:, 2])) if layout == "plain" else L.sum(1)
    return int(-(-longest.max() // multiple) * multiple)


def layout_logps(model, data, ids, layout, pack_len, batch_size=3):
    """layout: plain | packed (fixed shapes) | packed-step (rows as long as the longest pair given)"""
    cfg = Config(layout=layout.split("-")[0], batch_size=batch_size, pack_len=pack_len)
    shape = dpo.make_shape(cfg, [data], fixed=not layout.endswith("step"),
                           multiple=8)  # 8: step rows shorter than pack_len
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


# -----------------------------------------------------------------------------
# packing: rows, shapes and every field of a micro-batch


def test_packing_puts_several_pairs_in_a_row(tmp_path):
    data = PairData(make_data(tmp_path), "train", 64)
    pack_len = layout_len(data, "packed")
    mbs = dpo.micro_batches(data, np.arange(len(data)),
                            dpo.make_shape(Config(layout="packed", batch_size=8), [data], fixed=True))
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
        row, offset = batches.plan_packed(need, row_len)
        rows = [[(k, offset[k]) for k in np.flatnonzero(row == j)] for j in range(row.max() + 1)]
        assert all(rows)  # rows are numbered 0, 1, ... with none left empty
        for items in rows:  # pairs sit end to end from offset 0 and the row holds them
            spans = sorted((o, o + need[k]) for k, o in items)
            assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert spans[-1][1] <= row_len
        # no two rows could be merged: first fit leaves no row that fits into another's space
        used = sorted(sum(need[k] for k, _ in items) for items in rows)
        assert len(used) < 2 or used[0] + used[1] > row_len
        # first fit decreasing, by a naive loop: each pair (longest first) into the first row with
        # room
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


def naive_packed(data, pair, row, offset, rows, row_len):
    """the packed layout pair by pair in plain python (the reference for the vectorized packer)"""
    idx, pos, doc, branch = (np.full((rows, row_len), EOT), np.zeros((rows, row_len), int),
                             np.full((rows, row_len), -1), np.zeros((rows, row_len), int))
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
    write_shard(d / "train_000001.bin",
                random_pairs(15, 300, 1) + [(np.arange(1, 50), np.arange(2, 30), np.arange(3, 9))])
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
                assert b.lengths.tolist() == [[float(data.lengths[i][1]) for i in b.pair_ids],
                                              [float(data.lengths[i][2]) for i in b.pair_ids]]
                if fixed:  # padded to the shape's response count, into the spare last sequence slot
                    assert (len(b.tgt) == shape.n_pred >= n and (b.seq[n:] == b.n_seq - 1).all()
                            and b.n_seq == 2 * len(ids) + 1)


# -----------------------------------------------------------------------------
# attention masks


def test_attention_mask_blocks_chosen_from_rejected(tmp_path):
    # rejected tokens must not see chosen tokens: changing chosen leaves rejected's log-prob
    # unchanged
    p, c, r = np.array([5, 6, 7]), np.array([8, 9, 50256]), np.array([10, 50256])
    d = tmp_path / "d"
    d.mkdir()
    write_shard(d / "train_000000.bin", [(p, c, r), (p, np.array([11, 12, 13, 50256]), r)])
    data = PairData(str(d), "train", 64)
    model = tiny_model()
    _, rej = layout_logps(model, data, np.arange(2), "packed", 64)
    assert abs(rej[0].item() - rej[1].item()) < 1e-6
    assert abs(rej[0].item() - naive_logps(model, p, r).item()) < 1e-4


def test_flex_block_mask_equals_bool_mask_forward(tmp_path):
    # the CUDA path's FlexAttention mask must allow exactly what the CPU bool mask allows (forward
    # only on CPU)
    data = PairData(make_data(tmp_path, n_train=12), "train", 64)
    model = tiny_model(3).eval()
    b = dpo.micro_batches(data, np.arange(12),
                          dpo.make_shape(Config(layout="packed", batch_size=12), [data], True, 128))[0]
    cpu = torch.device("cpu")
    with torch.no_grad():
        h_bool = model.hidden(b.idx, pos=b.pos, attn_mask=dpo.attention_mask(b.doc, b.branch))
        h_flex = model.hidden(b.idx, pos=b.pos, attn_mask=dpo.flex_block_mask(b.doc, b.branch))
    real = (b.doc >= 0)[..., None]  # padding rows differ by design (zeros vs. attending to themselves)
    torch.testing.assert_close(h_flex * real, h_bool * real, atol=1e-5, rtol=1e-5)
