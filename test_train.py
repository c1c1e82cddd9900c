"""
Training (dpo.train and dpo.py's command line): reference modes, every loss type learning a
preference, the compiled forward and bf16 against eager float32, building ahead, DDP and FSDP
against one process, TRL's options in training (MPO, f-divergences, LD-DPO, WPO, TR-DPO), and option
and data errors.
"""
import dataclasses
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import dpo
from dpo import LOSS_TYPES, Config, PairData, parse_config, train
from testlib import (assert_one_error, assert_same_runs, cli, compiled_run, logsig, main_error, make_data,
                     naive_logps, random_pairs, read_metrics, run_dpo, tiny_args, tiny_cfg,
                     tiny_model, torchrun_args, write_shard)


# -----------------------------------------------------------------------------
# reference modes, overfitting


def test_frozen_and_cached_reference_give_the_same_losses(tmp_path):
    data_dir = make_data(tmp_path)
    h_cached = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "a"), reference="cached"))
    # stored beside the shards
    assert any(n.startswith("ref_logps_train_") for n in os.listdir(data_dir))
    h_model = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "b"), reference="model"))
    for a, b in zip(h_cached, h_model):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a["margin"] - b["margin"]) < 1e-5
    # policy == reference at step 0
    assert h_cached[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_overfit_a_handful_of_pairs(tmp_path):
    data_dir = make_data(tmp_path, n_train=8, n_val=4)
    hist = train(tiny_cfg(tmp_path, data_dir, max_iters=60, learning_rate=3e-3, beta=0.5,
                          eval_interval=0))
    assert hist[-1]["accuracy"] == 1.0
    assert hist[-1]["loss"] < 0.2 < math.log(2)


# -----------------------------------------------------------------------------
# every loss type moves the preferences the right way (a broken sign or scale fails here)


def signal_pairs(n, seed):
    """chosen responses are made of tokens 1-50, rejected of 51-100: a preference a tiny model learns in steps"""
    rng = np.random.default_rng(seed)
    return [(rng.integers(200, 300, rng.integers(2, 6)), np.r_[rng.integers(1, 51, rng.integers(2, 6)), 50256],
             np.r_[rng.integers(51, 101, rng.integers(2, 6)), 50256]) for _ in range(n)]


# rpo is sigmoid plus the chosen NLL. (discopop's default tau = 0.05 pushes the margin negative
# at z = 0, as on the toy task in README, but at beta 0.5 and this learning rate it gets past that
# within the 12 steps)
SETTINGS = {"rpo": dict(loss_type="sigmoid", sft_weight=1.0)}


@pytest.mark.parametrize("name", [t for t in LOSS_TYPES if t != "sft"] + ["rpo"])
def test_every_loss_type_learns_the_preference(tmp_path, name):
    d = tmp_path / "data"
    d.mkdir()
    write_shard(d / "train_000000.bin", signal_pairs(32, 0))
    write_shard(d / "val_000000.bin", signal_pairs(16, 1))
    kw = dict(loss_type=name, max_iters=12, eval_interval=12, learning_rate=1e-2, warmup_iters=0,
              min_lr=1e-2, global_batch_size=16, batch_size=16, n_layer=1,
              beta=0.5) | SETTINGS.get(name, {})
    hist = train(tiny_cfg(tmp_path, str(d), **kw))
    val = read_metrics(str(tmp_path / "out"))[-1]
    # policy = reference at the start: no margin yet
    assert hist[0]["accuracy"] == 0.0 or name in ("simpo", "orpo", "reward")
    # the preference is learned, on held-out pairs too
    assert val["val/accuracy"] >= 0.75, (name, val)
    assert hist[-1]["loss"] < hist[0]["loss"], name


# -----------------------------------------------------------------------------
# the compiled forward and bf16 against eager float32; the next step built ahead


@pytest.mark.parametrize("flex", [False, True])
def test_compiled_forward_is_one_graph_for_every_batch_of_a_shape(tmp_path, flex):
    # the trainer's compiled region: mask (a BlockMask built from the ids, or the bool mask),
    # transformer, response positions, chunked log-probs and sums. new pairs, same fixed shape: one
    # graph, equal to the eager bool-mask forward. flex runs forward-only on CPU, which is enough
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    data = PairData(make_data(tmp_path, n_train=24), "train", 64)
    model = tiny_model(4).eval()
    compiled = dpo.SequenceLogps(model, compile=True, chunk=16, flex=flex)
    shape = dpo.make_shape(Config(layout="packed", batch_size=4, pack_rows=1), [data], fixed=True,
                           multiple=128)
    mbs = [b for i in range(0, 24, 8) for b in dpo.micro_batches(data, np.arange(i, i + 8), shape)]
    # different pairs and pair counts, one shape
    assert len(mbs) >= 4 and len({len(b.pair_ids) for b in mbs}) > 1
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
    # compile=true with the static packed shape: the same losses as eager, and the compiled hidden()
    # is traced once for training and once for evaluation (no_grad), not once per micro-batch
    from torch._dynamo.utils import counters
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=4, eval_interval=2, pack_rows=2)  # compiled: the fixed packed shape
    eager = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "eager"), **kw))
    torch._dynamo.reset()
    counters.clear()
    compiled = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "compiled"),
                              compile="true", **kw))
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
    assert 1 <= counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("layout", ["packed", "plain"])
