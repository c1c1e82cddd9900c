# trainer tests: layouts against a naive loop, reference modes, resume, ddp, overfitting, config and data errors
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dpo
from dpo import Config, PairData, dpo_loss, parse_config, train
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    cfg = Config(layout=layout, batch_size=batch_size)
    module = dpo.SequenceLogps(model, chunk=7)  # a small chunk exercises the chunked lm_head
    chosen, rejected = {}, {}
    for b in dpo.micro_batches(data, ids, cfg, pack_len):
        c, r, nc, nr = dpo.batch_logps(module, b, torch.device("cpu"), use_flex=False)
        for k, i in enumerate(b.pair_ids):
            chosen[int(i)], rejected[int(i)] = c[k], r[k]
    return chosen, rejected


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_response_logps_match_naive_loop(tmp_path, layout):
    data = PairData(make_data(tmp_path), "train", 64)
    model = tiny_model()
    ids = np.arange(len(data))
    pack_len = dpo.layout_len(data, layout)
    chosen, rejected = layout_logps(model, data, ids, layout, pack_len)
    assert sorted(chosen) == list(range(len(data)))
    for i in ids:
        p, c, r = data[i]
        assert abs(chosen[i].item() - naive_logps(model, p, c).item()) < 1e-4
        assert abs(rejected[i].item() - naive_logps(model, p, r).item()) < 1e-4


def test_packing_puts_several_pairs_in_a_row(tmp_path):
    data = PairData(make_data(tmp_path), "train", 64)
    cfg = Config(layout="packed", batch_size=8)
    pack_len = dpo.layout_len(data, "packed")
    mbs = dpo.micro_batches(data, np.arange(len(data)), cfg, pack_len)
    assert sum(len(b.pair_ids) for b in mbs) == len(data)
    assert max(len(b.pair_ids) for b in mbs) > mbs[0].idx.shape[0]  # more pairs than rows: rows are shared
    for b in mbs:  # fixed shapes, and the prompt is laid once per pair
        assert b.idx.shape[1] == pack_len
        assert b.n_tokens == sum(int(data.lengths[i].sum()) for i in b.pair_ids)


def packed_vs_plain(model, data, ids):
    """per-pair log-probs, losses and gradients of both layouts"""
    out = {}
    for layout in ("plain", "packed"):
        model.zero_grad()
        c, r = layout_logps(model, data, ids, layout, dpo.layout_len(data, layout), batch_size=4)
        pc = torch.stack([c[int(i)] for i in ids])
        pr = torch.stack([r[int(i)] for i in ids])
        losses, _, _ = dpo_loss(pc, pr, pc.detach() * 0.9, pr.detach() * 1.1, beta=0.1)
        losses.sum().backward()
        out[layout] = (pc.detach(), pr.detach(), losses.detach(), [p.grad.clone() for p in model.parameters()])
    return out


def assert_same_layouts(out):
    a, b = out["plain"], out["packed"]
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    for ga, gb in zip(a[3], b[3]):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


def test_packed_equals_plain_random_pairs(tmp_path):
    data = PairData(make_data(tmp_path, n_train=16), "train", 64)
    assert_same_layouts(packed_vs_plain(tiny_model(1), data, np.arange(16)))


HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")


@pytest.mark.skipif(not os.path.exists(HH), reason="needs ../shared/data (the real HH-RLHF pairs)")
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


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_torchrun_two_ranks_equal_one_process(tmp_path, layout):
    data_dir = make_data(tmp_path)
    args = [f"--data_dir={data_dir}", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64",
            "--global_batch_size=8", "--batch_size=2", "--max_iters=4", "--eval_interval=2", "--device=cpu",
            "--compile=false", "--learning_rate=1e-3", f"--layout={layout}", "--reference=model"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "dpo.py", f"--out_dir={tmp_path}/one", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dpo.py",
                          f"--out_dir={tmp_path}/two", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = read_metrics(f"{tmp_path}/one"), read_metrics(f"{tmp_path}/two")
    assert [r["iter"] for r in a] == [r["iter"] for r in b] and len(a) >= 6
    for x, y in zip(a, b):
        for k in x:
            if k.startswith("val/") or k in ("loss", "accuracy", "margin", "chosen_reward", "grad_norm"):
                assert abs(x[k] - y[k]) < 1e-5, (k, x, y)


# -----------------------------------------------------------------------------
# config and data errors


def test_config_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*did you mean learning_rate.*valid keys: mode"):
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
    assert data.n_cut > 0
    for i in range(len(data)):
        p, c, r = data[i]
        full = data._raw(i)
        assert len(p) + max(len(c), len(r)) <= 16 and len(c) > 0 and len(r) > 0
        assert list(p) == list(full[0][len(full[0]) - len(p):])  # the prompt kept its end
        assert list(c) == list(full[1][: len(c)])  # responses kept their start
