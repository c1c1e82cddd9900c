"""
Online DPO from the pieces that exist. Each round (1) samples num_samples responses per prompt from
the current policy, (2) scores each with a judge, (3) keeps the best as chosen and the worst as
rejected (a prompt whose scores all tie gives way to the next), (4) writes the pairs with
prepare.py's ShardWriter and (5) trains one round of dpo.py's train() on them. The reference stays
the starting (SFT) model, so beta * log pi/pi_ref measures the distance from one anchor; each round
resumes the last one's checkpoint, so one AdamW state and one warmup + cosine schedule (max_iters in
all) run through the rounds: against offline DPO with the same options, only the pairs differ.

    python prepare.py && python dpo.py --config=config/toy_sft.py  # toy data and the SFT model
    python online.py --config=config/toy_online.py  # 4 rounds -> out/toy_online/round_000 .. 003
    python sample.py --mode=compare --config=config/toy_dpo.py --init_from=out/toy_online/round_003
    python online.py --config=config/toy_online.py --judge=my_judge:score  # (prompt, response) -> float
A stopped run goes on with the same command. out_dir/round_NNN/ holds pairs/ (the round's shards,
pairs.jsonl as text, links to data_dir's val shards: evals are on the offline val pairs), ckpt.pt,
metrics.jsonl and round.json (written last: the round is done). Any dpo.py option is accepted.
Left out: generating inside the training loop, pairwise judges, torchrun, a moving reference.
"""
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import checkpoint
import dpo
from judges import load_judge, score
from prepare import EOT, PrepareError, ShardWriter, gpt2_encoding, list_shards


@dataclass
class OnlineConfig(dpo.Config):
    init_from: str = "out/toy_sft"  # the first round's policy, and the fixed reference of every round
    rounds: int = 4  # max_iters is split evenly over them
    prompts_per_round: int = 1600  # = pairs per round; prompts are drawn from data_dir's train split
    num_samples: int = 2  # k responses per prompt: the best is chosen, the worst rejected
    judge: str = "toy"  # toy | module:function, (prompt text, response text) -> float | rm:PATH (judges.py)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0 = all tokens
    generate_batch: int = 64  # rows per generate call (a call runs until its longest row ends: small wastes less)


def sample_pairs(policy, prompts, cfg, r, device):
    """round r's pairs: (prompt, chosen, rejected) token lists, scores; prompts in a seeded order"""
    enc, judge, k = gpt2_encoding(), load_judge(cfg.judge, device), cfg.num_samples
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + r)  # reruns: same pairs
    order = np.random.default_rng([cfg.seed, r]).permutation(len(prompts))
    pairs, scores, tried = [], [], 0
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
        rows = [row[T:].tolist() for row in out]
        rows = [x[:x.index(EOT) + 1] if EOT in x else x for x in rows]  # with EOT, as prepare
        texts = [enc.decode(p) for p in batch for _ in range(k)]
        batch_scores = score(judge, cfg.judge, texts, [enc.decode([t for t in x if t != EOT]) for x in rows])
        for i, p in enumerate(batch):  # one judge call per generate call: an rm: judge runs batched
            resp, s = rows[i * k:(i + 1) * k], batch_scores[i * k:(i + 1) * k]
            scores += s
            best, worst = int(np.argmax(s)), int(np.argmin(s))
            if s[best] > s[worst] and resp[best] != resp[worst]:
                pairs.append((p, resp[best], resp[worst], s[best], s[worst]))
    return pairs, {"prompts_tried": tried, "sample_score": float(np.mean(scores)),
                   "chosen_score": float(np.mean([x[3] for x in pairs])),
                   "rejected_score": float(np.mean([x[4] for x in pairs]))}


