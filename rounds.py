"""
online.py's out_dir on disk: each round's pairs written all or nothing, the run's options in
online.json, and what a rerun on the same out_dir may change.
"""
import json
import os
import shutil

import numpy as np

import checkpoint
from prepare import gpt2_encoding
from shards import ShardWriter


# a rerun that changed one of these would mix rounds sampled, judged or trained differently
SAME_EVERY_ROUND = ("judge", "num_samples", "prompts_per_round", "max_new_tokens", "temperature",
                    "top_k", "init_from", "data_dir") + checkpoint.FIXED


def write_pairs(pairs, folder, val_shards, stats, caches):
    """the round's train shard, the pairs as text, the judge's stats, links to the offline val
    shards (and copies of their reference log-probs, the same in every round); all or nothing"""
    tmp, enc = folder.with_name(folder.name + ".tmp"), gpt2_encoding()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
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
    finally:  # an error or a stop while writing: no pairs.tmp stays
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj):
    """write, then rename: the file is whole or absent"""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def begin(cfg, out):
    """a run or a rerun on out_dir (locked): each option changed since online.json printed, one that
    would mix rounds refused, a round of 0 steps refused; stale temp folders removed. -> the
    records of the rounds done"""
    saved = {}
    if (out / "online.json").exists():
        saved = json.loads((out / "online.json").read_text())
    changes = {k: (v, getattr(cfg, k)) for k, v in saved.items() if getattr(cfg, k, v) != v}
    changes.pop("out_dir", None)  # the same run, moved
    mixing = [k for k in changes if k in SAME_EVERY_ROUND]
    if mixing and any(out.glob("round_*/pairs")):  # no round sampled yet: nothing to mix
        asked = ", ".join(f"--{k}={checkpoint.show(changes[k][1])}" for k in mixing)
        had = ", ".join(f"{k}={checkpoint.show(changes[k][0])}" for k in mixing)
        them = "them" if len(mixing) > 1 else "it"
        raise ValueError(f"{out}: {asked} would mix rounds ({had} there): drop {them} to continue "
                         f"the run as it was, or start a new run with another --out_dir")
    for k, (old, new) in changes.items():
        print(f"online: {k} {checkpoint.show(old)} -> {checkpoint.show(new)}")
    records = []
    while len(records) < cfg.rounds and (out / f"round_{len(records):03d}" / "round.json").exists():
        records.append(json.loads((out / f"round_{len(records):03d}" / "round.json").read_text()))
    done = len(records)
    ended = records[-1]["iter"] if records else 0
    if done < cfg.rounds and (done + 1) * cfg.max_iters // cfg.rounds <= ended:
        steps = max(ended // done, 1)
        raise ValueError(f"--rounds={cfg.rounds} --max_iters={cfg.max_iters}: round {done} would "
                         f"train 0 steps (round {done - 1} ended at step {ended}): raise --max_iters "
                         f"(--max_iters={ended + steps * (cfg.rounds - done)} keeps {steps} steps a "
                         f"round)")
    for stale in out.glob("round_*/pairs.tmp"):  # a run killed while writing them
        shutil.rmtree(stale)
    return records


