"""
Helpers the test files share: tiny GPT-2s, tiny shards and configs, naive references, and dpo.py's
command line run as users run it. conftest.py says how to run the tests.
"""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dpo
import sample as sample_module
from dpo import Config
from model import GPT, GPTConfig


ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"


EOT = 50256
HH_FILE = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
HH_MISSING = (f"needs the real HH-RLHF pairs at {HH_FILE}: mkdir -p {HH_FILE.parent} && curl -L -o {HH_FILE} "
              "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/harmless-base/test.jsonl.gz")


# -----------------------------------------------------------------------------
# tiny GPT-2s, every weight moved away from its init, and a packed batch (model tests)


TINY = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, block_size=64)


def our_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**TINY, **kw}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def tokens(B=2, T=20, seed=1):
    return torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(seed))


def packed_inputs(m):
    # row 0: sequence a (5 tokens), sequence b (7 tokens), 3 padding tokens;
    # row 1: one sequence of 15
    a, b, c = tokens(1, 5, seed=2), tokens(1, 7, seed=3), tokens(1, 15, seed=4)
    idx = torch.cat([torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1), c])
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(7), torch.zeros(3, dtype=torch.long)]),
                       torch.arange(15)])
    doc = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 3, [0] * 15])  # -1 = padding
    T = 15
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    # padding attends to nothing
    mask = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0) & causal
    refs = [m(a)[0], m(b)[0], m(c)[0]]
    return idx, pos, doc, mask, refs


# -----------------------------------------------------------------------------
# the DPO loss's log-sigmoid on python floats (the float64 references)


def logsig(x):
    # log(1/(1+exp(-x))) without overflow
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# -----------------------------------------------------------------------------
# tiny shards, configs and models for the trainer


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
    base = dict(out_dir=str(tmp_path / "out"), data_dir=data_dir, n_layer=2, n_head=2, n_embd=32,
                block_size=64, global_batch_size=8, batch_size=4, max_iters=6, eval_interval=3,
                log_interval=100, learning_rate=1e-3, warmup_iters=2, device="cpu", compile="false")
    base.update(kw)
    return Config(**base)


def sample_cfg(tmp_path, data_dir, **kw):
    return sample_module.SampleConfig(**dataclasses.asdict(tiny_cfg(tmp_path, data_dir)) | kw)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))


def naive_logps(model, p, resp):
    """one sequence at a time, full logits, float64 log-softmax: the reference for response log-probs"""
    idx = torch.from_numpy(np.concatenate([p, resp]).astype(np.int64))[None]
    logp = F.log_softmax(model(idx)[0].double(), -1)
    return sum(logp[len(p) - 1 + t, int(resp[t])] for t in range(len(resp)))


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


# -----------------------------------------------------------------------------
# the scripts as users run them: a process, or main() in-process


def cli(script, *args, env=None, timeout=120):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout,
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


def run_dpo(tmp_path, name, args, nproc=0):
    """dpo.py as users run it: plain python (nproc=0) or torchrun with nproc ranks; returns its metrics and weights"""
    launch = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run",
                                                 "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    out = subprocess.run([*launch, "dpo.py", f"--out_dir={tmp_path}/{name}", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # a rank's own error comes first, torchrun's report of it last: show both ends
    assert out.returncode == 0, out.stderr[:3000] + "\n...\n" + out.stderr[-3000:]
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
    base = dict(data_dir=data_dir, n_layer=2, n_head=2, n_embd=32, block_size=64,
                global_batch_size=8, batch_size=2, max_iters=4, eval_interval=2, device="cpu",
                compile="false", learning_rate=1e-3, layout=layout, reference="model") | kw
    return [f"--{k}={v}" for k, v in base.items()]


def compiled_run(tmp_path, data_dir, mode, steps, **kw):
    """a tiny run with compile=mode -> (its history, how many graphs torch.compile traced in it)"""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    out_dir = str(tmp_path / f"{mode}{steps}")
    hist = dpo.train(tiny_cfg(tmp_path, data_dir, out_dir=out_dir, compile=mode, max_iters=steps, **kw))
    return hist, counters["stats"]["unique_graphs"]