def test_compiled_steps_equal_eager_and_trace_nothing_after_the_first(tmp_path, layout):
    # the whole forward is compiled (mask, transformer, gather, chunked lm_head, sums); fixed shapes
    # and padded response tokens: the steps after the first (new pairs, other pair counts) add no
    # graph
    data_dir = make_data(tmp_path)
    kw = dict(eval_interval=0, pack_rows=2, layout=layout, logprob_chunk=32)

    def run(mode, steps):
        return compiled_run(tmp_path, data_dir, mode, steps, **kw)
    (eager, _), (compiled, graphs), (_, graphs_1) = run("false", 5), run("true", 5), run("true", 1)
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]
    assert graphs == graphs_1 == 1


def test_bf16_autocast_training_tracks_float32(tmp_path):
    # the GPU default is bf16 autocast; on CPU the same code path runs with CPU autocast. log-probs
    # and the loss stay float32, so the losses follow the float32 run closely
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=4, eval_interval=0)
    f32 = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "f32"), dtype="float32", **kw))
    bf16 = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "bf16"), dtype="bfloat16",
                          **kw))
    for a, b in zip(f32, bf16):
        assert math.isfinite(b["loss"]) and abs(a["loss"] - b["loss"]) < 2e-2
        assert abs(a["chosen_logp"] - b["chosen_logp"]) < 0.02 * abs(a["chosen_logp"])


@pytest.mark.parametrize("layout,reference", [("packed", "cached"), ("packed", "model"),
                                              ("plain", "cached"), ("plain", "model")])
def test_prefetch_on_and_off_train_bit_for_bit(tmp_path, layout, reference):
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=5, eval_interval=0, layout=layout, reference=reference)
    runs = [train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / str(p)), prefetch=p, **kw))
            for p in (True, False)]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]
    assert [r["grad_norm"] for r in runs[0]] == [r["grad_norm"] for r in runs[1]]
    on, off = (torch.load(tmp_path / str(p) / "ckpt.pt", weights_only=True)["model"] for p in (True, False))
    assert all(torch.equal(on[k], off[k]) for k in on)


def test_an_error_while_building_ahead_is_the_same_one_line_error(tmp_path, monkeypatch, capsys):
    # the next step's micro-batches are built in the main process (no thread, no worker): a bad
    # shard or any other failure there ends the run as it would have one step later, and leaves no
    # thread behind
    import threading
    data_dir = make_data(tmp_path)
    real, calls = dpo.micro_batches, []

    def failing(data, ids, shape):
        calls.append(len(ids))
        # step 1's pairs, built ahead while step 0 runs (calls 1-2: the reference pass)
        if len(calls) == 4:
            raise ValueError(f"{data.data_dir}/train_000000.bin: lengths sum to 1 tokens, "
                             "the header says 2 (corrupted)")
        return real(data, ids, shape)
    monkeypatch.setattr(dpo, "micro_batches", failing)
    threads = threading.active_count()
    with pytest.raises(SystemExit) as e:
        dpo.main(tiny_args(tmp_path, data_dir, eval_interval=0, max_iters=6))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and re.fullmatch(r"error: .*train_000000\.bin: .*\(corrupted\)", err[0])
    assert threading.active_count() == threads and not os.path.exists(tmp_path / "out" / "ckpt.pt")


