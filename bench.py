"""
Throughput, side by side on the same data, model and batch: the plain layout (every sequence padded
in its own row, the reference model run every step, as TRL's DPOTrainer does by default) against the
fast layout (pairs packed into rows with the prompt once, reference log-probs cached), and
optionally TRL itself. The measurements and their history: bench/README.md.

    python bench.py          # CPU, float32, GPT-2 architecture 4 layers x 256, 8 pairs a step,
                             # max_length 512 (trainer defaults: compiled on CUDA only)
    python bench.py --trl=1  # also TRL's DPOTrainer (.venv-trl/bin/python experiments/bench_trl.py)
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --device=cuda --steps=20
                             # GPT-2 124M-shaped on a GPU: bf16, compiled
Options are bench.py's own (--hh, --steps, --warmup, --trl, --max_length, --json, --profile) and any
dpo.py config key.
    python bench.py --prepare=1 --input=../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
                             # prepare.py vs bare tiktoken on the same texts
    python bench.py --host=1 # the packer's host time per pair (micro_batches), one thread,
                             # 128-pair micro-batches
"""
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch._dynamo.utils import counters

import dpo
import prepare

ROOT = os.path.dirname(os.path.abspath(__file__))
HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")
BENCH = {"hh": HH, "steps": 10, "warmup": 2, "trl": 0, "max_length": 512, "variant": "", "json": "",
         "profile": 0}
DEFAULTS = ["--n_layer=4", "--n_head=4", "--n_embd=256", "--block_size=1024",
            "--global_batch_size=8", "--batch_size=8", "--eval_interval=0", "--log_interval=1000000",
            "--save_checkpoint=false", "--learning_rate=1e-5", "--warmup_iters=0"]
VARIANTS = {"plain": ["--layout=plain", "--reference=model"],
            "packed": ["--layout=packed", "--reference=cached"]}


def parse(argv):
    opts, rest = dict(BENCH), []
    for arg in argv:
        key, _, value = arg[2:].partition("=")
        if key in BENCH:
            opts[key] = type(BENCH[key])(value)
        else:
            rest.append(arg)
    return opts, rest


def cpu_peak():
    """float32 matmul rate of this process: the best of several 2048^2 matmuls (the machine's rate,
    not its noise)"""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(8):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 ** 3 / best


def run_variant(opts, rest):
    """one layout in this process (so its peak memory is its own); prints one JSON line"""
    max_iters = opts["warmup"] + opts["steps"]
    args = DEFAULTS + VARIANTS[opts["variant"]] + rest + [f"--max_iters={max_iters}"]
    cfg = dpo.parse_config(args)
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    t0 = time.time()
    if cfg.reference == "cached":  # time the one pass over the data that computes the reference
        dpo.train(dataclasses.replace(cfg, max_iters=0))
    ref_s = time.time() - t0
    peak = dpo.peak_flops(torch.device("cuda")) if on_gpu else cpu_peak()
    counters.clear()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    hist = dpo.train(cfg)
    first_s = hist[0]["ms"] / 1000  # the first step pays for torch.compile
    hist = hist[opts["warmup"]:]
    train_s = time.time() - t0
    if opts["profile"]:  # where the time goes: the top kernels of a few more steps (compiled once)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if on_gpu:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            dpo.train(dataclasses.replace(cfg, max_iters=opts["profile"]))
        key = "cuda_time_total" if on_gpu else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=20), file=sys.stderr)
    if not on_gpu:  # measured before and after the timed steps: keep the best
        peak = max(peak, cpu_peak())
    if on_gpu:
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mfu = median(hist, "flops_per_s") / peak if peak else None
    if mfu is not None and mfu > 1:  # a disturbed peak measurement, never a number to report
        sys.exit(f"error: MFU {100 * mfu:.0f}% > 100%: the peak ({peak / 1e9:.0f} GFLOP/s) was "
                 f"measured while the machine was busy; rerun on an idle machine")
    pairs = len(dpo.PairData(cfg.data_dir, "train", 1024))
    print(json.dumps({"variant": opts["variant"], "pairs_per_s": median(hist, "pairs_per_s"),
                      "tokens_per_s": median(hist, "tokens_per_s"), "ms": median(hist, "ms"), "mfu": mfu,
                      "peak_mb": peak_mb, "ref_precompute_s": ref_s, "train_s": train_s,
                      "first_step_s": first_s, "graphs": counters["stats"]["unique_graphs"],
                      "peak_tflops": (peak or 0) / 1e12, "pairs": pairs}))


