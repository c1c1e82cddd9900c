"""
Checkpoints and resume (checkpoint.py, through dpo.py): resume continues the run bit for bit, what
it may change and what it refuses, unreadable checkpoints and caches, a full disk, signals, one
trainer per out_dir. Every failure is one `error:` line naming the file or option, with nothing
half-written left behind; nothing is silently wrong and no step is lost. Where the message is the
point the CLI runs as users run it, or its main() in-process (the same code prints the same line)
where a process per case would be too slow.
"""
import dataclasses
import errno
import io
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import dpo
import launch
import sample as sample_module
from dpo import train
from model import GPT
from testlib import (ROOT, assert_one_error, assert_same_runs, cli, main_error, make_data,
                     random_pairs, read_metrics, run_dpo, sample_cfg, tiny_args, tiny_cfg,
                     torchrun_args, write_shard)


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# resume continues the run as it was, bit for bit


def test_resume_is_bit_exact(tmp_path):
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, dropout=0.1)
    full = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "full"), **kw))
    half = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "half"),
                          **{**kw, "max_iters": 4}))
    rest = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "half"), init_from="resume",
                          **kw))
    assert [h["loss"] for h in full] == [h["loss"] for h in half + rest]
    assert [h["iter"] for h in rest] == [4, 5, 6, 7]


def test_resume_with_sync_ref_model_is_bit_exact(tmp_path):
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=6, lr_decay_iters=6, eval_interval=3, dropout=0.1, reference="model",
              sync_ref_model=True, ref_model_sync_steps=2,
              learning_rate=3e-3)  # syncs after steps 2, 4, 6; the checkpoint at 3 holds one
    full = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "full"), **kw))
    half = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "half"),
                          **{**kw, "max_iters": 3}))
    rest = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "half"), init_from="resume",
                          **kw))
    assert [h["loss"] for h in full] == [h["loss"] for h in half + rest]
    assert [h["iter"] for h in rest] == [3, 4, 5]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("full", "half"))
    assert all(torch.equal(v, b["ref_model"][k]) for k, v in a["ref_model"].items())


def test_fsdp_checkpoint_resumes_with_another_world_size(tmp_path):
    # an FSDP checkpoint is one full ckpt.pt: 2 sharded ranks stop at step 2, 1 rank (FSDP, then
    # plain) continues, and the result equals a run that never stopped (metrics.jsonl holds both
    # parts)
    data_dir = make_data(tmp_path)
    args = torchrun_args(data_dir, "packed", reference="cached", lr_decay_iters=4)
    full = run_dpo(tmp_path, "full", args)
    _, half = run_dpo(tmp_path, "half", args + ["--max_iters=2", "--fsdp=true", "--export_hf=true"], nproc=2)
    exported = GPT.from_pretrained(f"{tmp_path}/half/hf").state_dict()  # the full weights, gathered
    assert all(torch.equal(exported[k], half[k]) for k in half)
    for name in ("fsdp1", "plain"):
        shutil.copytree(f"{tmp_path}/half", f"{tmp_path}/{name}")
    assert_same_runs(full, run_dpo(tmp_path, "fsdp1", args + ["--init_from=resume", "--fsdp=true"],
                                   nproc=1))
    assert_same_runs(full, run_dpo(tmp_path, "plain", args + ["--init_from=resume"]))


TIMING = ("ms", "pairs_per_s", "tokens_per_s", "flops_per_s", "mfu")


def run_args(tmp_path, data_dir, out_dir, **kw):
    """a tiny run as a user starts it: data, length and model on the command line, everything else the defaults"""
    base = dict(data_dir=data_dir, out_dir=out_dir, max_iters=8, eval_interval=2, n_layer=1,
                n_head=2, n_embd=32, global_batch_size=8, batch_size=4, dropout=0.1,
                log_interval=1) | kw  # device auto: here the cpu
    return [f"--{k}={v}" for k, v in base.items()]