# -----------------------------------------------------------------------------
# several processes: DDP and FSDP ranks against one process


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_torchrun_ddp_and_fsdp_equal_one_process(tmp_path, layout):
    # the same losses, grad norms and final weights from 1 process, 2 DDP ranks and 2 FSDP ranks
    # (gloo, float32)
    data_dir = make_data(tmp_path)
    args = torchrun_args(data_dir, layout)
    one = run_dpo(tmp_path, "one", args)
    assert_same_runs(one, run_dpo(tmp_path, "ddp", args, nproc=2))
    assert_same_runs(one, run_dpo(tmp_path, "fsdp", args + ["--fsdp=true"], nproc=2))


# -----------------------------------------------------------------------------
# TRL's DPO options in training: LD-DPO, WPO, combined losses (MPO), TR-DPO


def naive_token_logps(model, p, resp):
    """per response token, from full float64 softmaxes: log p(y_t) and log sum_v p(v)^2"""
    idx = torch.from_numpy(np.concatenate([p, resp]).astype(np.int64))[None]
    logp = F.log_softmax(model(idx)[0].double(), -1)[len(p) - 1: len(p) - 1 + len(resp)]  # (n, V)
    return logp[torch.arange(len(resp)), torch.from_numpy(resp.astype(np.int64))], torch.logsumexp(2 * logp, -1)


def option_logps(model, data, ids, layout, **kw):
    """pair id -> (chosen sum, rejected sum, WPO weight or None) through the trainer's micro-batches"""
    shape = dpo.make_shape(Config(layout=layout.split("-")[0], batch_size=3), [data],
                           fixed=not layout.endswith("step"), multiple=8)
    module, out = dpo.SequenceLogps(model, chunk=7, **kw), {}
    for b in dpo.micro_batches(data, ids, shape):
        c, r, w = dpo.batch_logps(module, b)
        for k, i in enumerate(b.pair_ids):
            out[int(i)] = (c[k].item(), r[k].item(), None if w is None else w[k].item())
    return out


@pytest.mark.parametrize("layout", ["plain", "packed", "packed-step"])
def test_ld_alpha_and_wpo_weights_match_a_naive_loop(tmp_path, layout):
    # LD-DPO: tokens past the shorter response of the pair count alpha times; WPO: w = exp(mean_t
    # (log p(y_t) - log sum_v p(v)^2)) per response, the pair's weight w_chosen * w_rejected; both
    # against full softmaxes
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
    train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "c"), reference="cached",
                   max_iters=1))
    caches = [n for n in os.listdir(data_dir) if n.startswith("ref_logps_train_")]
    # the key includes ld_alpha
    assert len(caches) == 2 and sum("_ld0.5_" in n for n in caches) == 1


def test_combined_loss_run_is_the_weighted_sum_of_its_single_losses_step_by_step(tmp_path, monkeypatch):
    # TRL's MPO example. every training micro-step also evaluates each single loss on the same
    # log-probs; the run's loss must be their weighted sum at every step (while it trains, lr > 0),
    # and at step 0 (same weights) the separate single-loss runs' losses weighted and summed
    data_dir = make_data(tmp_path)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    orig, parts = dpo.dpo_loss, []

    def spy(*args, **kw):
        if torch.is_grad_enabled():  # training (evaluation runs under no_grad)
            detached = [a.detach() if torch.is_tensor(a) else a for a in args]
            parts.append([orig(*detached, **{**kw, "loss_type": t, "loss_weights": None})[0].sum().item()
                          for t in types])
        return orig(*args, **kw)

    monkeypatch.setattr(dpo, "dpo_loss", spy)
    kw = dict(max_iters=4, learning_rate=3e-3, eval_interval=0)
    hist = train(tiny_cfg(tmp_path, data_dir, loss_type=",".join(types), loss_weights="0.8,0.2,1.0",
                          **kw))
    monkeypatch.setattr(dpo, "dpo_loss", orig)
    # micro-batches per step (packed: the same count every step here)
    per_step = len(parts) // len(hist)
    assert per_step * len(hist) == len(parts)
    for k, h in enumerate(hist):
        sums = np.sum(parts[k * per_step: (k + 1) * per_step], axis=0) / 8  # global_batch_size 8
        assert h["loss"] == pytest.approx(float(np.dot(weights, sums)), rel=1e-6), k
    single = [train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / t), loss_type=t,
                             **kw))[0]["loss"] for t in types]
    assert hist[0]["loss"] == pytest.approx(float(np.dot(weights, single)), rel=1e-6)


