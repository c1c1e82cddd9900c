"""
A learned judge (issue 27): the reward model (reward.py, --loss_type=reward) against a naive forward
and on a separable set, resumed and under torchrun; judge specs (judges.py), their one-line errors;
judged evaluation while training (judged.py, --eval_judge); the clustered standard error; compare's
reference numbers that never move with the policy.
"""
import json
import math

import numpy as np
import pytest
import torch

import checkpoint
import dpo
import judged
import judges
import reward
import sample as sample_module
from dpo import Config, PairData, train
from testlib import (assert_one_error, cli, main_error, make_data, read_metrics, run_dpo,
                     sample_cfg, tiny_cfg, tiny_model, torchrun_args, write_shard)


# -----------------------------------------------------------------------------
# the reward model's forward: the scalar head at each response's last token


def naive_rewards(model, pair):
    """one sequence at a time, plain causal forward: the head at prompt + response's last token"""
    p, c, r = pair
    out = []
    for resp in (c, r):
        seq = np.concatenate([p, resp]).astype(np.int64)
        h = model.hidden(torch.from_numpy(seq)[None])[0, -1]
        out.append(model.score(h).squeeze())
    return out


@pytest.mark.parametrize("layout", ["plain", "packed", "packed-fixed"])
def test_scalar_head_equals_a_naive_per_sequence_forward_values_and_gradients(tmp_path, layout):
    data = PairData(make_data(tmp_path, n_train=12), "train", 64)
    ids = np.arange(len(data))
    weights = torch.randn(len(data), 2, generator=torch.Generator().manual_seed(0))  # d loss / d r

    def trained_model():
        model = reward.with_head(tiny_model(seed=3), seed=4)
        with torch.no_grad():
            model.score.weight.mul_(10)
        return model

    model = trained_model()
    shape = dpo.make_shape(Config(layout=layout.split("-")[0], batch_size=5), [data],
                           fixed=layout.endswith("fixed"))
    module = dpo.SequenceLogps(model, scalar=True)
    got = {}
    total = 0.0
    for b in dpo.micro_batches(data, ids, shape):
        out = dpo.batch_logps(module, b)
        for k, i in enumerate(b.pair_ids):
            got[int(i)] = (out.chosen[k].item(), out.rejected[k].item())
        j = torch.from_numpy(b.pair_ids)
        total = total + (out.chosen * weights[j, 0]).sum() + (out.rejected * weights[j, 1]).sum()
    total.backward()

    naive = trained_model()
    want_total = 0.0
    for i in ids:
        rc, rr = naive_rewards(naive, data[i])
        assert got[int(i)] == pytest.approx((rc.item(), rr.item()), abs=1e-5), i
        want_total = want_total + rc * weights[i, 0] + rr * weights[i, 1]
    want_total.backward()
    grads = dict(naive.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_with_head_is_seeded_and_kept_on_resume():
    a = reward.with_head(tiny_model(seed=0), seed=5)
    b = reward.with_head(tiny_model(seed=1), seed=5)
    assert a.config.reward_head and torch.equal(a.score.weight, b.score.weight)
    assert reward.with_head(a, seed=6).score.weight is a.score.weight  # a head already: kept


# -----------------------------------------------------------------------------
# training a reward model: a separable set, resume, torchrun


def separable_pairs(n, seed):
    """chosen responses of tokens 1-50, rejected of 51-100: a reward model separates them in steps"""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt = rng.integers(200, 300, rng.integers(2, 6))
        chosen = np.r_[rng.integers(1, 51, rng.integers(2, 6)), 50256]
        rejected = np.r_[rng.integers(51, 101, rng.integers(2, 6)), 50256]
        pairs.append((prompt, chosen, rejected))
    return pairs


def separable_data(tmp_path):
    d = tmp_path / "sep"
    d.mkdir()
    write_shard(d / "train_000000.bin", separable_pairs(64, 0))
    write_shard(d / "val_000000.bin", separable_pairs(32, 1))
    return str(d)


def test_reward_model_learns_a_separable_set_and_its_judge_scores_like_it(tmp_path):
    data_dir = separable_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, loss_type="reward", max_iters=20, eval_interval=20,
                   n_layer=1, learning_rate=1e-2, min_lr=1e-3, warmup_iters=0, global_batch_size=16,
                   batch_size=16, center_rewards_coefficient=0.01)
    hist = train(cfg)
    val = read_metrics(cfg.out_dir)[-1]
    assert val["val/accuracy"] >= 0.95, val
    assert val["val/margin"] > 1 and hist[-1]["loss"] < hist[0]["loss"]
    # rm:PATH: the head at the end of prompt + response + EOT, as trained; batched = one at a time
    enc = sample_module.gpt2_encoding()
    judge = judges.load_judge(f"rm:{cfg.out_dir}")
    texts = ["Review of the tea:", "hi", "\n\nHuman: a longer prompt here\n\nAssistant:"]
    replies = [" good", " a much longer reply than the others", ""]
    model = checkpoint.load_model(cfg.out_dir, cfg).eval()
    want = []
    with torch.no_grad():
        for t, r in zip(texts, replies):
            seq = enc.encode_ordinary(t) + enc.encode_ordinary(r) + [50256]
            want.append(model.score(model.hidden(torch.tensor([seq]))[0, -1]).item())
    assert judges.score(judge, "rm", texts, replies) == pytest.approx(want, abs=1e-5)
    assert [judge([t], [r])[0] for t, r in zip(texts, replies)] == pytest.approx(want, abs=1e-5)