def same_run(a, b):
    """metrics.jsonl without the timings, and the final weights: equal to the bit"""
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING} for r in recs]
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    wa, wb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def interrupt(args, after, sig):
    """dpo.py as a user runs it, sent `sig` once it printed the line starting with `after`"""
    p = subprocess.Popen([sys.executable, "dpo.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
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
    # kill -9 after a checkpoint and two more steps (they are redone, and logged once), or Ctrl-C
    # (it stops after the step): `--init_from=resume --out_dir=X` alone then ends exactly where the
    # run that never stopped ends
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


def test_resume_rebuilds_a_scratch_reference_from_the_checkpoint_not_the_command_line(tmp_path):
    # the resumed run's command line names another model size: its policy and its reference still
    # come from the checkpoint, so it continues exactly as a run that never stopped (it used to
    # build a different random reference)
    data_dir = make_data(tmp_path)
    kw = dict(max_iters=4, lr_decay_iters=4, eval_interval=2, reference="model")
    full = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "full"), **kw))
    half = tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "half"), **{**kw, "max_iters": 2})
    train(half)
    ck = torch.load(os.path.join(half.out_dir, "ckpt.pt"), weights_only=True)
    other = dict(n_layer=3, n_head=4, n_embd=48, block_size=32)
    rest = train(tiny_cfg(tmp_path, data_dir, out_dir=half.out_dir, init_from="resume",
                          **{**kw, "max_iters": 3}, **other))
    rest += train(tiny_cfg(tmp_path, data_dir, out_dir=half.out_dir, init_from="resume", **kw, n_layer=1))  # twice
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[2:]]
    # sample.py's "reference (scratch)" is that model too, whatever seed and size its command line
    # says
    cfg = sample_cfg(tmp_path, data_dir, init_from=half.out_dir, seed=7, **other)
    _, reference, ref_from = sample_module.load_pair_of_models(cfg, torch.device("cpu"))
    assert ref_from == "scratch" and checkpoint.weights_hash(reference) == ck["ref_hash"]


# -----------------------------------------------------------------------------
# what resume may change, and what it refuses