@pytest.mark.parametrize("kw", [dict(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.0"),
                                dict(loss_type="ipo", sft_weight=0.5, use_weighting=True)])
def test_combined_losses_log_each_term_and_their_weighted_sum_is_the_loss(tmp_path, kw):
    data_dir = make_data(tmp_path)
    train(tiny_cfg(tmp_path, data_dir, max_iters=3, learning_rate=3e-3, **kw))
    terms = dpo.loss_terms(tiny_cfg(tmp_path, data_dir, **kw))
    recs = read_metrics(tmp_path / "out")
    assert [r["iter"] for r in recs] == [0, 0, 1, 2, 3]  # eval 0, steps 0-2, eval 3
    for r in recs:
        pre = "val/" if "val/loss" in r else ""
        total = sum(w * r[f"{pre}loss/{t}"] for t, w in terms)
        assert total == pytest.approx(r[f"{pre}loss"], rel=1e-6), r
    # one loss type alone: no terms logged
    train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "one"), max_iters=1))
    assert not [k for r in read_metrics(tmp_path / "one") for k in r if "loss/" in k]


ISSUE21_OPTIONS = {
    "mpo": dict(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.0"),
    "js_ipo": dict(loss_type="ipo", f_divergence_type="js_divergence"),
    "alpha": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    "orpo": dict(loss_type="orpo"),
    "ld_alpha": dict(ld_alpha=0.3),
    "wpo": dict(use_weighting=True, loss_type="sigmoid,sft"),
    "tr_dpo": dict(reference="model", sync_ref_model=True, ref_model_sync_steps=1,
                   ref_model_mixup_alpha=0.5),
}


@pytest.mark.parametrize("name", ISSUE21_OPTIONS)
def test_issue21_options_packed_equals_plain(tmp_path, name):
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=3, eval_interval=3, learning_rate=3e-3, **ISSUE21_OPTIONS[name])
    runs = [train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / lay), layout=lay, **kw))
            for lay in ("plain", "packed")]
    for a, b in zip(*runs):
        assert (a["loss"] == pytest.approx(b["loss"], rel=1e-5)
                and a["margin"] == pytest.approx(b["margin"], rel=1e-4, abs=1e-6))
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert runs[0][-1]["loss"] != runs[0][0]["loss"]  # it trained


def test_issue21_options_compiled_equals_eager(tmp_path):
    # every option at once (weights, f-divergence, LD-DPO, WPO, TR-DPO syncing every step) through
    # torch.compile
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=3, eval_interval=3, pack_rows=2, learning_rate=3e-3,
              loss_type="sigmoid,sft", loss_weights="1,0.5", f_divergence_type="js_divergence",
              ld_alpha=0.5, use_weighting=True, reference="model", sync_ref_model=True,
              ref_model_sync_steps=1)
    eager = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "eager"), **kw))
    torch._dynamo.reset()
    compiled = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "compiled"),
                              compile="true", **kw))
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
    assert eager[-1]["loss"] != eager[0]["loss"]