def test_reward_run_resumed_equals_one_run(tmp_path):
    data_dir = make_data(tmp_path)
    kw = dict(loss_type="reward", eval_interval=2, center_rewards_coefficient=0.1)
    whole = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "a"), max_iters=4, **kw))
    train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "b"), max_iters=2, **kw))
    resume = ["--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_iters=4"]
    rest = train(dpo.parse_config(resume))
    for x, y in zip(whole[2:], rest):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    a, b = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True) for n in ("a", "b"))
    assert a["model_config"]["reward_head"] and "score.weight" in a["model"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=0, msg=k)


def test_reward_model_under_torchrun_ddp_and_fsdp_equals_one_process(tmp_path):
    data_dir = make_data(tmp_path)
    args = torchrun_args(data_dir, "packed", loss_type="reward", reference="cached")
    one_metrics, one_weights = run_dpo(tmp_path, "one", args)
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp=true"])):
        metrics, weights = run_dpo(tmp_path, name, args + extra, nproc=2)
        for x, y in zip(one_metrics, metrics):
            for k in ("loss", "accuracy", "margin", "grad_norm", "val/loss", "val/accuracy"):
                if k in x:
                    assert x[k] == pytest.approx(y[k], abs=1e-5), (name, k)
        for k in one_weights:
            torch.testing.assert_close(one_weights[k], weights[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("bad, pattern", [
    (["--loss_type=reward,sigmoid"], r"--loss_type=reward,sigmoid: reward trains a reward model"),
    (["--loss_type=reward", "--sft_weight=1"], r"--sft_weight=1.0: not with --loss_type=reward"),
    (["--loss_type=reward", "--eval_judge=toy"], r"--eval_judge=toy: not with --loss_type=reward"),
    (["--center_rewards_coefficient=-1"], r"--center_rewards_coefficient=-1.0: must be >= 0"),
    (["--eval_judge=nope"], r"--eval_judge=nope: expected toy, module:function"),
    (["--eval_judge=toy", "--eval_judge_samples=0"], r"--eval_judge_samples=0: must be >= 1"),
])
def test_reward_and_eval_judge_options_are_one_line_before_any_work(tmp_path, capsys, bad, pattern):
    main_error(capsys, [f"--out_dir={tmp_path / 'out'}", "--device=cpu", *bad], pattern)
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# judge specs: every error is one line


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    data_dir = make_data(root)
    cfg = tiny_cfg(root, data_dir, out_dir=str(root / "rm"), loss_type="reward", max_iters=2,
                   eval_interval=0)
    train(cfg)
    policy = tiny_cfg(root, data_dir, out_dir=str(root / "policy"), max_iters=1, eval_interval=0)
    train(policy)
    return root


def test_every_judge_spec_error_is_one_line(rm_run, tmp_path, monkeypatch):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "ckpt.pt").write_text("not a checkpoint")
    (tmp_path / "judge_mod.py").write_text("constant = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {"": "could not load it", "toys": "could not load it", "rm:": "no checkpoint at ''",
             ":f": "could not load it",
             f"rm:{tmp_path}/none": "no checkpoint at",
             f"rm:{tmp_path}/garbage": "not a readable checkpoint",
             f"rm:{rm_run}/policy": "is not a reward model", "no_such_module:f": "could not load it",
             "judge_mod:missing": "could not load it", "judge_mod:constant": "is not a function"}
    for spec, pattern in cases.items():
        with pytest.raises(ValueError) as e:
            judges.load_judge(spec)
        assert pattern in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    r = cli("online.py", f"--judge=rm:{tmp_path}/none", "--device=cpu")
    assert_one_error(r.returncode, r.stderr, "no checkpoint at")


def test_score_checks_every_value_in_one_line():
    def judge(prompts, responses):
        return [1.0, float("inf")]
    with pytest.raises(ValueError, match=r"^judge j returned inf \(float\) for prompt 'b'"):
        judges.score(judge, "j", ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match=r"^judge j returned list \[0.5\] for 2 responses"):
        judges.score(lambda p, r: [0.5], "j", ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match=r"^judge j raised ZeroDivisionError: division by zero \(prompt"):
        judges.score(lambda p, r: [1 / 0], "j", ["a"], ["x"])
    toy = judges.load_judge("toy")
    assert judges.score(toy, "toy", ["p"], ["good good bad"]) == [pytest.approx(1 / 3)]


# -----------------------------------------------------------------------------
# statistics


def naive_clustered_sem(values, clusters):
    """the cluster-robust variance of a mean, written out:
    (n/(n-1)) sum_c (sum_{i in c} (x_i - mean))^2 / N^2, n clusters, N values"""
    mean = sum(values) / len(values)
    sums = {}
    for x, c in zip(values, clusters):
        sums[c] = sums.get(c, 0.0) + (x - mean)
    n = len(sums)
    return math.sqrt(n / (n - 1) * sum(s * s for s in sums.values()) / len(values) ** 2)


def test_clustered_sem_against_a_naive_computation():
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 9, 60)  # unequal clusters
    values = rng.normal(size=60) + clusters * 0.3
    want = naive_clustered_sem(values, clusters)
    assert judged.clustered_sem(values, clusters) == pytest.approx(want, rel=1e-12)
    # equal clusters: the standard deviation of the cluster means over sqrt(n)
    values = rng.normal(size=(30, 8)) + rng.normal(size=(30, 1))
    ids = np.repeat(np.arange(30), 8)
    want = values.mean(1).std(ddof=1) / math.sqrt(30)
    assert judged.clustered_sem(values.ravel(), ids) == pytest.approx(want, rel=1e-12)
    # correlated samples of a prompt: wider than the naive iid error
    assert judged.clustered_sem(values.ravel(), ids) > values.std() / math.sqrt(values.size)
    assert math.isnan(judged.clustered_sem([1.0, 2.0], [0, 0]))