def write_pairs(pairs, folder, val_shards, stats, caches):
    """the round's train shard, the pairs as text, the judge's stats, links to the offline val
    shards (and copies of their reference log-probs, the same in every round); all or nothing"""
    tmp, enc = folder.with_name(folder.name + ".tmp"), gpt2_encoding()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = ShardWriter(tmp, "train", len(pairs))
    w.add(np.array([[len(x) for x in p[:3]] for p in pairs], dtype=np.int32),
          np.array([t for p in pairs for x in p[:3] for t in x], dtype=np.uint16))
    w.close()
    with open(tmp / "pairs.jsonl", "w") as f:
        for p, c, rj, sc, sr in pairs:
            row = {"prompt": enc.decode(p), "chosen": enc.decode(c), "rejected": enc.decode(rj),
                   "chosen_score": sc, "rejected_score": sr}
            f.write(json.dumps(row) + "\n")
    (tmp / "judge.json").write_text(json.dumps(stats))
    for v in val_shards:
        os.symlink(os.path.abspath(v), tmp / os.path.basename(v))
    for c in caches:
        shutil.copyfile(c, tmp / c.name)
    os.replace(tmp, folder)


def online(cfg):
    """all rounds -> their round.json records (round r starts at step r * max_iters // rounds)"""
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("online.py runs as one process (its sampling is not split over ranks): "
                         "run it without torchrun")
    block = checkpoint.load_model(cfg.init_from, cfg).config.block_size
    train = dpo.PairData(cfg.data_dir, "train", block, truncate=True)  # prompts; checks data_dir
    prompts = [list(x) for x in dict.fromkeys(tuple(train[i][0].tolist()) for i in range(len(train)))]
    val = list_shards(cfg.data_dir, "val", required=False)
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(dpo.Config)}
    records, t0 = [], time.time()
    for r in range(cfg.rounds):
        d, prev = Path(cfg.out_dir) / f"round_{r:03d}", Path(cfg.out_dir) / f"round_{r - 1:03d}"
        if (d / "round.json").exists():
            records.append(json.loads((d / "round.json").read_text()))
            continue
        t = time.time()
        if not (d / "pairs").exists():  # (1)-(4); a round stopped while training keeps its pairs
            policy = checkpoint.load_model(str(prev) if r else cfg.init_from, cfg).to(device)
            pairs, stats = sample_pairs(policy, prompts, cfg, r, device)
            caches = [*Path(cfg.data_dir).glob("ref_logps_val_*.pt"),
                      *(prev / "pairs").glob("ref_logps_val_*.pt")]
            stats = {**stats, "pairs": len(pairs), "sample_s": time.time() - t}
            write_pairs(pairs, d / "pairs", val, stats, caches)
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
        resume = (d / "ckpt.pt").exists()
        hist = dpo.train(dpo.Config(**{**base, "out_dir": str(d), "data_dir": str(d / "pairs"),
                                       "init_from": "resume" if resume else cfg.init_from,
                                       "max_iters": (r + 1) * cfg.max_iters // cfg.rounds,
                                       "lr_decay_iters": cfg.lr_decay_iters or cfg.max_iters}))
        rec = {"round": r, **stats, "train_s": time.time() - t, "iter": (r + 1) * cfg.max_iters // cfg.rounds,
               "train_accuracy": float(np.mean([h["accuracy"] for h in hist])) if hist else None}
        (d / "round.json").write_text(json.dumps(rec))
        records.append(rec)
    last = Path(cfg.out_dir) / f"round_{cfg.rounds - 1:03d}"
    print(f"online: {cfg.rounds} rounds in {time.time() - t0:.0f}s; the policy is {last}")
    return records


def main(argv):
    cfg = dpo.parse_config(argv, OnlineConfig)
    smallest = min(cfg.rounds, cfg.prompts_per_round, cfg.max_new_tokens, cfg.generate_batch)
    if smallest < 1 or cfg.num_samples < 2 or cfg.temperature <= 0 or cfg.top_k < 0 \
            or cfg.max_iters < cfg.rounds:
        raise ValueError("expected rounds, prompts_per_round, max_new_tokens, generate_batch >= 1, "
                         "num_samples >= 2, temperature > 0, top_k >= 0 and max_iters >= rounds")
    load_judge(cfg.judge)  # a bad --judge fails now, not after the first round
    online(cfg)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, PrepareError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (checkpoint.Interrupted, KeyboardInterrupt):
        sys.exit(130)
