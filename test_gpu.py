"""
The CUDA-only tests (they skip without a GPU), and .ci/gpu, the one command a GPU session runs,
dry-run on the CPU.
On a card: bash .ci/gpu, or these tests alone: python -m pytest -q test_gpu.py -k cuda
"""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import launch
import dpo
from dpo import Config, PairData, train
from testlib import ROOT, compiled_run, make_data, our_tiny, packed_inputs, tiny_cfg, tiny_model


CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs CUDA (FlexAttention kernels, bf16 autocast)")


# -----------------------------------------------------------------------------
# CUDA: FlexAttention vs the SDPA bool mask, the compiled step, bf16, no host-device sync


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="flex_attention kernels and bf16 autocast need CUDA")
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


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_flex_block_mask_equals_sdpa_bool_mask_values_and_grads(tmp_path, dtype):
    # the trainer's two masks for the packed layout: FlexAttention on CUDA, SDPA with a bool mask
    # elsewhere
    data = PairData(make_data(tmp_path, n_train=16), "train", 64)
    b = dpo.micro_batches(data, np.arange(16), dpo.make_shape(Config(batch_size=16), [data],
                                                              fixed=True, multiple=128))[0]
    model = tiny_model(5).cuda()
    out = []
    for flex in (False, True):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            c, r, _ = dpo.batch_logps(dpo.SequenceLogps(model, flex=flex),
                                      dpo.on_device(b, torch.device("cuda")))
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
    # new data every step, one fixed packed shape: the compiled run equals eager, and the steps
    # after the second (new pairs, same shape) trace no new graph (counted against a 2-step run:
    # flex and create_block_mask compile too)
    data_dir = make_data(tmp_path)
    kw = dict(device="cuda", dtype="float32", eval_interval=0, pack_rows=2)

    def run(mode, steps):
        return compiled_run(tmp_path, data_dir, mode, steps, **kw)
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


@CUDA
def test_cuda_micro_steps_never_wait_for_the_gpu(tmp_path):
    # a whole step's micro-batches (prepared ahead, as the trainer does) run forward, loss and
    # backward with any host-device synchronization an error
    data_dir = make_data(tmp_path, n_train=64)
    cfg = tiny_cfg(tmp_path, data_dir, device="cuda", compile="true", global_batch_size=32,
                   batch_size=8)
    run = launch.setup(cfg)
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
            for mb in mbs:
                step = dpo.micro_step(module, mb, run)
                (step.loss.losses.sum() * mb.weight).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(mbs) > 1


# -----------------------------------------------------------------------------
# .ci/gpu dry-run on the CPU (the full check, and the quick one: the packed bench alone)


def gpu_check(tmp_path, *args, rc=0):
    """bash .ci/gpu ARGS on generated pairs (the project never needs ../shared): its output and its table's rows"""
    rng = random.Random(0)
    words = "good bad fine awful great poor nice meh tasty bland".split()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(120):
            say = lambda n: " " + " ".join(rng.choices(words, k=rng.randint(2, n)))
            f.write(json.dumps({"prompt": f"Q{i}:" + say(20), "chosen": say(30), "rejected": say(30)}) + "\n")
    out = subprocess.run(["bash", ".ci/gpu", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600,
                         env={**os.environ, "HH": str(tmp_path / "pairs.jsonl"),
                              "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
                              "OMP_NUM_THREADS": "1"})
    assert out.returncode == rc, out.stdout[-3000:] + out.stderr[-3000:]
    path = tmp_path / "out" / "gpu_check.jsonl"
    return out, [json.loads(l) for l in open(path)] if path.exists() else []


def test_gpu_check_dry_runs_on_cpu(tmp_path):
    # .ci/gpu is the one command a GPU session runs; --cpu runs every stage with a tiny model, so
    # the script itself is known to work before any GPU does
    out, rows = gpu_check(tmp_path, "--cpu")
    assert [r["stage"] for r in rows] == ["CUDA tests", "bench plain", "bench packed",
                                          "torchrun ddp", "torchrun fsdp", "XL memory"]
    assert all(r["status"] == "ok" and r["pairs_per_s"] > 0 for r in rows[1:])
    assert "GPU check on CPU (dry run)" in out.stdout and "Name" in open(tmp_path / "out" / "profile.txt").read()


def test_gpu_quick_check_dry_runs_on_cpu(tmp_path):
    out, rows = gpu_check(tmp_path, "--quick", "--cpu")
    assert [r["stage"] for r in rows] == ["bench packed"]  # nothing else ran
    r = rows[0]
    assert r["status"] == "ok" and r["pairs_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mb"] > 0
    # a packed pair is its prompt once and both responses: 3 to ~100 tokens in this data
    # (at most 21 + 2 x 31 words)
    assert 3 < r["tokens_per_s"] / r["pairs_per_s"] < 100
    assert "GPU check on CPU (dry run)" in out.stdout and not (tmp_path / "out" / "tests.log").exists()
    (tmp_path / "typo").mkdir()
    # a typo runs nothing, and says so
    out, rows = gpu_check(tmp_path / "typo", "--quick", "--fast", rc=2)
    assert out.stderr.startswith("error: unknown option --fast") and rows == []