def median(hist, key):
    return float(np.median([h[key] for h in hist]))


def child(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return
    if any(a.startswith("--prepare=") and a != "--prepare=0" for a in argv):  # prepare.py's speed
        return prepare_bench(argv)
    if "--host=1" in argv:  # the packer's speed instead
        return host_bench([a for a in argv if a != "--host=1"])
    opts, rest = parse(argv)
    if opts["variant"]:
        return run_variant(opts, rest)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "hh")
        prep_args = [f"--input={opts['hh']}", f"--out_dir={data_dir}",
                     f"--max_length={opts['max_length']}"]
        meta = prepare.prepare(prepare.parse_args(prep_args), log=lambda *a, **k: None)
        model_and_batch = " ".join(DEFAULTS[:5] + rest)
        print(f"data: {opts['hh']} -> {meta['pairs'].get('train', 0)} train pairs, "
              f"max_length {opts['max_length']}; model and batch: {model_and_batch}", flush=True)
        res = {}
        bench_args = [f"--{k}={opts[k]}" for k in ("steps", "warmup", "max_length")]
        for v in VARIANTS:
            res[v] = child([sys.executable, __file__, f"--variant={v}", f"--data_dir={data_dir}",
                            f"--out_dir={tmp}/out", *bench_args, *rest])
            print(f"  {v}: {json.dumps(res[v])}", flush=True)
    trl_python = os.path.join(ROOT, ".venv-trl", "bin", "python")
    if opts["trl"]:
        bench_trl = os.path.join(ROOT, "experiments", "bench_trl.py")
        res["trl"] = child([trl_python, bench_trl, f"--steps={opts['steps']}"])
    print_table(res)
    if opts["json"]:
        with open(opts["json"], "w") as f:
            json.dump(res, f)
    p = res["packed"]
    speedup = f"\npacked / plain: {p['pairs_per_s'] / res['plain']['pairs_per_s']:.2f}x pairs/s"
    if "trl" in res:
        speedup += f", packed / TRL: {p['pairs_per_s'] / res['trl']['trl_pairs_per_s']:.2f}x"
    first_epoch_s = p["ref_precompute_s"] + p["pairs"] / p["pairs_per_s"]
    print(speedup
          + f"\nthe cached reference took {p['ref_precompute_s']:.1f}s once for {p['pairs']} "
          f"pairs; counting it, a first epoch runs at {p['pairs'] / first_epoch_s:.2f} pairs/s"
          f"\nMFU is against a peak of {1000 * res['plain']['peak_tflops']:.0f} (plain) and "
          f"{1000 * p['peak_tflops']:.0f} (packed) GFLOP/s (GPU: the card's bf16 dense peak; "
          f"CPU: float32 matmul, best measured before and after the steps)")


def print_table(res):
    header = f"{'pairs/s':>8s} {'tokens/s':>9s} {'ms/step':>8s} {'peak MB':>8s} {'MFU':>6s}"
    print(f"\n{'':28s} {header}")
    names = {"plain": "plain + reference model", "packed": "packed + cached reference",
             "trl": "TRL DPOTrainer (defaults)"}
    for k, r in res.items():
        if k == "trl":
            ms = 1000 * r["trl_s_per_step_median"]
            peak_mb = r.get("peak_mb", 0)
            print(f"{names[k]:28s} {r['trl_pairs_per_s']:8.2f} {'':>9s} {ms:8.0f} {peak_mb:8.0f}")
        else:
            mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
            print(f"{names[k]:28s} {r['pairs_per_s']:8.2f} {r['tokens_per_s']:9.0f} {r['ms']:8.0f} "
                  f"{r['peak_mb']:8.0f} {mfu}")


