"""
Generation and the scripts built on it: generate against naive loops (greedy, sampling, the KV
cache), sample.py (sample, compare, the demo) and online.py (sample, judge, train, in rounds) end to
end.
"""
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiktoken
import torch
import torch.nn.functional as F

import configurator
import dpo
import launch
import judges
import model as model_module
import online as online_module
import prepare as P
import sample as sample_module
import shards
import testlib
import toy
from dpo import train
from testlib import (assert_one_error, cli, make_data, our_tiny, read_metrics, sample_cfg,
                     tiny_args, tiny_cfg, tokens)


# -----------------------------------------------------------------------------
# generation against naive loops: greedy, sampling, eos, the KV cache


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



def test_kv_cache_decode_matches_full_forward():
    """the prompt into a KVCache, then one token at a time: the logits of one causal forward"""
    m = our_tiny()
    idx = tokens(2, 12)
    cache = model_module.KVCache(m.config.n_layer, 12)
    with torch.no_grad():
        full = m(idx)
        steps = [m(idx[:, :5], cache=cache)]
        steps += [m(idx[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KVCache holds 12 positions, 13 were asked for"):
        m(idx[:, :1], cache=cache)


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
    # prompt + 14 new tokens > 16 for the longer rows: the window slides there
    m = our_tiny(block_size=16)
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (3, 9, 1, 6)]
    T = max(map(len, prompts))
    # right-aligned, any padding token
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    pad = torch.tensor([T - len(p) for p in prompts])
    # eos: a token row 0 makes
    for eos in (None, naive_generate(m, prompts, 3, 0.0, None, None, None)[0][2]):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        ref = naive_generate(m, prompts, 14, temperature, top_k, eos, g2)
        out = m.generate(idx, 14, temperature, top_k, eos_token_id=eos, generator=g1, pad_left=pad)
        assert out[:, T:].tolist() == ref and torch.equal(out[:, :T], idx)
    # no padding: the same as today's batched call
    same = torch.tensor([prompts[1][:5], prompts[3][:5]])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ref = naive_generate(m, same.tolist(), 8, temperature, top_k, None, g2)
    assert m.generate(same, 8, temperature, top_k, eos_token_id=None,
                      generator=g1)[:, 5:].tolist() == ref
    with pytest.raises(ValueError, match="pad_left"):
        m.generate(idx, 2, pad_left=torch.tensor([0, 0, T, 0]))


# -----------------------------------------------------------------------------
# sample.py: sample, compare, the demo


def test_sample_policy_and_reference_side_by_side(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=2)
    train(cfg)
    ck = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    # the config travels with the checkpoint
    assert ck["ref_from"] == "scratch" and ck["config"]["max_iters"] == 2
    sample_module.sample(sample_cfg(tmp_path, data_dir, init_from=cfg.out_dir, prompts="a|b\\nc",
                                    max_new_tokens=3, temperature=0.0), torch.device("cpu"))
    out = capsys.readouterr().out
    assert out.count("--- policy:") == 2 and out.count("--- reference (scratch):") == 2
    assert "=== 'b\\nc'" in out  # "\n" in --prompts is a newline


def test_toy_pipeline_sft_then_dpo_then_compare(tmp_path, capsys):
    # the demo's stages end to end on a tiny scale: the table is produced and its numbers are sane
    data_dir = str(tmp_path / "toy")
    P.prepare(P.parse_args(["--dataset=toy", "--toy_pairs=300", f"--out_dir={data_dir}", "--num_workers=1"]), log=None)
    model_kw = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, eval_interval=0,
                    global_batch_size=16, batch_size=16)
    sft = tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "sft"), loss_type="sft", max_iters=4,
                   **model_kw)
    hist = train(sft)
    assert hist[-1]["rejected_logp"] == 0.0  # sft never runs the rejected responses
    dpo_cfg = tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "dpo"), init_from=sft.out_dir,
                       max_iters=3, **model_kw)
    hist = train(dpo_cfg)
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the SFT model is the reference
    res = sample_module.compare(sample_cfg(tmp_path, data_dir, init_from=dpo_cfg.out_dir,
                                           num_samples=2, max_new_tokens=8),
                                torch.device("cpu"))
    out = capsys.readouterr().out
    assert "reward, greedy" in out
    # one JSON line for scripts
    assert json.loads(out.strip().splitlines()[-1])["init_from"] == dpo_cfg.out_dir
    for side in ("reference", "policy"):
        assert -1.0 <= res[side]["greedy"] <= 1.0 and -1.0 <= res[side]["sampled"] <= 1.0
        assert 0.0 <= res[side]["acc"] <= 1.0
    assert math.isfinite(res["kl"])


