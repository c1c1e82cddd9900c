"""
Sample from a trained policy and its reference side by side, the toy task's before/after table,
and the whole offline toy pipeline in one command.

    python sample.py --init_from=out/toy_dpo --prompts="Review of the pizza:|Review of the tea:"
    python sample.py --init_from=out/hh_gpt2 --prompts="\\n\\nHuman: hi\\n\\nAssistant:"  # \\n=newline
    python sample.py --mode=compare --config=config/toy_dpo.py --init_from=out/toy_dpo
    python sample.py --mode=demo  # prepare, SFT, DPO against the SFT model, the table; on a CPU
compare prints the table and one JSON line. Any dpo.py option is accepted too (device, dtype, seed,
data_dir, ...); with --init_from=RUN (one of our checkpoints) they default to that run's own (its
data_dir for compare, its seed), except where it computes (device, dtype, ...). A stopped demo
(Ctrl-C, SIGTERM) goes on at its stage with the same command; each stage replaces out/toy_sft or
out/toy_dpo only once it is done.
"""
import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import dpo
import judged
import launch
from prepare import EOT, PrepareError, gpt2_encoding
from shards import list_shards
from toy import toy_reward

# the demo works from any folder
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
DEMO = "python sample.py --mode=demo"  # what a stopped demo tells the user to rerun


@dataclass
class SampleConfig(dpo.Config):
    """the sampling options; the dpo.py options below default to the run's own with --init_from=RUN (a checkpoint)"""
    # sampling
    mode: str = "sample"  # sample | compare (the toy task's before/after table) | demo (the whole toy pipeline)
    prompts: str = ""  # "|"-separated prompts for mode=sample
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    num_samples: int = 8  # samples per prompt in compare (sample mode draws one per model)


def load_pair_of_models(cfg, device):
    """the policy from init_from and the reference it was trained against (its checkpoint says)"""
    path = checkpoint.checkpoint_path(cfg.init_from) if cfg.init_from != "scratch" else None
    if path is None:
        return checkpoint.load_model(cfg.init_from, cfg).to(device).eval(), None, None
    ck, policy, reference = checkpoint.load_run(path, cfg)
    if reference is None:
        return policy.to(device).eval(), None, None
    return policy.to(device).eval(), reference.to(device).eval(), ck["ref_from"]


def sample(cfg, device):
    enc = gpt2_encoding()
    if cfg.init_from == "scratch":
        print("note: init_from=scratch is an untrained random model; "
              "pass --init_from=out/... to sample a trained one")
    policy, reference, ref_from = load_pair_of_models(cfg, device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    prompts = ["Review of the pizza:"]
    if cfg.prompts:
        prompts = cfg.prompts.replace("\\n", "\n").split("|")
    for prompt in prompts:
        idx = torch.tensor([enc.encode_ordinary(prompt)], device=device)
        print(f"=== {prompt!r}")
        for name, m in (("policy", policy), (f"reference ({ref_from})", reference)):
            if m is not None:
                out = m.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_k=cfg.top_k or None, generator=g)
                text = enc.decode([t for t in out[0, idx.shape[1]:].tolist() if t != EOT])
                print(f"--- {name}: {text!r}")


@torch.no_grad()
def response_logps(model, prompt, responses):
    """summed log-prob of each response (a list of token lists) after one prompt; one row each"""
    rows = [prompt + r for r in responses]
    T = max(len(r) for r in rows)
    idx = torch.tensor([r + [EOT] * (T - len(r)) for r in rows])
    logp = F.log_softmax(model(idx.to(next(model.parameters()).device)).float(), -1).cpu()
    P = len(prompt)
    return [sum(logp[i, P - 1 + t, r[t]].item() for t in range(len(r)))
            for i, r in enumerate(responses)]


def response(row, prompt_len, keep_eot=False):
    """the generated tokens after the prompt, up to and excluding (or including) the first EOT"""
    out = row[prompt_len:].tolist()
    end = out.index(EOT) if EOT in out else len(out)
    return out[: end + (keep_eot and end < len(out))]