def test_resume_prints_what_the_command_line_changes_and_refuses_what_would_break_the_run(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    out_dir = str(tmp_path / "run")
    dpo.main(run_args(tmp_path, data_dir, out_dir, max_iters=2, eval_interval=0))
    ck = Path(out_dir) / "ckpt.pt"
    before = ck.read_bytes()
    resume = ["--init_from=resume", f"--out_dir={out_dir}"]
    refused = {"--seed=7": "seed=1337", "--loss_type=ipo": "loss_type=sigmoid",
               "--global_batch_size=16": "global_batch_size=8", "--layout=plain": "layout=packed",
               "--reference=model": "reference=cached", "--truncate=true": "truncate=false",
               "--n_layer=2": "n_layer=1", "--n_embd=64": "n_embd=32",
               "--block_size=256": r"block_size=\d+", "--bias=false": "bias=true"}
    for arg, was in refused.items():
        main_error(capsys, resume + [arg],
                   rf"^error: resume: {arg} would break the run in {re.escape(str(ck))} "
                   rf"\({was} there\): drop it to continue the run as it was, or start a new run from its weights: "
                   rf"--init_from={re.escape(str(ck))} --out_dir=NEW$")
    main_error(capsys, resume + ["--seed=7", "--n_layer=2"],
               r"--seed=7, --n_layer=2 would break .*drop them")
    (tmp_path / "c.py").write_text("seed = 7\n")  # a --config file names its options too
    main_error(capsys, resume + [f"--config={tmp_path / 'c.py'}"],
               r"--seed=7 would break .*drop it \(from the command "
               rf"line or {re.escape(str(tmp_path / 'c.py'))}\) to continue")
    # other data under the run's data_dir, or another data_dir: refused; the same data moved: a
    # change
    (tmp_path / "o").mkdir()
    other = make_data(tmp_path / "o", seed=5)
    main_error(capsys, resume + [f"--data_dir={other}"],
               rf"resume: {re.escape(other)} holds other data than the run in "
               rf"{re.escape(str(ck))} trained on \(from {re.escape(data_dir)}\)")
    # every breaking option named at once, the data too
    main_error(capsys, resume + ["--seed=7", f"--data_dir={other}", "--n_layer=2"],
               rf"resume: --seed=7, --n_layer=2, --data_dir={re.escape(other)} \(other data\) "
               rf"would break the run in {re.escape(str(ck))} \(seed=1337, n_layer=1, "
               rf"data_dir={re.escape(data_dir)} there\)")
    assert ck.read_bytes() == before and sorted(os.listdir(out_dir)) == [".lock", "ckpt.pt", "metrics.jsonl"]
    moved = str(tmp_path / "moved")
    shutil.copytree(data_dir, moved)
    dpo.main(resume + [f"--data_dir={moved}", "--max_iters=3", "--learning_rate=5e-3",
                       "--seed=1337", "--n_layer=1"])
    out = capsys.readouterr().out.splitlines()
    assert [l for l in out if l.startswith("resume:")] == [f"resume: data_dir {data_dir} -> {moved}",
                                                             "resume: max_iters 2 -> 3",
                                                           "resume: learning_rate 0.0001 -> 0.005"]
    ck3 = torch.load(ck, weights_only=True)
    assert ck3["iter_num"] == 3 and ck3["config"]["learning_rate"] == 5e-3 and ck3["config"]["beta"] == 0.1
    # prepared again in place: other data
    write_shard(Path(moved) / "val_000000.bin", random_pairs(8, 300, 9))
    main_error(capsys, resume + ["--max_iters=4"],
               rf"resume: {re.escape(moved)} holds other data than the run in ")


def test_a_resume_says_its_step_and_one_that_trains_nothing_says_so(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    out_dir = str(tmp_path / "run")
    ck = os.path.join(out_dir, "ckpt.pt")
    resume = ["--init_from=resume", f"--out_dir={out_dir}"]
    dpo.main(run_args(tmp_path, data_dir, out_dir, max_iters=2))
    capsys.readouterr()
    dpo.main(resume + ["--max_iters=3"])
    assert f"resumed at step 2 from {ck}\n" in capsys.readouterr().out
    before = (Path(ck).read_bytes(), Path(out_dir, "metrics.jsonl").read_bytes())
    # a finished run resumed with a new learning rate, or a max_iters at or below its step: exit 0
    # (online.py resumes a round that finished before its round.json was written)
    for args in (["--learning_rate=5e-3"], ["--max_iters=1"], []):
        dpo.main(resume + args)
        out = capsys.readouterr().out.strip().splitlines()
        n = 1 if args == ["--max_iters=1"] else 3
        assert out[-1] == (f"nothing to train: {ck} is at step 3 and --max_iters={n}; it stays "
                           f"as it was (a higher --max_iters trains on)"), out
        work = ("resumed", "saved", "iter", "eval", "reference")
        assert not [l for l in out if l.startswith(work)]
    assert (Path(ck).read_bytes(), Path(out_dir, "metrics.jsonl").read_bytes()) == before
    # a bad value is the one line: no "resume: beta 0.1 -> nan" before it
    with pytest.raises(SystemExit):
        dpo.main(resume + ["--max_iters=4", "--beta=nan"])
    assert capsys.readouterr() == ("", "error: --beta=nan: expected a finite number\n")


def test_a_stopped_run_prints_the_callers_continue_command(tmp_path, capsys, monkeypatch):
    # online.py passes its own command line: the stop line tells the user to rerun online.py
    data_dir = make_data(tmp_path)
    get_lr = dpo.get_lr

    def signal_in_step_1(it, cfg):
        if it == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return get_lr(it, cfg)

    monkeypatch.setattr(dpo, "get_lr", signal_in_step_1)
    cfg = tiny_cfg(tmp_path, data_dir)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(launch.Interrupted):
        train(cfg, continue_with="python online.py --out_dir=runs/x")
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == (f"stopped after step 1: saved {cfg.out_dir}/ckpt.pt; continue with: "
                       f"python online.py --out_dir=runs/x")
    assert signal.getsignal(signal.SIGINT) is before  # train() puts the handler back


def test_a_signal_in_the_reference_pass_is_one_line_and_leaves_nothing_half_written(tmp_path):
    # Ctrl-C or SIGTERM before the first step: no step to finish, so it ends at once with one line
    # (on its own line, after the terminal's ^C), no traceback, no file of this run left
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_shard(data_dir / "train_000000.bin", random_pairs(4000, 300, 0))
    out_dir = tmp_path / "run"
    # a reference pass of seconds
    slow = dict(batch_size=1, n_layer=2, n_embd=64, max_iters=1, eval_interval=0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        rc, out, err = interrupt(run_args(tmp_path, str(data_dir), str(out_dir), **slow),
                                 "reference log-probs train: 16/", sig)
        line = "interrupted during the reference pass: nothing saved; rerun the same command"
        assert rc == 130 and err.startswith("\n") and err.strip().splitlines() == [line], err[-3000:]
        assert os.listdir(data_dir) == ["train_000000.bin"] and not out_dir.exists()
    # a resume: its checkpoint and log stay as they were, and the line says how to continue
    faster = {**slow, "batch_size": 16}
    r = cli("dpo.py", *run_args(tmp_path, str(data_dir), str(out_dir), **faster))
    assert r.returncode == 0, r.stderr[-3000:]
    for cache in data_dir.glob("ref_logps_*"):
        cache.unlink()
    before = [(out_dir / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")]
    resume = ["--init_from=resume", f"--out_dir={out_dir}", "--batch_size=1", "--max_iters=2"]
    rc, out, err = interrupt(resume, "reference log-probs train: 16/", signal.SIGINT)
    line = (f"interrupted during the reference pass: the last checkpoint is {out_dir}/ckpt.pt; "
            f"continue with: python dpo.py --init_from=resume --out_dir={out_dir}")
    assert rc == 130 and err.strip().splitlines() == [line], err[-3000:]
    assert [(out_dir / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")] == before
    assert os.listdir(data_dir) == ["train_000000.bin"]


def test_a_replaced_reference_is_refused_and_a_moved_run_finds_its_own(tmp_path, monkeypatch, capsys):
    data_dir = make_data(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path / "runs")
    kw = dict(max_iters=2, eval_interval=0)
    train(tiny_cfg(tmp_path, data_dir, out_dir="sft", loss_type="sft", **kw))
    # relative paths, as users type them
    train(tiny_cfg(tmp_path, data_dir, out_dir="dpo", init_from="sft", **kw))
    assert torch.load("dpo/ckpt.pt", weights_only=True)["ref_from"] == str(tmp_path / "runs" / "sft")
    # resumed from another folder, then after runs/ moved as a whole: the reference is found
    monkeypatch.chdir(tmp_path)
    train(tiny_cfg(tmp_path, data_dir, out_dir="runs/dpo", init_from="resume",
                   **{**kw, "max_iters": 3}))
    shutil.move("runs", "moved")
    train(tiny_cfg(tmp_path, data_dir, out_dir="moved/dpo", init_from="resume",
                   **{**kw, "max_iters": 4}))
    assert [r["iter"] for r in read_metrics("moved/dpo")] == [0, 1, 2, 3]
    # the reference retrained in place: resuming against other weights is refused, the checkpoint
    # untouched
    train(tiny_cfg(tmp_path, data_dir, out_dir="moved/sft", loss_type="sft", seed=5, **kw))
    before = open("moved/dpo/ckpt.pt", "rb").read()
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir="moved/dpo", init_from="resume",
                                 max_iters=5),
               r"its reference .*sft changed since this run started .*restore it, or start a new run")
    assert open("moved/dpo/ckpt.pt", "rb").read() == before
    with pytest.raises(ValueError, match=r"moved/dpo/ckpt\.pt: its reference .*sft changed since this run started"):
        sample_module.load_pair_of_models(sample_cfg(tmp_path, data_dir, init_from="moved/dpo"),
                                          torch.device("cpu"))
    # a run never overwrites the checkpoint its own reference comes from
    before = open("moved/sft/ckpt.pt", "rb").read()
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir="moved/sft", init_from="moved/sft"),
               r"init_from=moved/sft is out_dir's own checkpoint.*choose another --out_dir")
    assert open("moved/sft/ckpt.pt", "rb").read() == before


def test_a_checkpoint_missing_what_resume_needs_is_one_line_and_still_starts_a_new_run(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=1, eval_interval=0)
    train(cfg)
    ck = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    for key, what in (("optimizer", "optimizer state"), ("rng_cpu", "random state"),
                      ("iter_num", "step"), ("config", "options")):
        run = tmp_path / key
        run.mkdir()
        (run / "ckpt.pt").write_bytes(torch_bytes({k: v for k, v in ck.items() if k != key}))
        path = re.escape(str(run / "ckpt.pt"))
        main_error(capsys, ["--init_from=resume", f"--out_dir={run}"],
                   rf"^error: {path}: no {what} \({key}\) saved, which --init_from=resume needs; "
                   rf"--init_from={path} starts a new run from its weights$")
        # train() refuses it too
        with pytest.raises(ValueError, match=rf"{path}: no {what} \({key}\) saved"):
            train(tiny_cfg(tmp_path, data_dir, out_dir=str(run), init_from="resume"))
        hist = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / f"new_{key}"),
                              init_from=str(run), max_iters=1))
        # its weights: policy and reference
        assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