def test_win_rates_count_ties_half():
    got = judged.win_rates([[1.0, 0.0]], [[0.0, 0.5, 1.0]])  # beats 0 and 0.5, ties 1; ties 0
    assert got[0].tolist() == pytest.approx([(1 + 1 + 0.5) / 3, 0.5 / 3])


# -----------------------------------------------------------------------------
# compare: the reference's numbers never move with the policy


def test_compare_reference_numbers_are_identical_with_two_policies(rm_run, tmp_path, capsys):
    data_dir = str(rm_run / "data")
    results = []
    # one policy barely moved, one that learned to end its responses (EOT): different lengths, so
    # a shared generator would hand the reference other numbers after the first prompt
    runs = (("dpo", dict(max_iters=2)), ("sft", dict(loss_type="sft", max_iters=30, learning_rate=3e-2)))
    for name, kw in runs:
        cfg = tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / name), eval_interval=0, **kw)
        train(cfg)
        compare_cfg = sample_cfg(tmp_path, data_dir, init_from=cfg.out_dir, num_samples=3, max_new_tokens=6)
        results.append(sample_module.compare(compare_cfg, torch.device("cpu")))
    a, b = results
    assert a["reference"] == b["reference"]
    assert a["sampled_sem"]["reference"] == b["sampled_sem"]["reference"]
    assert a["kl"] != b["kl"]  # the policies differ
    assert a["prompts"] == 8 and math.isfinite(a["kl_sem"])
    assert "± clustered by prompt" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# --eval_judge: judged evaluation while training


JUDGE_FIELDS = ("reward", "ref_reward", "win_rate", "kl")