def test_demo_runs_from_any_folder(tmp_path, monkeypatch):
    # the demo's recipe files live beside dpo.py; its data and checkpoints go under the current
    # folder; each stage trains into out/NAME.tmp, which replaces out/NAME once done
    import prepare as prep
    seen = []

    def fake_train(cfg, continue_with=None):
        os.makedirs(cfg.out_dir)
        (Path(cfg.out_dir) / "ckpt.pt").write_text("new")
        seen.append(("train", cfg, continue_with))

    monkeypatch.setattr(prep, "prepare", lambda args: seen.append(("prepare", args, None)))
    monkeypatch.setattr(dpo, "train", fake_train)
    monkeypatch.setattr(sample_module, "compare", lambda cfg, device: seen.append(("compare", cfg, None)))
    monkeypatch.chdir(tmp_path)
    os.makedirs("out/toy_sft")
    Path("out/toy_sft/ckpt.pt").write_text("earlier")
    sample_module.demo()
    assert [k for k, _, _ in seen] == ["prepare", "train", "train", "compare"]
    sft, dpo_cfg, cmp = (c for k, c, _ in seen[1:])
    assert sft.loss_type == "sft" and sft.out_dir == "out/toy_sft.tmp"
    assert dpo_cfg.loss_type == "sigmoid" and dpo_cfg.init_from == "out/toy_sft"
    assert cmp.init_from == "out/toy_dpo" and cmp.data_dir == "data/toy"
    assert seen[1][2] == "python sample.py --mode=demo"  # what a stopped stage says to rerun
    assert sorted(os.listdir("out")) == ["toy_dpo", "toy_sft"]
    assert Path("out/toy_sft/ckpt.pt").read_text() == "new"


def test_sample_py_says_what_it_needs_that_a_model_is_untrained_and_its_progress(tmp_path, capsys):
    r = cli("sample.py", "--mode=compare")
    assert_one_error(r.returncode, r.stderr,
                     r"--init_from=scratch records no reference model to compare against: "
                                             r"pass a DPO checkpoint, e\.g\. --config=config/toy_dpo\.py --init_from=")
    with pytest.raises(ValueError, match=r"--top_k=-1 .*top_k >= 0"):
        sample_module.main(["--top_k=-1", "--device=cpu"])
    data_dir = make_data(tmp_path, n_val=3)
    sample_module.sample(sample_cfg(tmp_path, data_dir, prompts="hi", max_new_tokens=2),
                         torch.device("cpu"))
    assert "init_from=scratch is an untrained random model" in capsys.readouterr().out
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=1, eval_interval=0)
    train(cfg)
    capsys.readouterr()
    sample_module.compare(sample_cfg(tmp_path, data_dir, init_from=cfg.out_dir, num_samples=2,
                                     max_new_tokens=4),
                          torch.device("cpu"))
    assert re.search(r"compare: 1/3 prompts, \d+s", capsys.readouterr().err)


def test_sample_py_offline_tokenizer_error_is_its_own_one_line(tmp_path):
    # no network (every download goes to a closed local port) and an empty tiktoken cache
    no_net = "http://127.0.0.1:9"
    env = {**{k: no_net for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")},
           "NO_PROXY": "", "no_proxy": "", "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")}
    r = cli("sample.py", "--prompts=hi", "--device=cpu", env=env)
    assert_one_error(r.returncode, r.stderr,
                     r"could not load tiktoken's GPT-2 tokenizer .*SHA-1 of its URL")
    assert "prepare.py" not in r.stderr


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


# -----------------------------------------------------------------------------
# online.py: sample, judge and train in rounds, end to end


@pytest.fixture(scope="module")
def toy_sft(tmp_path_factory):
    """toy data and a tiny model trained with SFT until its samples hold sentiment words (so the toy judge
    rarely ties)"""
    root = tmp_path_factory.mktemp("toy_online")
    data = root / "data"
    P.prepare(P.parse_args(["--toy_pairs=300", f"--out_dir={data}", "--num_workers=1"]), log=None)
    train(tiny_cfg(root, str(data), out_dir=str(root / "sft"), loss_type="sft", max_iters=40, eval_interval=0,
                   learning_rate=1e-2, global_batch_size=16, batch_size=16))
    return root