def test_tr_dpo_reference_after_a_sync_is_the_mix_and_the_next_step_uses_it(tmp_path, capsys):
    # sync after optimizer steps tau, 2 tau, ... (TRL's SyncRefModelCallback,
    # global_step % tau == 0): with tau = 2 the reference after step 2 is 0.6 * policy
    # + 0.4 * reference, and step index 2 (the third) is scored against it
    data_dir = make_data(tmp_path)
    kw = dict(reference="model", learning_rate=3e-3, eval_interval=0, sync_ref_model=True,
              ref_model_sync_steps=2, ref_model_mixup_alpha=0.6)
    hist = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "a"), max_iters=2, **kw))
    synced = [l for l in capsys.readouterr().out.splitlines() if "synced" in l]
    assert synced == ["iter 1: TR-DPO reference synced: 0.6 * policy + 0.4 * reference"]
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    # the first reference
    init = checkpoint.load_model("scratch", tiny_cfg(tmp_path, data_dir)).state_dict()
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
        lp = {(n, i): [naive_logps(m, data[i][0], data[i][j]) for j in (1, 2)]
              for n, m in (("p", policy), ("r", ref)) for i in ids}
    z = [0.1 * ((lp["p", i][0] - lp["r", i][0]) - (lp["p", i][1] - lp["r", i][1])) for i in ids]
    assert third[2]["loss"] == pytest.approx(float(np.mean([-logsig(float(x)) for x in z])), rel=1e-5)
    # tau = 3: no sync within two steps, the reference is the first one exactly
    train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "c"), max_iters=2,
                   **{**kw, "ref_model_sync_steps": 3}))
    ck3 = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(v, init[k]) for k, v in ck3["ref_model"].items())


def test_tr_dpo_prefetch_on_equals_off(tmp_path):
    # the step after a sync is not built ahead (its reference log-probs would come from the
    # reference before the sync)
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=5, eval_interval=0, reference="model", sync_ref_model=True,
              ref_model_sync_steps=2, learning_rate=3e-3)
    runs = [train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / str(p)), prefetch=p, **kw))
            for p in (True, False)]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]


# -----------------------------------------------------------------------------
# option and data errors: one `error:` line naming the option or file, before any work


def test_config_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError,
                       match=r"unknown config key 'learning_rat'.*did you mean learning_rate.*valid keys: out_dir"):
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