def prepare_bench(argv):
    """python bench.py --prepare=1 [prepare.py options, e.g. --input=FILE]: the full prepare (worker
    processes, and one process) against bare tiktoken encoding of exactly the texts it tokenizes;
    round robin, median of 3"""
    import statistics
    from types import SimpleNamespace
    cfg = prepare.parse_args([a for a in argv if not a.startswith("--prepare=")])
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:

        def run(workers):
            options = {**vars(cfg), "num_workers": workers, "out_dir": os.path.join(tmp, "out")}
            return prepare.prepare(SimpleNamespace(**options), log=None)

        try:
            meta = run(cores)  # also checks the options and the input (downloads HH once, if asked)
        except prepare.PrepareError as e:
            sys.exit(f"bench.py: error: {e}")
        rows, texts = prepared_texts(cfg, meta)
        enc = prepare.gpt2_encoding()
        n = len(texts) // 3
        batch_name = f"bare enc.encode_ordinary_batch(num_threads={cores})"
        loop_name = "bare enc.encode_ordinary loop, 1 thread"
        cases = {f"full prepare, {cores} worker processes": lambda: run(cores),
                 "full prepare, 1 process": lambda: run(1),
                 batch_name: lambda: enc.encode_ordinary_batch(texts, num_threads=cores),
                 loop_name: lambda: [enc.encode_ordinary(t) for t in texts]}
        times = {k: [] for k in cases}
        cpu = {k: [] for k in cases}
        for _ in range(3):  # round robin, so a change in machine load hits every case alike
            for k, fn in cases.items():
                t = time.perf_counter()
                c = sum(os.times()[:4])  # CPU time of this process and its finished workers
                fn()
                times[k].append(time.perf_counter() - t)
                cpu[k].append(sum(os.times()[:4]) - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    megabytes = sum(map(len, texts)) / 1e6
    print(f"bench: {len(rows):,} rows -> {n:,} pairs, {megabytes:.1f} MB of text, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f} (median of 3)")
    for k, t in med.items():
        print(f"  {k:<48} {t:7.3f}s {n / t:9,.0f} pairs/s   cpu {statistics.median(cpu[k]):.2f}s")
    t_prep = med[f"full prepare, {cores} worker processes"]
    t_batch = med[batch_name]
    t_loop = med[loop_name]
    print(f"  ratio full prepare / bare encode: {t_prep / t_batch:.2f}x (batch call), "
          f"{t_prep / t_loop:.2f}x (loop)")
    return med


def prepared_texts(cfg, meta):
    """the input rows and exactly the strings prepare tokenizes (prompt, chosen, rejected of each)"""
    from types import SimpleNamespace
    o = SimpleNamespace(**{**vars(cfg), "format": meta["format"]})
    if meta["source"] == "toy":
        o.prompt_key = "prompt"
        o.chosen_key = "chosen"
        o.rejected_key = "rejected"
        rows = prepare.make_toy_pairs(cfg.toy_pairs, cfg.seed)
    else:
        progress = SimpleNamespace(done_bytes=0)
        rows = [row for _, row in prepare.iter_rows(meta["source"], progress)]
    texts = []
    for row in rows:
        try:
            if isinstance(row, bytes):
                row = json.loads(row)
            if isinstance(row, dict):
                texts += prepare.EXTRACT[o.format](row, o)[:3]
        except (prepare.Skip, ValueError):
            pass
    return rows, texts


def host_bench(argv):
    """host microseconds per pair of micro_batches (plan, tokens, positions, index arrays as torch
    tensors) on HH pairs, one thread, 128-pair micro-batches: the fixed packed shape (compiled /
    GPU), rows sized per step (CPU eager) and the plain layout; every train pair once per pass, best
    of 7 passes, in this process's CPU time (what the host spends; on an idle machine the same as
    wall time, and steadier on a busy one)"""
    opts, rest = parse(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        prep_args = [f"--input={opts['hh']}", f"--out_dir={tmp}",
                     f"--max_length={opts['max_length']}"]
        prepare.prepare(prepare.parse_args(prep_args), log=lambda *a, **k: None)
        data = dpo.PairData(tmp, "train", 1024)
        cfg = dpo.parse_config(["--batch_size=128", "--block_size=1024", *rest])
        ids = np.random.default_rng(0).permutation(len(data))
        res = {}
        layouts = (("packed, fixed shape", "packed", True),
                   ("packed, rows per step", "packed", False),
                   ("plain", "plain", False))
        for name, layout, fixed in layouts:
            shape = dpo.make_shape(dataclasses.replace(cfg, layout=layout), [data], fixed=fixed)
            best = float("inf")
            for _ in range(7):
                t0 = time.process_time()
                steps = range(0, len(ids), 128)
                mbs = [dpo.micro_batches(data, ids[i: i + 128], shape) for i in steps]
                best = min(best, time.process_time() - t0)
            res[name] = 1e6 * best / len(ids)
            batches = [b for m in mbs for b in m]
            real = sum(b.n_tokens for b in batches) / sum(b.idx.numel() for b in batches)
            per_step = len(batches) / len(mbs)
            print(f"  {name:24s} ({shape.rows} x {shape.row_len}): {res[name]:6.1f} us per pair, "
                  f"{per_step:.2f} micro-batches a step, {100 * real:.0f}% of their tokens real",
                  flush=True)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