# -----------------------------------------------------------------------------
# what is never saved, and files that cannot be read


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=3, eval_interval=1)
    train(cfg)
    ck = os.path.join(cfg.out_dir, "ckpt.pt")
    before = open(ck, "rb").read()
    # an absurd learning rate blows the weights up after the first resumed step
    with pytest.raises(FloatingPointError,
                       match=r"step [45]: the (loss|gradient norm) is (nan|inf).*ckpt.pt"):
        train(tiny_cfg(tmp_path, data_dir, init_from="resume", max_iters=8, eval_interval=100,
                       warmup_iters=0, learning_rate=1e30, min_lr=1e30, grad_clip=0.0))
    assert open(ck, "rb").read() == before


def test_weights_that_are_not_finite_are_never_saved(tmp_path, capsys):
    # a checkpoint every step; an absurd learning rate makes the weights inf in a step whose loss
    # and gradients were finite: the next save refuses, and the last good checkpoint stays the last
    # good one
    data_dir = make_data(tmp_path)
    cfg = tiny_cfg(tmp_path, data_dir, max_iters=2, eval_interval=1)
    train(cfg)
    ck = os.path.join(cfg.out_dir, "ckpt.pt")
    before = open(ck, "rb").read()
    main_error(capsys, tiny_args(tmp_path, data_dir, init_from="resume", max_iters=6,
                                 eval_interval=1, warmup_iters=0, learning_rate=1e39, min_lr=1e39),
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
        # the rest from the checkpoint
        main_error(capsys, [f"--out_dir={run}", "--init_from=resume"], where)
        main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(tmp_path / "new"),
                                     init_from=str(run)), where)
        assert (run / "ckpt.pt").read_bytes() == raw and not (tmp_path / "new" / "ckpt.pt").exists()
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(tmp_path / "none"),
                                 init_from="resume"),
               r"init_from=resume: no checkpoint at .*none/ckpt\.pt")