def compare(cfg, device):
    """the toy task's before/after table on held-out prompts: ground-truth reward of the reference's
    (SFT) and the policy's (DPO) generations, a KL estimate between them, and preference accuracy on
    the held-out pairs. each model samples from a generator of its own (the reference's numbers never
    move with the policy); standard errors are clustered by prompt (judged.clustered_sem)"""
    policy, reference, ref_from = load_pair_of_models(cfg, device)
    if reference is None:
        raise ValueError(f"--init_from={cfg.init_from} records no reference model to compare against: "
                         f"pass a DPO checkpoint, e.g. --config=config/toy_dpo.py --init_from=out/toy_dpo")
    enc = gpt2_encoding()
    val = dpo.PairData(cfg.data_dir, "val", policy.config.block_size, truncate=True)
    # the unique prompts, in order
    prompts = list(dict.fromkeys(tuple(val[i][0].tolist()) for i in range(len(val))))
    gens = {"reference": judged.generator(device, cfg.seed, judged.REFERENCE_STREAM),
            "policy": judged.generator(device, cfg.seed, judged.POLICY_STREAM)}
    res = {name: {"greedy": [], "sampled": []} for name in ("reference", "policy")}
    kl, t0 = [], time.time()
    for n, p in enumerate(prompts):
        idx = torch.tensor([list(p)], device=device)
        for name, m in (("reference", reference), ("policy", policy)):
            greedy = m.generate(idx, cfg.max_new_tokens, temperature=0.0)
            res[name]["greedy"].append(toy_reward(enc.decode(response(greedy[0], len(p)))))
            samples = m.generate(idx.repeat(cfg.num_samples, 1), cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_k=cfg.top_k or None, generator=gens[name])
            toks = [response(s, len(p), keep_eot=True) for s in samples]
            res[name]["sampled"] += [toy_reward(enc.decode([t for t in s if t != EOT]))
                                     for s in toks]
            if name == "policy":  # KL(policy || reference) ~ mean of log pi - log pi_ref, its samples
                lp_policy = response_logps(policy, list(p), toks)
                lp_reference = response_logps(reference, list(p), toks)
                kl += [a - b for a, b in zip(lp_policy, lp_reference)]
        print(f"\rcompare: {n + 1}/{len(prompts)} prompts, {time.time() - t0:.0f}s", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    # held-out preference accuracy: by likelihood (each model alone), and by DPO's implicit reward
    # (policy vs reference)
    pairs = [(val[i][0].tolist(), [val[i][1].tolist(), val[i][2].tolist()])
             for i in range(min(len(val), 400))]
    margins = {name: np.array([np.subtract(*response_logps(m, p, cr)) for p, cr in pairs])
               for name, m in (("reference", reference), ("policy", policy))}
    for name in res:
        res[name]["acc"] = float(np.mean(margins[name] > 0))
    implicit_acc = float(np.mean(margins["policy"] - margins["reference"] > 0))
    clusters = np.repeat(np.arange(len(prompts)), cfg.num_samples)  # each sample's prompt
    sems = {n: judged.clustered_sem(res[n]["sampled"], clusters) for n in res}
    kl_sem = judged.clustered_sem(kl, clusters)
    sampled = [f"{mean(res[n]['sampled']):+.3f} ± {sems[n]:.3f}" for n in res]
    rows = [("reward, greedy", *(f"{mean(res[n]['greedy']):+.3f}" for n in res)),
            (f"reward, sampled (T={cfg.temperature})", *sampled),
            ("log p(chosen) > log p(rejected)", *(f"{res[n]['acc']:.3f}" for n in res)),
            ("implicit reward accuracy", "", f"{implicit_acc:.3f}"),
            ("KL(policy || reference), nats", "", f"{mean(kl):.2f} ± {kl_sem:.2f}")]
    print(f"\nheld-out prompts: {len(prompts)}, {cfg.num_samples} samples each (± clustered by prompt); "
          f"reference = {ref_from}, policy = {cfg.init_from}")
    print(f"{'':34s} {'reference (SFT)':>18s} {'policy (DPO)':>18s}")
    for r in rows:
        print(f"{r[0]:34s} {r[1]:>18s} {r[2]:>18s}")
    summary = {n: {k: (mean(v) if isinstance(v, list) else v) for k, v in d.items()}
               for n, d in res.items()}
    summary = summary | {"sampled_sem": sems, "kl": mean(kl), "kl_sem": kl_sem, "implicit_acc": implicit_acc,
                         "prompts": len(prompts)}
    # one JSON line for scripts
    print(json.dumps({"init_from": cfg.init_from, "ref_from": ref_from, "seed": cfg.seed, **summary}))
    return summary


def mean(xs):
    return float(np.mean(xs))


def demo():
    """the whole toy pipeline in one command: prepare, SFT, DPO against the SFT model, the
    before/after table. data and checkpoints go to data/toy and out/ under the current folder.
    each stage trains into out/NAME.tmp, which replaces out/NAME once done: a stop leaves out/NAME
    as it was, and the rerun goes on at the stopped stage (those before it are done)"""
    import prepare
    times, t0 = {}, time.time()
    if not list_shards("data/toy", "train", required=False):
        prepare.prepare(prepare.parse_args([]))
    times["prepare"] = time.time() - t0
    stages = ("toy_sft", "toy_dpo")
    stopped = [i for i, name in enumerate(stages) if os.path.isdir(f"out/{name}.tmp")]
    for name in stages[max(stopped, default=0):]:
        print(f"\n=== {name}", flush=True)
        t = time.time()
        staging = f"out/{name}.tmp"
        args = [f"--config={os.path.join(CONFIG_DIR, name)}.py", f"--out_dir={staging}"]
        if os.path.isfile(os.path.join(staging, "ckpt.pt")):
            args.append("--init_from=resume")
        dpo.train(dpo.parse_config(args), continue_with=DEMO)
        swap(staging, f"out/{name}")
        times[name[4:]] = time.time() - t
    t = time.time()
    args = [f"--config={os.path.join(CONFIG_DIR, 'toy_dpo')}.py", "--init_from=out/toy_dpo"]
    cfg = dpo.parse_config(args, SampleConfig)
    compare(cfg, torch.device("cpu"))
    times["compare"] = time.time() - t
    parts = ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
    print(f"\ntotal {time.time() - t0:.0f}s ({parts})")


def swap(staging, final):
    """staging replaces final, by renames (the earlier final is removed last)"""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def check(cfg, argv):
    """the sampling options, one rule each"""
    if cfg.mode not in ("sample", "compare", "demo"):
        raise ValueError(f"--mode={cfg.mode}: expected sample | compare | demo")
    others = [a for a in argv if not a.startswith("--mode=")]
    if cfg.mode == "demo" and others:
        raise ValueError(f"--mode=demo runs config/toy_sft.py and config/toy_dpo.py as they are: "
                         f"it takes no other options (got {' '.join(others)})")
    if cfg.top_k < 0:
        raise ValueError(f"--top_k={cfg.top_k} is below 0: expected top_k >= 0 (0 = all tokens)")
    if not cfg.temperature >= 0:
        raise ValueError(f"--temperature={cfg.temperature}: expected temperature >= 0 (0 = greedy)")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens={cfg.max_new_tokens}: expected max_new_tokens >= 1")
    if cfg.num_samples < 1:
        raise ValueError(f"--num_samples={cfg.num_samples}: expected num_samples >= 1")
    if cfg.mode == "sample" and cfg.num_samples != SampleConfig.num_samples:
        raise ValueError(f"--num_samples={cfg.num_samples}: the samples per prompt of "
                         f"--mode=compare; --mode=sample draws one per prompt and model")
    prompts = cfg.prompts.split("|")
    if cfg.mode == "sample" and cfg.prompts and "" in prompts:  # a prompt of no tokens
        which = f"prompt {prompts.index('') + 1} of {len(prompts)}"
        raise ValueError(f"--prompts={cfg.prompts}: {which} is empty; expected \"|\"-separated "
                         f"prompts, each with some text")


def main(argv):
    cfg = dpo.parse_config(argv, SampleConfig)
    path = None
    if cfg.mode != "demo" and cfg.init_from != "scratch":
        path = checkpoint.checkpoint_path(cfg.init_from)
    if path:  # one of our runs: its options unless the command line names them
        saved = checkpoint.read_checkpoint(path, mmap=True).get("config", {})
        skip = checkpoint.MACHINE + ("init_from", "out_dir")  # where this process runs, what it loads
        cfg = dpo.parse_config(argv, SampleConfig, {k: v for k, v in saved.items() if k not in skip})
    check(cfg, argv)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run = {"sample": sample, "compare": compare, "demo": lambda cfg, device: demo()}[cfg.mode]
    run(cfg, torch.device(device))


def on_signal(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, on_signal)  # the demo's training loop has its own (dpo.py's)
    signal.signal(signal.SIGTERM, on_signal)  # a kill or a scheduler: as Ctrl-C
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, PrepareError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except launch.Interrupted:  # the demo's training said where it saved and what continues
        sys.exit(130)
    except KeyboardInterrupt as e:
        again = shlex.join(["python", *sys.argv])  # this command
        print(f"\n{str(e) or 'SIGINT'}: sample.py stopped, nothing half-written; continue with: "
              f"{again}", file=sys.stderr)
        sys.exit(130)
