"""
Online DPO from the pieces that exist. Each round (1) samples num_samples responses per prompt from
the current policy, (2) scores each with a judge, (3) keeps the best as chosen and the worst as
rejected (a prompt whose scores all tie gives way to the next), (4) writes the pairs as shards and
(5) trains one round of dpo.py's train() on them. The reference stays the starting (SFT) model; each
round resumes the last one's checkpoint, so one AdamW state and one schedule (max_iters in all) run
through the rounds: against offline DPO with the same options, only the pairs differ.

    python prepare.py && python dpo.py --config=config/toy_sft.py  # toy data and the SFT model
    python online.py --config=config/toy_online.py  # 4 rounds -> out/toy_online/round_000 .. 003
    python sample.py --mode=compare --config=config/toy_dpo.py --init_from=out/toy_online/round_003
    python online.py --config=config/toy_online.py --judge=my_judge:score  # any dpo.py option too
A stopped run goes on with the same command; a rerun prints each option it changes and refuses those
that would mix rounds (rounds.py). out_dir holds online.json (the options) and round_NNN/: pairs/
(the round's shards, pairs.jsonl as text, links to data_dir's val shards: evals are on the offline
val pairs), ckpt.pt, metrics.jsonl and round.json (written last: the round is done). Left out:
generating inside the training loop, pairwise judges, torchrun, a moving reference.
"""
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import checkpoint
import dpo
import judges
import launch
import rounds
from prepare import EOT, PrepareError, gpt2_encoding
from shards import list_shards

@dataclass
class OnlineConfig(dpo.Config):
    init_from: str = "out/toy_sft"  # the first round's policy, and the fixed reference of every round
    rounds: int = 4  # max_iters is split evenly over them
    prompts_per_round: int = 1600  # = pairs per round; prompts are drawn from data_dir's train split
    num_samples: int = 2  # k responses per prompt: the best is chosen, the worst rejected
    judge: str = "toy"  # toy | module:function, (prompt, response) -> float | rm:PATH (a reward model)
    judge_timeout: float = 60.0  # seconds a judge call (a function: one pair) may take; 0 = none
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0 = all tokens
    generate_batch: int = 64  # rows per generate call (it runs to its longest row's end)

def sample_pairs(policy, prompts, cfg, r, device):
    """round r's pairs: (prompt, chosen, rejected) token lists, scores; prompts in a seeded order"""
    enc, judge, k = gpt2_encoding(), judges.load_judge(cfg.judge, device), cfg.num_samples
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + r)  # reruns: same pairs
    order = np.random.default_rng([cfg.seed, r]).permutation(len(prompts))
    pairs, scores, tried, t0, shown = [], [], 0, time.time(), 0.0  # shown: when progress was printed
    while len(pairs) < cfg.prompts_per_round:
        if tried >= 10 * cfg.prompts_per_round:
            raise ValueError(f"judge {cfg.judge}: the samples of {tried - len(pairs)} of {tried} "
                             f"prompts tie; raise --num_samples or --temperature")
        n = min(max(cfg.generate_batch // k, 1), cfg.prompts_per_round - len(pairs))
        batch = [prompts[order[(tried + i) % len(order)]] for i in range(n)]
        tried += n
        T = max(map(len, batch))
        idx = torch.tensor([[EOT] * (T - len(p)) + p for p in batch for _ in range(k)], device=device)
        pad = torch.tensor([T - len(p) for p in batch for _ in range(k)], device=device)
        out = policy.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                              generator=g, pad_left=pad)
        resp = [row[T:].tolist() for row in out]
        resp = [x[:x.index(EOT) + 1] if EOT in x else x for x in resp]  # with EOT, as prepare
        prompt_texts = [enc.decode(p) for p in batch for _ in range(k)]
        texts = [enc.decode([t for t in x if t != EOT]) for x in resp]
        batch_scores = judges.score(judge, cfg.judge, prompt_texts, texts, cfg.judge_timeout)
        scores += batch_scores
        for i, p in enumerate(batch):
            s, mine = batch_scores[i * k:(i + 1) * k], resp[i * k:(i + 1) * k]
            best, worst = int(np.argmax(s)), int(np.argmin(s))
            if s[best] > s[worst] and mine[best] != mine[worst]:
                pairs.append((p, mine[best], mine[worst], s[best], s[worst]))
        if time.time() - shown > 5:  # the first line at once, then every 5 s
            shown = time.time()
            eta = (shown - t0) / max(len(pairs), 1) * (cfg.prompts_per_round - len(pairs))
            print(f"round {r} sampling: {len(pairs)}/{cfg.prompts_per_round} pairs from {tried} "
                  f"prompts, eta {eta:.0f}s", flush=True)
    return pairs, {"prompts_tried": tried, "sample_score": float(np.mean(scores)),
                   "chosen_score": float(np.mean([x[3] for x in pairs])),
                   "rejected_score": float(np.mean([x[4] for x in pairs]))}

def one_round(cfg, r, prompts, device, continue_with):
    """sample, judge and write round r's pairs (unless a stopped round left them), then train it"""
    d, prev = Path(cfg.out_dir) / f"round_{r:03d}", Path(cfg.out_dir) / f"round_{r - 1:03d}"
    t = time.time()
    if not (d / "pairs").exists():  # (1)-(4); a round stopped while training keeps its pairs
        policy = checkpoint.load_model(str(prev) if r else cfg.init_from, cfg).to(device)
        pairs, stats = sample_pairs(policy, prompts, cfg, r, device)
        caches = [*Path(cfg.data_dir).glob("ref_logps_val_*.pt"),
                  *(prev / "pairs").glob("ref_logps_val_*.pt")]  # the val pairs' are the same
        stats = {**stats, "pairs": len(pairs), "sample_s": time.time() - t}
        val = list_shards(cfg.data_dir, "val", required=False)
        rounds.write_pairs(pairs, d / "pairs", val, stats, caches)
    stats, t = json.loads((d / "pairs" / "judge.json").read_text()), time.time()
    print(f"round {r}: {stats['pairs']} pairs from {stats['prompts_tried']} prompts, judge "
          f"{cfg.judge}: samples {stats['sample_score']:+.3f}, "
          f"chosen {stats['chosen_score']:+.3f}, rejected {stats['rejected_score']:+.3f}")
    # (5) the previous round's checkpoint goes on with this round's pairs (resume checks them)
    if r and not (d / "ckpt.pt").exists():
        ck = checkpoint.read_checkpoint(str(prev / "ckpt.pt"))
        ck["config"]["data_dir"] = str(d / "pairs")
        ck["data_hash"] = checkpoint.data_hash(str(d / "pairs"))
        checkpoint.atomic_save(ck, str(d / "ckpt.pt"), "checkpoint")
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(dpo.Config)}
    end = (r + 1) * cfg.max_iters // cfg.rounds
    init_from = "resume" if (d / "ckpt.pt").exists() else cfg.init_from
    round_cfg = dpo.Config(**{**base, "out_dir": str(d), "data_dir": str(d / "pairs"),
                              "init_from": init_from, "max_iters": end,
                              "lr_decay_iters": cfg.lr_decay_iters or cfg.max_iters})
    dpo.train(round_cfg, continue_with=continue_with)
    steps = [m for m in map(json.loads, open(d / "metrics.jsonl")) if "loss" in m]  # a stop's too
    accuracy = float(np.mean([m["accuracy"] for m in steps])) if steps else None
    rec = {"round": r, **stats, "train_s": time.time() - t, "iter": end, "train_accuracy": accuracy}
    rounds.write_json(d / "round.json", rec)
    return rec