def test_a_corrupt_reference_cache_is_computed_again(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    first = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "a"), max_iters=2,
                           eval_interval=0))
    [cache] = Path(data_dir).glob("ref_logps_train_*.pt")
    good = torch.load(cache, weights_only=True)
    for bad in (cache.read_bytes()[:60], b"",
                torch_bytes({"chosen": torch.zeros(3), "rejected": torch.zeros(3)})):
        cache.write_bytes(bad)
        capsys.readouterr()
        again = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "b"), max_iters=2,
                               eval_interval=0))
        out = capsys.readouterr().out
        assert re.search(re.escape(str(cache)) + r": unreadable reference cache \(.*\); computing it again", out), out
        assert [h["loss"] for h in again] == [h["loss"] for h in first]
        torch.testing.assert_close(torch.load(cache, weights_only=True), good)  # written again


# -----------------------------------------------------------------------------
# a full disk or a read-only folder while saving


def test_disk_full_or_read_only_while_saving_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    # tests run as root, where permissions stop nothing: the faults are raised where the files are
    # written
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

    faults = [(torch, "save", full_disk, os.strerror(errno.ENOSPC)),
              (os, "replace", read_only, os.strerror(errno.EROFS))]
    for module, name, fake, reason in faults:
        with monkeypatch.context() as m:
            m.setattr(module, name, fake)
            main_error(capsys, tiny_args(tmp_path, data_dir, init_from="resume", max_iters=4,
                                         eval_interval=0),
                       f"could not write the checkpoint {re.escape(str(ck))} \\({reason}\\); "
                       "the previous file is intact")
        assert ck.read_bytes() == before and sorted(os.listdir(cfg.out_dir)) == names, name
    for f in Path(data_dir).glob("ref_logps_*"):
        f.unlink()
    # the reference cache of a fresh run: no temp file beside the shards
    for module, name, fake, reason in faults:
        with monkeypatch.context() as m:
            m.setattr(module, name, fake)
            main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(tmp_path / "fresh")),
                       rf"could not write the reference cache .*ref_logps_train_\w+\.pt \({reason}\)")
        assert sorted(os.listdir(data_dir)) == ["train_000000.bin", "val_000000.bin"], name


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
               rf"^error: could not write the checkpoint {re.escape(str(ck))} \(the disk is full\? "
               rf"torch\.save: \[enforce fail at inline_container\.cc:672\] \. unexpected pos 4416 "
               rf"vs 4308\); the previous file is intact; free space on the disk of "
               rf"{re.escape(cfg.out_dir)} \(\d+\.\d GiB free now\)$")
    assert ck.read_bytes() == before and sorted(os.listdir(cfg.out_dir)) == names
    for f in Path(data_dir).glob("ref_logps_*"):
        f.unlink()
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(tmp_path / "fresh")),
               rf"^error: could not write the reference cache {re.escape(data_dir)}/"
               rf"ref_logps_train_\w+\.pt \(the disk is full\? torch\.save: .*\); the previous file "
               rf"is intact; free space on the disk of {re.escape(data_dir)} ")
    assert (sorted(os.listdir(data_dir)) == ["train_000000.bin", "val_000000.bin"]
            and not (tmp_path / "fresh").exists())