@pytest.mark.parametrize("spec", ["toy", "rm"])
def test_eval_judge_logs_its_fields_at_every_eval(rm_run, tmp_path, spec):
    spec = f"rm:{rm_run}/rm" if spec == "rm" else spec
    cfg = tiny_cfg(tmp_path, str(rm_run / "data"), max_iters=4, eval_interval=2, learning_rate=1e-2,
                   eval_judge=spec, eval_judge_prompts=5, eval_judge_samples=3, eval_judge_tokens=6)
    train(cfg)
    evals = [r for r in read_metrics(cfg.out_dir) if "val/loss" in r]
    assert [r["iter"] for r in evals] == [0, 2, 4]
    for r in evals:
        for name in JUDGE_FIELDS:
            assert math.isfinite(r[f"judge/{name}"]) and r[f"judge/{name}_se"] >= 0, (name, r)
        assert 0 <= r["judge/win_rate"] <= 1
    assert evals[0]["judge/kl"] == 0.0  # the policy is the reference at step 0
    assert evals[-1]["judge/kl"] != 0.0
    assert len({r["judge/ref_reward"] for r in evals}) == 1  # the reference sampled once
    # a resume samples the reference again: the same numbers
    more = dpo.parse_config(["--init_from=resume", f"--out_dir={cfg.out_dir}", "--max_iters=6"])
    train(more)
    evals = [r for r in read_metrics(cfg.out_dir) if "val/loss" in r]
    assert [r["iter"] for r in evals] == [0, 2, 4, 6]
    assert len({r["judge/ref_reward"] for r in evals}) == 1


def test_eval_judge_needs_val_pairs_and_short_samples(tmp_path):
    d = tmp_path / "noval"
    d.mkdir()
    write_shard(d / "train_000000.bin", separable_pairs(8, 0))
    with pytest.raises(ValueError, match=r"^--eval_judge=toy: .* has no val pairs"):
        train(tiny_cfg(tmp_path, str(d), eval_judge="toy"))
    data_dir = make_data(tmp_path)
    with pytest.raises(ValueError, match=r"^--eval_judge_tokens=64: must be < block_size 64$"):
        train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "b"), eval_judge="toy",
                       eval_judge_tokens=64))


def test_judged_eval_keys_reach_wandb_as_logged(rm_run, tmp_path, monkeypatch):
    # the record is one dict: wandb.log gets the same keys as metrics.jsonl
    logged = []
    fake = type("wandb", (), {"init": staticmethod(lambda **kw: None),
                              "log": staticmethod(lambda rec, step: logged.append(rec))})
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    cfg = tiny_cfg(tmp_path, str(rm_run / "data"), max_iters=1, eval_interval=1, wandb_log=True,
                   eval_judge="toy", eval_judge_prompts=2, eval_judge_samples=2, eval_judge_tokens=4)
    train(cfg)
    assert any("judge/win_rate_se" in r for r in logged)
    assert json.loads(open(f"{cfg.out_dir}/metrics.jsonl").readline())["judge/kl"] == 0.0


def test_eval_judge_under_torchrun_ddp_gathers_every_prompt(tmp_path):
    # two ranks split the prompts and all-reduce them: every field logged, the reference's numbers
    # the same at every eval, KL 0 while the policy is the reference
    data_dir = make_data(tmp_path)
    args = torchrun_args(data_dir, "packed", eval_judge="toy", eval_judge_prompts=5, eval_judge_samples=2,
                         eval_judge_tokens=4)
    metrics, _ = run_dpo(tmp_path, "ddp", args, nproc=2)
    evals = [r for r in metrics if "judge/kl" in r]
    assert [r["iter"] for r in evals] == [0, 2, 4] and evals[0]["judge/kl"] == 0.0
    assert len({r["judge/ref_reward"] for r in evals}) == 1
    assert all(math.isfinite(r[f"judge/{name}_se"]) for r in evals for name in JUDGE_FIELDS)


def test_a_reward_model_is_no_start_for_dpo(rm_run, tmp_path):
    cfg = tiny_cfg(tmp_path, str(rm_run / "data"), init_from=str(rm_run / "rm"), max_iters=1)
    with pytest.raises(ValueError, match=r"is a reward model \(--loss_type=reward\); --loss_type=sigmoid starts"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_a_reward_model_is_refused_by_export(rm_run, tmp_path):
    # GPT2LMHeadModel has no place for the scalar head: one line, nothing written
    r = cli("export.py", f"--init_from={rm_run / 'rm'}", f"--out_dir={tmp_path / 'hf'}")
    assert_one_error(r.returncode, r.stderr, r"is a reward model \(--loss_type=reward\): export writes a language")
    assert not (tmp_path / "hf").exists()