def online(cfg, continue_with=None):
    """all rounds -> their round.json records (round r starts at step r * max_iters // rounds).
    continue_with: the command a stop prints (main's: this online.py command line)"""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("online.py runs as one process (its sampling is not split over ranks): "
                         "run it without torchrun")
    out, t0 = Path(cfg.out_dir), time.time()
    with launch.lock(cfg.out_dir):  # one online.py per out_dir
        records = rounds.begin(cfg, out)
        if len(records) == cfg.rounds:
            print(f"online: the {cfg.rounds} rounds in {out} are done already, nothing to do "
                  f"(raise --rounds and --max_iters to train more)")
            return records
        block = checkpoint.load_model(cfg.init_from, cfg).config.block_size
        train = dpo.PairData(cfg.data_dir, "train", block, truncate=True)  # prompts; checks data_dir
        firsts = dict.fromkeys(tuple(train[i][0].tolist()) for i in range(len(train)))
        prompts = [list(x) for x in firsts]
        rounds.write_json(out / "online.json", vars(cfg))  # what the next rerun compares with
        for r in range(len(records), cfg.rounds):
            records.append(one_round(cfg, r, prompts, device, continue_with))
    last = out / f"round_{cfg.rounds - 1:03d}"
    print(f"online: {cfg.rounds} rounds in {time.time() - t0:.0f}s; the policy is {last}")
    return records

def command(argv):
    """the online.py command line that continues a stopped run: this one"""
    script = sys.argv[0] if sys.argv[0].endswith("online.py") else "online.py"
    return shlex.join(["python", script, *argv])

def main(argv):
    cfg = dpo.parse_config(argv, OnlineConfig)
    for key in ("rounds", "prompts_per_round", "max_new_tokens", "generate_batch"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be >= 1")
    if cfg.num_samples < 2:
        raise ValueError(f"--num_samples={cfg.num_samples}: must be >= 2 (a best and a worst)")
    if not cfg.temperature > 0:
        raise ValueError(f"--temperature={cfg.temperature}: must be > 0 (online.py samples)")
    if cfg.top_k < 0:
        raise ValueError(f"--top_k={cfg.top_k}: must be >= 0 (0 = all tokens)")
    if cfg.judge_timeout < 0:
        raise ValueError(f"--judge_timeout={cfg.judge_timeout}: must be >= 0 (0 = no limit)")
    if cfg.max_iters < cfg.rounds:
        raise ValueError(f"--max_iters={cfg.max_iters}: must be >= --rounds={cfg.rounds}")
    judges.load_judge(cfg.judge)  # a bad --judge fails now, not after the first round
    online(cfg, continue_with=command(argv))

def on_signal(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)

if __name__ == "__main__":
    signal.signal(signal.SIGINT, on_signal)  # at once outside dpo.train's loop (its own Stop there)
    signal.signal(signal.SIGTERM, on_signal)  # a kill or a scheduler: as Ctrl-C
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, PrepareError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except launch.Interrupted:  # dpo.train said where it saved and what continues
        sys.exit(130)
    except KeyboardInterrupt as e:
        print(f"\n{str(e) or 'SIGINT'}: online.py stopped; the rounds done are kept, nothing is "
              f"half-written; continue with: {command(sys.argv[1:])}", file=sys.stderr)
        sys.exit(130)