# -----------------------------------------------------------------------------
# signals, and one trainer per out_dir


def test_sigterm_stops_after_the_step_saves_and_resume_loses_no_step(tmp_path):
    # a cluster preempts with SIGTERM: the step ends, a checkpoint is saved, exit 130; the resumed
    # run continues from the next step and ends where a run that never stopped ends
    data_dir = make_data(tmp_path)
    # constant lr: any max_iters, same steps
    kw = dict(eval_interval=0, log_interval=1, warmup_iters=0, min_lr=1e-3)
    out_dir = str(tmp_path / "out")
    p = subprocess.Popen([sys.executable, "dpo.py",
                          *tiny_args(tmp_path, data_dir, max_iters=100000, **kw)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
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
    stopped = int(re.search(r"^stopped after step (\d+): saved .*ckpt\.pt; continue with: "
                            r"python dpo.py --init_from=resume --out_dir=.*out$", out, re.M)[1])
    assert torch.load(os.path.join(out_dir, "ckpt.pt"),
                      weights_only=True)["iter_num"] == stopped + 1
    assert [r["iter"] for r in read_metrics(out_dir)] == list(range(stopped + 1))
    r = cli("dpo.py", *tiny_args(tmp_path, data_dir, init_from="resume", max_iters=stopped + 3,
                                 **kw))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = read_metrics(out_dir)
    assert [r["iter"] for r in resumed] == list(range(stopped + 3))
    full = train(tiny_cfg(tmp_path, data_dir, out_dir=str(tmp_path / "full"), max_iters=stopped + 3,
                          **kw))
    for a, b in zip(resumed, full, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)


def test_a_second_trainer_on_the_same_out_dir_is_refused_and_a_second_signal_quits_at_once(tmp_path):
    data_dir = make_data(tmp_path)
    args = tiny_args(tmp_path, data_dir, max_iters=100000, eval_interval=0, log_interval=100000,
                     global_batch_size=24)
    p = subprocess.Popen([sys.executable, "dpo.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in p.stdout:
            if line.startswith("iter 0:"):
                break
        r = cli("dpo.py", *args)
        assert_one_error(r.returncode, r.stderr,
                         r"out_dir=.*out is in use by another running trainer")
        assert p.poll() is None
        # Ctrl-C, and another signal before the step ends: quit now, save nothing
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert (p.returncode == 130 and "Traceback" not in err
            and "stopped after" not in out), err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted during a step: nothing saved; rerun the same command"
    assert not (tmp_path / "out" / "ckpt.pt").exists()
    # the refused trainer never touched the log
    iters = [r["iter"] for r in read_metrics(tmp_path / "out")]
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


def test_a_failed_start_leaves_nothing_in_a_new_out_dir(tmp_path, capsys):
    data_dir = make_data(tmp_path)
    new = tmp_path / "runs" / "a" / "b"
    main_error(capsys, tiny_args(tmp_path, str(tmp_path / "nothing"), out_dir=str(new)),
               r"no train shards")
    assert not (tmp_path / "runs").exists()  # neither the .lock nor the folders made for it
    shard = Path(data_dir) / "train_000000.bin"
    pairs = random_pairs(6, 300, 0)
    pairs[2] = (pairs[2][0], np.r_[60000, 50256], pairs[2][2])
    write_shard(shard, pairs)  # found after the lock, the model and the shards are loaded
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(new)), r"token id 60000")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "used").mkdir()  # a folder that was there before stays, with what it held
    (tmp_path / "used" / "notes.txt").write_text("mine")
    main_error(capsys, tiny_args(tmp_path, data_dir, out_dir=str(tmp_path / "used")),
               r"token id 60000")
    assert os.listdir(tmp_path / "used") == ["notes.txt"]