@pytest.mark.parametrize("bad, pattern", [
    (["--loss_type=sigmoid,dpo"],
     r"--loss_type=sigmoid,dpo: expected one of sigmoid \| .* \(or a comma list\)"),
    (["--loss_type=sigmoid,"], r"--loss_type=sigmoid,: expected one of"),
    (["--loss_weights=0.8,0.2"],
     r"--loss_weights=0.8,0.2: expected 1 comma-separated numbers, one per --loss_type"),
    (["--loss_type=sigmoid,sft", "--loss_weights=1,x"],
     r"--loss_weights=1,x: expected 2 comma-separated numbers"),
    (["--f_divergence_type=kl"],
     r"--f_divergence_type=kl: expected one of reverse_kl \| forward_kl \| js_divergence"),
    (["--f_divergence_type=forward_kl", "--loss_type=sigmoid,nca_pair"],
     r"--f_divergence_type=forward_kl works with --loss_type sigmoid \| .* only .*, not nca_pair$"),
    (["--f_divergence_type=js_divergence", "--loss_type=orpo"],
     r"js_divergence works with .* not orpo$"),
    (["--ld_alpha=1.5"], r"--ld_alpha=1.5: must be in \[0, 1\]"),
    (["--ld_alpha=0.5", "--loss_type=sft"],
     r"^error: --ld_alpha=0.5: not with sft alone \(ld_alpha weighs the tokens past a pair's shorter"),
    (["--f_alpha_divergence_coef=nan"], r"--f_alpha_divergence_coef=nan: expected a finite number$"),
    (["--loss_weights=1e999"], r"--loss_weights=1e999: each weight must be finite and >= 0$"),
    (["--loss_type=sigmoid,sft", "--loss_weights=1,-0.5"], r"--loss_weights=1,-0.5: each weight must be"),
    (["--loss_type=sigmoid,sft", "--loss_weights=0,0"],
     r"--loss_weights=0,0: all zero, the run would learn nothing$"),
    (["--sft_weight=-1"], r"--sft_weight=-1.0: must be >= 0$"),
    (["--loss_type=sigmoid,sigmoid"], r"--loss_type=sigmoid,sigmoid .*: a loss type twice"),
    (["--loss_type=sft", "--sft_weight=1"], r"--loss_type=sft \(with --sft_weight=1.0\): a loss type twice"),
    (["--beta2=1"], r"--beta2=1.0: must be in \[0, 1\)$"),
    (["--discopop_tau=0"], r"--discopop_tau=0.0: must be > 0$"),
    (["--use_weighting=true", "--loss_type=sigmoid,aot_pair"],
     r"--use_weighting=true: not with --loss_type aot_pair"),
    (["--sync_ref_model=true"], r"--sync_ref_model=true needs --reference=model"),  # tiny_cfg: reference cached
    (["--sync_ref_model=true", "--reference=model", "--loss_type=simpo"],
     r"and a loss type with a reference"),
    (["--sync_ref_model=true", "--reference=model", "--ref_model_mixup_alpha=2"],
     r"--ref_model_mixup_alpha=2.0: must be in"),
    (["--ref_model_sync_steps=0"], r"--ref_model_sync_steps=0: must be > 0"),
])
def test_issue21_bad_options_are_one_line_before_any_work(tmp_path, capsys, bad, pattern):
    data_dir = make_data(tmp_path)
    main_error(capsys, tiny_args(tmp_path, data_dir) + bad, pattern)
    assert not (tmp_path / "out").exists() and sorted(os.listdir(data_dir)) == ["train_000000.bin", "val_000000.bin"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_every_float_option_must_be_finite(value):
    floats = [f.name for f in dataclasses.fields(Config) if f.type is float]
    assert len(floats) > 15
    for name in floats:
        shown = re.escape(str(float(value)))
        with pytest.raises(ValueError, match=rf"^--{name}={shown}: expected a finite number$"):
            parse_config([f"--{name}={value}"])


def test_help_the_old_mode_option_and_no_cuda_from_the_command_line(tmp_path):
    r = cli("dpo.py", "--help")
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert (re.search(r"^  --beta=0\.1 +strength of the KL leash", r.stdout, re.M)
            and "  --device=auto" in r.stdout)
    r = cli("dpo.py", "--mode=compare", "--init_from=out/toy_dpo")  # the CLI before sample.py
    assert_one_error(r.returncode, r.stderr,
                     r"unknown config key 'mode' .*python sample\.py --mode=sample\|compare\|demo")
    if not torch.cuda.is_available():
        r = cli("dpo.py", "--device=cuda", f"--out_dir={tmp_path / 'out'}")
        assert_one_error(r.returncode, r.stderr,
                         r"--device=cuda, but this torch sees no CUDA GPU \(try --device=cpu\)")
        assert not (tmp_path / "out").exists()


def test_help_lists_the_trl_options():
    text = __import__("configurator").help_text(Config)
    for opt in ("--loss_weights=", "--f_divergence_type=reverse_kl",
                "--f_alpha_divergence_coef=0.5", "--ld_alpha=1.0", "--use_weighting=False",
                "--sync_ref_model=False", "--ref_model_mixup_alpha=0.6",
                "--ref_model_sync_steps=512"):
        assert re.search(rf"^  {re.escape(opt)} +\S", text, re.M), opt


def test_missing_data_is_reported_before_the_weights_load(tmp_path, monkeypatch):
    # a user without data should not wait for a GPT-2 download first
    monkeypatch.setattr(checkpoint, "load_model", lambda *a: pytest.fail("weights loaded before the data was checked"))
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        train(tiny_cfg(tmp_path, str(tmp_path / "nothing"), init_from="gpt2"))


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
    main_error(capsys, tiny_args(tmp_path, data_dir),
               re.escape(data_dir) + r": the train split has no pairs")
    assert not [f for f in os.listdir(data_dir) if f.startswith("ref_logps")]
    assert not (tmp_path / "out" / "ckpt.pt").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_block_size_comes_from_the_data_when_the_model_is_made_from_scratch(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    longest = max(len(p) + max(len(c), len(r)) for s in (0, 1) for p, c, r in random_pairs((24, 8)[s], 300, s))
    cfg = parse_config(tiny_args(tmp_path, data_dir, max_iters=1,
                                 eval_interval=0)[:-1] + ["--block_size=0"])
    assert cfg.block_size == 0 and Config.block_size == 0
    train(dataclasses.replace(cfg, block_size=0))
    assert torch.load(os.path.join(cfg.out_dir, "ckpt.pt"),
                      weights_only=True)["model_config"]["block_size"] == longest
    long = tmp_path / "long"
    long.mkdir()
    pairs = random_pairs(4, 300, 0)
    pairs[1] = (np.arange(1000) % 300, np.r_[np.arange(99), 50256], pairs[1][2])
    # one pair of 1100 tokens: GPT-2's 1024 positions, then the flag
    write_shard(long / "train_000000.bin", pairs)
    main_error(capsys, [f"--data_dir={long}", f"--out_dir={tmp_path / 'o'}", "--n_layer=1",
                        "--n_embd=32", "--n_head=2",
                        "--device=cpu"], r"1 pairs are longer than block_size=1024 .* Set --truncate=true to cut them")


# -----------------------------------------------------------------------------
# what a run says: the reference pass, the end of a run


def test_the_reference_pass_says_its_size_eta_and_how_to_skip_it_first(tmp_path, capsys):
    data_dir = make_data(tmp_path, n_train=40)
    train(tiny_cfg(tmp_path, data_dir, batch_size=1, max_iters=1, eval_interval=0))
    out = capsys.readouterr().out
    first = out.index("reference log-probs train: 40 pairs, computed once and cached beside the shards "
                      "(--reference=model skips this pass")
    # the eta after the first chunk
    assert first < out.index("reference log-probs train: 16/40 pairs, eta ")


def test_dpo_from_scratch_says_its_reference_is_the_same_random_model(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    note = "note: --init_from=scratch: the policy and its reference are the same random model"
    for loss_type, said in (("sigmoid", True), ("sft", False), ("simpo", False)):
        train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / loss_type), loss_type=loss_type, max_iters=0))
        out = capsys.readouterr().out
        assert (note in out) == said and (said is False or "--config=config/toy_sft.py" in out), loss_type