def online_cfg(tmp_path, toy_sft, **kw):
    base = dataclasses.asdict(tiny_cfg(tmp_path, str(toy_sft / "data"), init_from=str(toy_sft / "sft"), max_iters=4,
                                       global_batch_size=4, batch_size=4, eval_interval=0))
    return online_module.OnlineConfig(**base | dict(rounds=2, prompts_per_round=6, num_samples=2,
                                                    max_new_tokens=12) | kw)


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
        shard = shards.load_pairs(str(d / "pairs" / "train_000000.bin"))
        assert len(rows) == len(shard) == cfg.prompts_per_round
        for i, row in enumerate(rows):
            strip = lambda s: s.replace("<|endoftext|>", "")
            assert row["chosen_score"] == score(row["prompt"], strip(row["chosen"])) > \
                   row["rejected_score"] == score(row["prompt"], strip(row["rejected"]))
            assert [enc.decode(x.tolist()) for x in shard[i]] == [row["prompt"], row["chosen"],
                                                                  row["rejected"]]
        ck = torch.load(d / "ckpt.pt", weights_only=True)
        assert ck["iter_num"] == (r + 1) * cfg.max_iters // cfg.rounds
        # not the previous round: the reference stays SFT
        assert ck["ref_from"] == os.path.abspath(cfg.init_from)
        its = [m["iter"] for m in read_metrics(str(d)) if "loss" in m]
        assert its == list(range(r * cfg.max_iters // cfg.rounds, ck["iter_num"]))
        assert json.loads((d / "round.json").read_text())["pairs"] == cfg.prompts_per_round


def test_online_toy_judge_end_to_end_and_resume(tmp_path, toy_sft, capsys):
    cfg = online_cfg(tmp_path, toy_sft)
    online_module.online(cfg)
    check_rounds(cfg, lambda p, r: toy.toy_reward(r))
    out = capsys.readouterr().out
    assert "round 1 sampling: 6/6 pairs from 6 prompts, eta" in out  # progress while sampling
    # the val pairs' reference log-probs: computed in round 0, reused by round 1 (only the train ones are new)
    assert out.count("reference log-probs val: 56 pairs, computed once") == 1
    assert out.count("reference log-probs train: 6 pairs, computed once") == 2
    r0, r1 = (torch.load(tmp_path / "out" / f"round_00{r}" / "ckpt.pt", weights_only=True)["model"] for r in (0, 1))
    assert any(not torch.equal(r0[k], r1[k]) for k in r0)  # round 1 trained further
    # stopped in round 1: it is done again from round 0's checkpoint, the same pairs; round 0 is not
    # touched
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
def test_online_bad_judge_is_one_clear_error_and_done_rounds_stay(tmp_path, toy_sft, monkeypatch,
                                                                  body, pattern):
    # round 0 judged well (a rerun may not change the judge: the judge goes bad in round 1)
    wrapped = "import os\n" + body.replace("def score", "def bad") + (
        "def score(prompt, response):\n    if os.environ.get('JUDGE_GOOD'):\n"
        "        return float(len(response))\n    return bad(prompt, response)\n")
    spec = write_judge(tmp_path, monkeypatch, f"judge_bad{len(body)}", wrapped)
    monkeypatch.setenv("JUDGE_GOOD", "1")
    online_module.online(online_cfg(tmp_path, toy_sft, judge=spec, rounds=1, max_iters=2))
    monkeypatch.delenv("JUDGE_GOOD")
    r0 = tmp_path / "out" / "round_000"
    before = {p: p.read_bytes() for p in r0.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=rf"^judge {spec} {pattern}") as e:
        online_module.online(online_cfg(tmp_path, toy_sft, judge=spec))
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in r0.rglob("*") if p.is_file()} == before  # round 0 intact
    assert not (tmp_path / "out" / "round_001").exists()  # nothing half-written for round 1
    with pytest.raises(ValueError, match="could not load"):
        online_module.main([f"--judge={spec}x", "--device=cpu"])


def test_online_with_a_reward_model_judge_runs_two_rounds(tmp_path, toy_sft):
    # a reward model trained on the toy pairs (from the SFT model) judges online DPO's samples, batched
    rm = tiny_cfg(tmp_path, str(toy_sft / "data"), out_dir=str(tmp_path / "rm"), init_from=str(toy_sft / "sft"),
                  loss_type="reward", max_iters=4, eval_interval=0)
    train(rm)
    spec = f"rm:{rm.out_dir}"
    cfg = online_cfg(tmp_path, toy_sft, judge=spec)
    records = online_module.online(cfg)
    assert [r["round"] for r in records] == [0, 1]
    judge = __import__("judges").load_judge(spec)
    for r in range(cfg.rounds):  # best over worst by the judge, re-scored here one pair at a time
        d = Path(cfg.out_dir) / f"round_{r:03d}"
        rows = [json.loads(line) for line in open(d / "pairs" / "pairs.jsonl")]
        assert len(rows) == cfg.prompts_per_round
        for row in rows:
            strip = lambda s: s.replace("<|endoftext|>", "")
            assert row["chosen_score"] > row["rejected_score"]
            for side in ("chosen", "rejected"):
                again = judge([row["prompt"]], [strip(row[side])])[0]
                assert row[f"{side}_score"] == pytest.approx(again, abs=1e-5)
        assert torch.load(d / "ckpt.pt", weights_only=True)["iter_num"] == (r + 1) * cfg.max_iters // cfg.rounds


# -----------------------------------------------------------------------------
# stops, reruns, the lock, the judge's time and the option checks (issue 29), as users run them


def online_args(tmp_path, toy_sft, **kw):
    """online_cfg as online.py's command-line options (those that differ from the defaults)"""
    cfg = dataclasses.asdict(online_cfg(tmp_path, toy_sft, **kw))
    return [f"--{k}={v}" for k, v in cfg.items() if v != getattr(online_module.OnlineConfig, k)]


def run_signalled(tmp_path, script, args, target, sig, nth=1, after=False, cwd=None):
    """script run as users run it, with `sig` sent to itself at the nth call of target
    ("module.function"; before the call, or after it): a stop that lands at an exact moment"""
    module, name = target.rsplit(".", 1)
    wrapper = tmp_path / f"signal_{name}.py"
    wrapper.write_text(f"""import importlib, os, runpy, signal, sys
sys.path.insert(0, {str(testlib.ROOT)!r})
module = importlib.import_module({module!r})
original = module.{name}
calls = []
def hooked(*args, **kwargs):
    calls.append(1)
    if len(calls) == {nth} and not {after}:
        os.kill(os.getpid(), signal.{sig})
    out = original(*args, **kwargs)
    if len(calls) == {nth} and {after}:
        os.kill(os.getpid(), signal.{sig})
    return out
module.{name} = hooked
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({str(testlib.ROOT / script)!r}, run_name="__main__")
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(wrapper), *args], cwd=cwd or testlib.ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("moment, target, sig, nth, after", [
    ("sampling", "judges.score", "SIGINT", 1, False),
    ("reference pass", "dpo.compute_reference", "SIGTERM", 1, False),
    ("mid-round", "dpo.get_lr", "SIGTERM", 1, False),
    ("last step of a round", "checkpoint.finish", "SIGINT", 1, False),
    ("between rounds", "rounds.write_json", "SIGTERM", 2, True),  # after round 0's round.json
])
def test_online_stop_anywhere_is_one_line_with_the_command_and_no_further_round(
        tmp_path, toy_sft, moment, target, sig, nth, after):
    args = online_args(tmp_path, toy_sft)
    command = shlex.join(["python", str(testlib.ROOT / "online.py"), *args])  # this command
    r = run_signalled(tmp_path, "online.py", args, target, sig, nth, after)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    out = tmp_path / "out"
    if moment in ("mid-round", "last step of a round"):  # dpo.train saved the round's checkpoint
        step = 0 if moment == "mid-round" else 1
        said = r.stderr.strip().splitlines()
        assert said == [f"{sig}: stopping after this step (again to quit now)"]
        expected = (f"stopped after step {step}: saved {out / 'round_000' / 'ckpt.pt'}; "
                    f"continue with: {command}")
        assert r.stdout.strip().splitlines()[-1] == expected
    else:  # one line (in the reference pass dpo.train's own), with the online.py command
        [last] = r.stderr.strip().splitlines()
        assert last.endswith(f"continue with: {command}")
        if moment != "reference pass":
            assert last.startswith(f"{sig}: online.py stopped")
    assert not (out / "round_001").exists() and "round 1" not in r.stdout  # no further round
    assert (out / "round_000" / "round.json").exists() == (moment == "between rounds")
    assert not list(out.rglob("*.tmp*"))  # nothing half-written
    if moment in ("mid-round", "last step of a round"):
        again = cli("online.py", *args)  # the command it printed goes on
        assert again.returncode == 0, again.stderr[-3000:]
        check_rounds(online_cfg(tmp_path, toy_sft), lambda p, r: toy.toy_reward(r))


def test_online_rerun_prints_changes_refuses_mixing_and_zero_step_rounds(tmp_path, toy_sft,
                                                                          capsys):
    online_module.online(online_cfg(tmp_path, toy_sft, rounds=1, max_iters=2))
    out = tmp_path / "out"
    assert json.loads((out / "online.json").read_text())["judge"] == "toy"
    capsys.readouterr()
    online_module.online(online_cfg(tmp_path, toy_sft, rounds=1, max_iters=2))  # a no-op says so
    assert capsys.readouterr().out.strip() == (f"online: the 1 rounds in {out} are done already, "
                                               f"nothing to do (raise --rounds and --max_iters to "
                                               f"train more)")
    mixing = (r"--num_samples=3, --judge=toyx would mix rounds \(num_samples=2, judge=toy "
              r"there\): drop them to continue the run as it was")
    with pytest.raises(ValueError, match=mixing):
        online_module.online(online_cfg(tmp_path, toy_sft, rounds=1, max_iters=2, judge="toyx",
                                        num_samples=3))
    zero = (r"^--rounds=2 --max_iters=2: round 1 would train 0 steps \(round 0 ended at step 2\): "
            r"raise --max_iters \(--max_iters=4 keeps 2 steps")
    with pytest.raises(ValueError, match=zero):
        online_module.online(online_cfg(tmp_path, toy_sft, rounds=2, max_iters=2))
    capsys.readouterr()
    online_module.online(online_cfg(tmp_path, toy_sft, rounds=2, max_iters=4, beta=0.2))
    printed = capsys.readouterr().out.splitlines()
    for change in ("rounds 1 -> 2", "max_iters 2 -> 4", "beta 0.1 -> 0.2"):
        assert f"online: {change}" in printed
    saved = json.loads((out / "online.json").read_text())
    assert (saved["rounds"], saved["beta"]) == (2, 0.2) and not list(out.glob("*.tmp"))
    assert json.loads((out / "round_001" / "round.json").read_text())["iter"] == 4


def test_online_lock_and_stale_pairs_tmp(tmp_path, toy_sft):
    args = online_args(tmp_path, toy_sft, rounds=1, max_iters=2)
    out = tmp_path / "out"
    stale = out / "round_000" / "pairs.tmp"
    stale.mkdir(parents=True)
    (stale / "train_000000.bin").write_bytes(b"cut short by a kill")
    with launch.lock(str(out)):  # another online.py holds out_dir
        r = cli("online.py", *args)
    assert_one_error(r.returncode, r.stderr, rf"out_dir={out} is in use by another running trainer")
    # the loser touched nothing
    assert stale.exists() and not (out / "round_000" / "pairs").exists()
    r = cli("online.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not stale.exists() and (out / "round_000" / "round.json").exists()


def test_judges_batched_bad_specs_and_a_judge_that_hangs(tmp_path, toy_sft, monkeypatch):
    toy_judge = judges.load_judge("toy")
    assert toy_judge(["a", "b"], ["great", "awful"]) == [toy.toy_reward("great"), toy.toy_reward("awful")]
    body = "def score(prompt, response):\n    return len(response)\n"
    spec = write_judge(tmp_path, monkeypatch, "judge_len", body)
    assert judges.score(judges.load_judge(spec), spec, ["p", "q"], ["ab", "c"]) == [2.0, 1.0]
    for bad, pattern in [("nosuchmodule:f", "could not load it"),
                         ("os:nothing", "could not load it"), ("os:sep", "is not a function")]:
        with pytest.raises(ValueError, match=rf"^--judge={bad}:? {pattern}"):
            judges.load_judge(bad)
    short = r"^judge short returned list \[1\.0\] for 2 responses: expected a list of 2"
    with pytest.raises(ValueError, match=short):
        judges.score(lambda prompts, responses: [1.0], "short", ["p", "q"], ["a", "b"])
    # a judge that hangs (and catches Exception) ends in one line naming it, after judge_timeout
    body = ("import time\ndef score(prompt, response):\n    try:\n        time.sleep(60)\n"
            "    except Exception:\n        pass\n    return 1.0\n")
    spec = write_judge(tmp_path, monkeypatch, "judge_hangs", body)
    t0 = time.time()
    hangs = (rf"^judge {spec} gave no answer within --judge_timeout=0\.5 seconds \(prompt '.*', "
             r"response '.*'\): fix the judge, or raise --judge_timeout")
    with pytest.raises(ValueError, match=hangs):
        online_module.online(online_cfg(tmp_path, toy_sft, judge=spec, judge_timeout=0.5))
    assert time.time() - t0 < 30
    assert not list((tmp_path / "out").rglob("pairs*"))


def test_sample_and_online_refuse_bad_options_in_one_line(tmp_path):
    r = cli("sample.py", "--prompts=a|", "--device=cpu")
    assert_one_error(r.returncode, r.stderr, r"--prompts=a\|: prompt 2 of 2 is empty")
    for argv, pattern in [
            (["--max_new_tokens=0"], r"--max_new_tokens=0: expected max_new_tokens >= 1"),
            (["--temperature=nan"], r"--temperature=nan: expected a finite number"),
            (["--temperature=-1"], r"--temperature=-1\.0: expected temperature >= 0"),
            (["--num_samples=3"], r"--num_samples=3: the samples per prompt of --mode=compare"),
            (["--mode=demo", "--max_iters=5"], r"--mode=demo .* no other options \(got --max_iters=5 ")]:
        with pytest.raises(ValueError, match=pattern):
            sample_module.main(argv + ["--device=cpu"])
    for argv, pattern in [(["--temperature=inf"], r"--temperature=inf: expected a finite number"),
                          (["--temperature=0"], r"--temperature=0\.0: must be > 0"),
                          (["--judge_timeout=nan"], r"--judge_timeout=nan: expected a finite number"),
                          (["--beta=1e999"], r"--beta=inf: expected a finite number"),
                          (["--max_new_tokens=-1"], r"--max_new_tokens=-1: must be >= 1")]:
        with pytest.raises(ValueError, match=pattern):
            online_module.main(argv + ["--device=cpu"])
    (tmp_path / "inf.py").write_text("beta = 1e999\n")
    with pytest.raises(ValueError, match=r"inf\.py:1: beta expects a finite number, got inf"):
        online_module.main([f"--config={tmp_path / 'inf.py'}"])


def test_online_help_lists_an_override_once():
    text = configurator.help_text(online_module.OnlineConfig)
    assert text.count("--init_from=") == 1
    assert "--init_from=out/toy_sft" in text and "the fixed reference of every round" in text
    assert text.count("--judge_timeout=60.0") == 1 and "system:" in text and "loss:" in text


def test_sample_py_stop_is_one_line_and_the_demo_keeps_the_earlier_sft(tmp_path, toy_sft):
    # sample mode, Ctrl-C while loading
    args = ["--prompts=hi", "--device=cpu"]
    r = run_signalled(tmp_path, "sample.py", args, "checkpoint.load_model", "SIGINT")
    command = shlex.join(["python", str(testlib.ROOT / "sample.py"), *args])
    assert r.returncode == 130 and r.stderr.strip().splitlines() == [
        f"SIGINT: sample.py stopped, nothing half-written; continue with: {command}"]
    # the demo, stopped in its SFT stage: the earlier SFT checkpoint is untouched
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copytree(toy_sft / "data", work / "data" / "toy")
    shutil.copytree(toy_sft / "sft", work / "out" / "toy_sft")
    sft = work / "out" / "toy_sft"
    before = {p: p.read_bytes() for p in sft.rglob("*") if p.is_file()}
    r = run_signalled(tmp_path, "sample.py", ["--mode=demo"], "dpo.get_lr", "SIGTERM", nth=2, cwd=work)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == ("stopped after step 1: saved out/toy_sft.tmp/ckpt.pt; "
                                                 "continue with: python sample.py --mode=demo")
    assert {p: p.read_bytes() for p in sft.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(work / "out")) == ["toy_sft", "toy_sft.tmp"]
