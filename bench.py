"""
Throughput, side by side on the same data, model and batch: the plain layout (every sequence padded in its own row,
the reference model run every step, as TRL's DPOTrainer does by default) against the fast layout (pairs packed into
rows with the prompt once, reference log-probs cached), and optionally TRL itself.

    python bench.py                   # CPU, float32, GPT-2 architecture 4 layers x 256, 8 pairs a step, max_length 512
                                      # (trainer defaults: compiled on CUDA only; eager was faster on this CPU)
    python bench.py --trl=1           # also TRL's DPOTrainer via .venv-trl/bin/python bench_trl.py (same setting)
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --device=cuda --steps=20   # GPT-2 124M, bf16, compiled
Options are bench.py's own (--hh, --steps, --warmup, --trl, --max_length) and any dpo.py config key.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import dpo
import prepare

HH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")
BENCH = {"hh": HH, "steps": 10, "warmup": 2, "trl": 0, "max_length": 512, "variant": ""}
DEFAULTS = ["--n_layer=4", "--n_head=4", "--n_embd=256", "--block_size=1024", "--global_batch_size=8",
            "--batch_size=8", "--eval_interval=0", "--log_interval=1000000", "--save_checkpoint=false",
            "--learning_rate=1e-5", "--warmup_iters=0"]
VARIANTS = {"plain": ["--layout=plain", "--reference=model"], "packed": ["--layout=packed", "--reference=cached"]}


def parse(argv):
    opts, rest = dict(BENCH), []
    for arg in argv:
        key, _, value = arg[2:].partition("=")
        if key in BENCH:
            opts[key] = type(BENCH[key])(value)
        else:
            rest.append(arg)
    return opts, rest


def run_variant(opts, rest):
    """one layout in this process (so its peak memory is its own); prints one JSON line"""
    cfg = dpo.parse_config(DEFAULTS + VARIANTS[opts["variant"]] + rest + [f"--max_iters={opts['warmup'] + opts['steps']}"])
    ref_s = 0.0
    if cfg.reference == "cached":  # time the one pass over the data that computes the reference log-probs
        *_, device = dpo.setup_device(cfg)
        model = dpo.load_model(cfg.init_from, cfg).to(device)
        _, ctx, compile_, flex = dpo.numerics(cfg, device)
        data = dpo.PairData(cfg.data_dir, "train", model.config.block_size)
        val = dpo.PairData(cfg.data_dir, "val", model.config.block_size) if dpo._has_split(cfg.data_dir, "val") else None
        layout_cfg, pack_len = dpo.batch_layout(cfg, data, val, compile_, flex)  # the micro-batches train() will use
        t0 = time.time()
        dpo.cached_reference(model, data, layout_cfg, pack_len, device, ctx, 0, 1, flex)
        ref_s = time.time() - t0
        del model
    hist = dpo.train(cfg)[opts["warmup"]:]
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    if on_gpu:
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = lambda k: float(np.median([h[k] for h in hist]))
    print(json.dumps({"variant": opts["variant"], "pairs_per_s": med("pairs_per_s"), "tokens_per_s": med("tokens_per_s"),
                      "ms": med("ms"), "mfu": med("mfu"), "peak_mb": peak_mb, "ref_precompute_s": ref_s,
                      "peak_tflops": dpo.peak_flops(torch.device("cuda" if on_gpu else "cpu")) / 1e12,
                      "pairs": len(dpo.PairData(cfg.data_dir, "train", 1024))}))


def child(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    opts, rest = parse(argv)
    if opts["variant"]:
        return run_variant(opts, rest)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "hh")
        meta = prepare.prepare(prepare.parse_args([f"--input={opts['hh']}", f"--out_dir={data_dir}",
                                                   f"--max_length={opts['max_length']}"]), log=lambda *a, **k: None)
        print(f"data: {opts['hh']} -> {meta['pairs'].get('train', 0)} train pairs, "
              f"max_length {opts['max_length']}; model and batch: {' '.join(DEFAULTS[:5] + rest)}", flush=True)
        res = {}
        for v in VARIANTS:
            res[v] = child([sys.executable, __file__, f"--variant={v}", f"--data_dir={data_dir}",
                            *[f"--{k}={opts[k]}" for k in ("steps", "warmup")], *rest])
            print(f"  {v}: {json.dumps(res[v])}", flush=True)
    trl_python = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv-trl", "bin", "python")
    if opts["trl"]:
        res["trl"] = child([trl_python, "bench_trl.py", f"--steps={opts['steps']}"])
    print(f"\n{'':28s} {'pairs/s':>8s} {'tokens/s':>9s} {'ms/step':>8s} {'peak MB':>8s} {'MFU':>6s}")
    names = {"plain": "plain + reference model", "packed": "packed + cached reference", "trl": "TRL DPOTrainer (defaults)"}
    for k, r in res.items():
        if k == "trl":
            print(f"{names[k]:28s} {r['trl_pairs_per_s']:8.2f} {'':>9s} {1000 * r['trl_s_per_step_median']:8.0f} "
                  f"{r.get('peak_mb', 0):8.0f}")
        else:
            print(f"{names[k]:28s} {r['pairs_per_s']:8.2f} {r['tokens_per_s']:9.0f} {r['ms']:8.0f} {r['peak_mb']:8.0f} "
                  f"{100 * r['mfu']:5.1f}%")
    p = res["packed"]
    print(f"\npacked / plain: {p['pairs_per_s'] / res['plain']['pairs_per_s']:.2f}x pairs/s"
          + (f", packed / TRL: {p['pairs_per_s'] / res['trl']['trl_pairs_per_s']:.2f}x" if "trl" in res else "")
          + f"\nthe cached reference took {p['ref_precompute_s']:.1f}s once for {p['pairs']} pairs; counting it, "
          f"a first epoch runs at {p['pairs'] / (p['ref_precompute_s'] + p['pairs'] / p['pairs_per_s']):.2f} pairs/s"
          f"\nMFU is against a peak of {1000 * res['plain']['peak_tflops']:.0f} (plain) and "
          f"{1000 * p['peak_tflops']:.0f} (packed) GFLOP/s (GPU: the card's bf16 dense peak; CPU: measured float32 matmul)")


if __name__ == "__main__":
    main(sys.argv[1:])