def test_a_data_dir_with_the_same_val_shards_reuses_their_reference_cache(tmp_path, capsys):
    # online rounds: each round's train pairs differ, its val shards are the first round's (and
    # their cache is copied beside them): the val reference is not computed again
    data_dir = make_data(tmp_path)
    train(tiny_cfg(tmp_path, data_dir, max_iters=1))
    assert "reference log-probs val: 8 pairs" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other / "train_000000.bin", random_pairs(20, 300, 7))
    shutil.copy(Path(data_dir) / "val_000000.bin", other)
    for cache in Path(data_dir).glob("ref_logps_val_*.pt"):
        shutil.copy(cache, other)
    train(tiny_cfg(tmp_path, str(other), out_dir=str(tmp_path / "o2"), max_iters=1))
    out = capsys.readouterr().out
    assert "reference log-probs train: 20 pairs" in out and "reference log-probs val" not in out
    assert len(list(other.glob("ref_logps_*.pt"))) == 2


def test_the_end_of_a_run_says_where_its_result_is(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    for kw, end in ((dict(), "saved {o}/ckpt.pt (step 2); metrics in {o}/metrics.jsonl"),
                    (dict(export_hf=True),
                     "saved {o}/ckpt.pt (step 2) and {o}/hf (transformers); metrics in {o}/metrics.jsonl"),
                    (dict(save_checkpoint=False),
                     "finished step 2, no checkpoint (--save_checkpoint=false); metrics in "
                                                  "{o}/metrics.jsonl")):
        o = str(tmp_path / f"out{len(kw) and list(kw)[0]}")
        capsys.readouterr()
        dpo.main(tiny_args(tmp_path, data_dir, out_dir=o, max_iters=2, **kw))
        assert capsys.readouterr().out.strip().splitlines()[-1] == end.format(o=o)
        assert os.path.isfile(f"{o}/ckpt.pt") == kw.get("save_checkpoint", True)
        assert os.path.isfile(f"{o}/hf/model.safetensors") == kw.get("export_hf", False)
