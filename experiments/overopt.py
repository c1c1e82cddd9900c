"""
Over-optimization on the toy task (issue 28): where DPO and online DPO, aimed at a learned judge,
part ways with the ground truth. Per seed, from toy data and the SFT model (toy_losses.py's recipe):

    rm_all, rm_tenth   reward models (dpo.py --loss_type=reward from the SFT model) on all the train
                       pairs and on a tenth (prepare.py --toy_pairs=600: the same first pairs)
    online_JUDGE       online DPO (config/toy_online.py, 8 rounds of 25 steps, 800 fresh pairs each)
                       judged by rm_all, rm_tenth or the exact reward (toy), at beta 0.1;
    online_JUDGE_b0.01 the same at beta 0.01
    offline_bBETA      offline DPO (config/toy_dpo.py) at beta 0.01, 0.1, 1.0 for 3 passes over the
                       pairs, with dpo.py's judged eval (--eval_judge=toy) every 25 steps
    bon                best-of-n from the SFT model, n = 1..64, picked by each judge

Every policy is scored the same way: 8 samples (temperature 1, 32 new tokens) of each of the 30
held-out prompts, their exact reward (gold), each reward model's score (proxy) and KL(policy || SFT)
from the policy's own samples; ± is a standard error clustered by prompt. Results go to
OUT/results.jsonl, a line per piece; pieces already there are skipped, so it runs in pieces:

    python experiments/overopt.py                       # seeds 1-3, every piece (hours of one core)
    python experiments/overopt.py --seeds=2 --pieces=online_rm_tenth,offline_b0.01   # a piece
    python experiments/overopt.py --table               # only the tables of what is there
    python experiments/overopt.py --plot=img/overopt.png   # the figure (pip install matplotlib)
Options: --seeds, --pieces, --out (default out/overopt), --table, --plot.
Every subprocess and this script run at one thread (OMP_NUM_THREADS=1).
"""
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from toy_losses import ROOT, once, pm, sh

sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402  (the repository's modules, after the path is set)
import judged  # noqa: E402
import judges  # noqa: E402
from batches import PairData  # noqa: E402
from prepare import gpt2_encoding  # noqa: E402
from toy import TOY_SPLIT, make_toy_pairs, toy_reward  # noqa: E402

JUDGES = ("rm_all", "rm_tenth", "toy")
BETAS = ("0.01", "0.1", "1.0")
ONLINE_BETAS = ("0.1", "0.01")  # config/toy_online.py's beta, and a push 10x further
PIECES = ([f"online_{j}" + ("" if b == "0.1" else f"_b{b}") for b in ONLINE_BETAS for j in JUDGES]
          + [f"offline_b{b}" for b in BETAS] + ["bon"])
ONLINE = ["--rounds=8", "--prompts_per_round=800"]  # toy_online.py's 200 steps in 8 rounds
# both reward models: 480 steps, about 3 passes over all the pairs, 30 over a tenth
RM = ["--loss_type=reward", "--max_iters=480", "--global_batch_size=32", "--batch_size=32",
      "--learning_rate=1e-4", "--min_lr=1e-5", "--warmup_iters=10", "--eval_interval=80", "--log_interval=40"]
PROMPTS, SAMPLES, TOKENS = 30, 8, 32  # the judged eval: every held-out prompt, 8 samples, 32 tokens
BON_DRAWS = 128  # SFT samples per prompt for best-of-n: 128 / n disjoint groups of n
BEST_OF = (1, 2, 4, 8, 16, 32, 64)
TRAIN_PAIRS_PER_STEP = 32


def paths(seed, out):
    d = os.path.join(out, f"seed{seed}")
    return SimpleNamespace(dir=d, log=os.path.join(d, "log.txt"), data=os.path.join(d, "data"),
                           tenth=os.path.join(d, "data_tenth"), sft=os.path.join(d, "sft"),
                           rm_all=os.path.join(d, "rm_all"), rm_tenth=os.path.join(d, "rm_tenth"))


def setup(seed, out):
    """toy data (all, a tenth), the SFT model, the two reward models -> paths"""
    p = paths(seed, out)
    os.makedirs(p.dir, exist_ok=True)
    py = sys.executable
    prepare = [py, "prepare.py", f"--seed={seed}", "--num_workers=1"]
    once(os.path.join(p.dir, "prepared.json"), [*prepare, f"--out_dir={p.data}"], p.log)
    tenth = [*prepare, f"--out_dir={p.tenth}", "--toy_pairs=600"]
    once(os.path.join(p.dir, "prepared_tenth.json"), tenth, p.log)
    sft = [py, "dpo.py", "--config=config/toy_sft.py", f"--seed={seed}", f"--data_dir={p.data}",
           f"--out_dir={p.sft}"]
    once(os.path.join(p.dir, "sft.json"), sft, p.log)
    for name, data in (("rm_all", p.data), ("rm_tenth", p.tenth)):
        cmd = [py, "dpo.py", *RM, f"--seed={seed}", f"--data_dir={data}",
               f"--init_from={p.sft}", f"--out_dir={getattr(p, name)}"]
        once(os.path.join(p.dir, f"{name}.json"), cmd, p.log)
    return p


# -----------------------------------------------------------------------------
# scoring: gold (the exact reward), proxy (each reward model), KL from SFT

def load(path):
    cfg = SimpleNamespace(dropout=0.0, seed=0, data_dir="", block_size=0)
    return checkpoint.load_model(path, cfg).eval()


def spec(p, judge):
    """a judge's name -> its judges.py spec"""
    return "toy" if judge == "toy" else f"rm:{getattr(p, judge)}"


def load_judges(p):
    return {name: judges.load_judge(spec(p, name)) for name in JUDGES}


def val_prompts(p, block_size):
    """the unique held-out prompts (token lists), in the data's order, as dpo.py's judged eval"""
    val = PairData(p.data, "val", block_size, truncate=True)
    unique = dict.fromkeys(tuple(val[i][0].tolist()) for i in range(len(val)))
    return [list(x) for x in unique][:PROMPTS]


def summary(values, clusters):
    values = np.asarray(values, dtype=np.float64).ravel()
    return {"mean": float(values.mean()), "se": judged.clustered_sem(values, clusters)}


def score(p, js, samples, prompts):
    """(n, k) samples -> {judge: (n, k) rewards}"""
    enc = gpt2_encoding()
    texts = [enc.decode(x) for x in prompts]
    k = len(samples[0])
    return {name: judged.judge_samples(judge, spec(p, name), texts, samples, k)
            for name, judge in js.items()}


def evaluate(p, js, sft, policy_path, seed):
    """a policy's gold and proxy rewards and KL from SFT on the held-out prompts"""
    policy = load(policy_path)
    prompts = val_prompts(p, policy.config.block_size)
    gen = judged.generator("cpu", seed, judged.POLICY_STREAM)
    with torch.no_grad():
        samples = judged.draw(policy, prompts, SAMPLES, TOKENS, gen)
        kl = [judged.sequence_logps(policy, x, s) - judged.sequence_logps(sft, x, s)
              for x, s in zip(prompts, samples)]
    clusters = np.repeat(np.arange(len(prompts)), SAMPLES)
    rewards = score(p, js, samples, prompts)
    res = {name: summary(r, clusters) for name, r in rewards.items()}
    return {**res, "kl": summary(kl, clusters)}


def rm_accuracy(p, js, seed):
    """each reward model's accuracy on all the held-out pairs' gold labels (chosen has the higher
    exact reward); the val pairs are the same whichever slice a model trained on"""
    val = [x for x in make_toy_pairs(6000, seed) if TOY_SPLIT[x["prompt"]] == "val"]
    prompts = [x["prompt"] for x in val]
    res = {}
    for name in ("rm_all", "rm_tenth"):
        chosen = np.array(js[name](prompts, [x["chosen"] for x in val]))
        rejected = np.array(js[name](prompts, [x["rejected"] for x in val]))
        acc = float(np.mean(chosen > rejected))
        res[name] = {"acc": acc, "pairs": len(val), "se": math.sqrt(acc * (1 - acc) / len(val))}
    return res


# -----------------------------------------------------------------------------
# the pieces: each returns its result line

def online_judge(piece):
    """online_JUDGE or online_JUDGE_bBETA -> JUDGE, BETA"""
    judge, _, beta = piece[len("online_"):].rpartition("_b")
    return (judge, beta) if judge else (beta, "0.1")


def online_piece(seed, p, js, sft, piece):
    run = os.path.join(p.dir, piece)
    judge, beta = online_judge(piece)
    cmd = [sys.executable, "online.py", "--config=config/toy_online.py", *ONLINE, f"--seed={seed}",
           f"--data_dir={p.data}", f"--init_from={p.sft}", f"--out_dir={run}", f"--judge={spec(p, judge)}",
           f"--beta={beta}"]
    _, seconds = sh(cmd, p.log)
    rounds = sorted(r for r in os.listdir(run) if r.startswith("round_"))
    points = [{"step": 0, **evaluate(p, js, sft, p.sft, seed)}]
    for r in rounds:
        info = json.load(open(os.path.join(run, r, "round.json")))
        step = max(m["iter"] for m in map(json.loads, open(os.path.join(run, r, "metrics.jsonl"))))
        points.append({"round": int(r[6:]), "step": step, "train_score": info.get("sample_score"),
                       **evaluate(p, js, sft, os.path.join(run, r), seed)})
    add_agreement(points, run)
    return {"points": points, "seconds": seconds}


def add_agreement(points, run):
    """how often the judge's chosen response of a round's pairs has the higher gold reward (a tie
    counts 1/2): the judge's accuracy on the pairs of the policy that sampled them, points[r]"""
    for r, point in enumerate(points[:-1]):
        rows = map(json.loads, open(os.path.join(run, f"round_{r:03d}", "pairs", "pairs.jsonl")))
        gold = np.array([(toy_reward(x["chosen"]), toy_reward(x["rejected"])) for x in rows])
        chosen, rejected = gold[:, 0], gold[:, 1]
        point["judge_agreement"] = float(np.mean(chosen > rejected) + 0.5 * np.mean(chosen == rejected))


def offline_piece(seed, p, beta):
    run = os.path.join(p.dir, f"offline_b{beta}")
    pairs = json.load(open(os.path.join(p.data, "meta.json")))["pairs"]["train"]
    steps = 3 * pairs // TRAIN_PAIRS_PER_STEP
    judged_eval = ["--eval_interval=25", "--eval_judge=toy", f"--eval_judge_prompts={PROMPTS}",
                   f"--eval_judge_samples={SAMPLES}", f"--eval_judge_tokens={TOKENS}"]
    cmd = [sys.executable, "dpo.py", "--config=config/toy_dpo.py", f"--seed={seed}", f"--data_dir={p.data}",
           f"--init_from={p.sft}", f"--out_dir={run}", f"--beta={beta}", f"--max_iters={steps}",
           "--log_interval=25", *judged_eval]
    _, seconds = sh(cmd, p.log)
    return {"points": offline_points(run), "seconds": seconds, "steps": steps}


def offline_points(run):
    """the judged evals of a dpo.py run, with DPO's own held-out numbers (its proxy: the loss)"""
    points = []
    for m in map(json.loads, open(os.path.join(run, "metrics.jsonl"))):
        if "judge/reward" not in m:
            continue
        gold = {"mean": m["judge/reward"], "se": m["judge/reward_se"]}
        kl = {"mean": m["judge/kl"], "se": m["judge/kl_se"]}
        keys = ("val/loss", "val/accuracy", "val/chosen_logp", "val/rejected_logp")
        held_out = {key.replace("/", "_"): m[key] for key in keys}
        points.append({"step": m["iter"], "toy": gold, "kl": kl, **held_out})
    return points


def bon_piece(seed, p, js, sft):
    """best-of-n from SFT: BON_DRAWS samples per prompt in disjoint groups of n; each judge picks
    its best of each group; the pick's gold and proxy rewards. KL = log n - (n - 1) / n"""
    t = time.time()
    prompts = val_prompts(p, sft.config.block_size)
    gen = judged.generator("cpu", seed, 3)  # a stream of its own
    with torch.no_grad():
        samples = judged.draw(sft, prompts, BON_DRAWS, TOKENS, gen)
    rewards = score(p, js, samples, prompts)  # judge -> (prompts, BON_DRAWS)
    res = {}
    for picker in JUDGES:
        points = []
        for n in BEST_OF:
            shape = (len(prompts), BON_DRAWS // n, n)
            groups = {name: r.reshape(shape) for name, r in rewards.items()}
            best = groups[picker].argmax(-1)[..., None]  # (prompts, groups, 1)
            clusters = np.repeat(np.arange(len(prompts)), BON_DRAWS // n)
            picked = {name: summary(np.take_along_axis(g, best, -1), clusters)
                      for name, g in groups.items()}
            kl = math.log(n) - (n - 1) / n
            points.append({"n": n, **picked, "kl": {"mean": kl, "se": 0.0}})
        res[picker] = points
    return {"by": res, "seconds": time.time() - t}


def run_seed(seed, pieces, out, done):
    p = setup(seed, out)
    js = load_judges(p)
    sft = load(p.sft)
    if (seed, "rm_accuracy") not in done:
        write(out, done, seed, "rm_accuracy", rm_accuracy(p, js, seed))
    for piece in pieces:
        if (seed, piece) in done:
            continue
        print(f"seed {seed} {piece}: running", flush=True)
        t = time.time()
        if piece.startswith("online_"):
            res = online_piece(seed, p, js, sft, piece)
        elif piece.startswith("offline_b"):
            res = offline_piece(seed, p, piece[len("offline_b"):])
        else:
            res = bon_piece(seed, p, js, sft)
        write(out, done, seed, piece, res)
        print(f"seed {seed} {piece}: done in {time.time() - t:.0f}s", flush=True)


def write(out, done, seed, piece, res):
    res = {"seed": seed, "piece": piece, **res}
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")
    done[seed, piece] = res


def read(out):
    path = os.path.join(out, "results.jsonl")
    if not os.path.exists(path):
        return {}
    return {(r["seed"], r["piece"]): r for r in map(json.loads, open(path))}


# -----------------------------------------------------------------------------
# tables and the figure

def curves(done):
    """(seed, run) -> [(kl, gold, proxy or None)] along each run, with its SEs"""
    out = {}
    for (seed, piece), r in done.items():
        if piece.startswith("online_"):
            judge, _ = online_judge(piece)
            out[seed, piece] = [(x["kl"], x["toy"], x[judge]) for x in r["points"]]
        elif piece.startswith("offline_b"):
            out[seed, piece] = [(x["kl"], x["toy"], None) for x in r["points"]]
        elif piece == "bon":
            for picker, points in r["by"].items():
                out[seed, f"bon_{picker}"] = [(x["kl"], x["toy"], x[picker]) for x in points]
    return out


def peaks(points):
    """one run's curve -> its start, peak and end: gold, KL, proxy"""
    best = max(range(len(points)), key=lambda i: points[i][1]["mean"])
    first, peak, last = points[0], points[best], points[-1]
    res = {"gold0": first[1]["mean"], "gold_peak": peak[1]["mean"], "kl_peak": peak[0]["mean"],
           "gold_end": last[1]["mean"], "kl_end": last[0]["mean"]}
    res["drop"] = res["gold_end"] - res["gold_peak"]
    if last[2]:
        res.update(proxy0=first[2]["mean"], proxy_end=last[2]["mean"])
    return res


def table(done):
    seeds = sorted({s for s, _ in done})
    print("| seed | reward model | trained on | accuracy on all held-out pairs |\n|---|---|---|---|")
    for seed in seeds:
        acc = done.get((seed, "rm_accuracy"))
        for name, what in (("rm_all", "all train pairs"), ("rm_tenth", "a tenth")) if acc else ():
            print(f"| {seed} | {name} | {what} | {acc[name]['acc']:.3f} ± {acc[name]['se']:.3f} "
                  f"({acc[name]['pairs']} pairs) |")
    runs = curves(done)
    names = sorted({r for _, r in runs}, key=lambda r: (panel_key(r), r))
    print("\n(means over seeds ± their standard error)\n")
    print("| run | seeds | gold at start | peak gold | KL at the peak | gold at the end | KL at the end "
          "| end - peak | proxy at start -> end; judge's agreement with gold, first -> last round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        rows = [peaks(runs[s, name]) for s in seeds if (s, name) in runs]
        digits = {"kl_peak": ".2f", "kl_end": ".2f", "proxy0": "+.2f", "proxy_end": "+.2f"}
        cell = {k: pm([r[k] for r in rows], digits.get(k, "+.3f")) for k in rows[0]}
        proxy = f"{cell['proxy0']} -> {cell['proxy_end']}" if "proxy0" in cell and "toy" not in name else ""
        agree = [[x["judge_agreement"] for x in done[s, name]["points"][:-1]] for s in seeds
                 if (s, name) in done and "judge_agreement" in done[s, name]["points"][0]]
        if agree and "toy" not in name:
            proxy += f"; {pm([a[0] for a in agree], '.2f')} -> {pm([a[-1] for a in agree], '.2f')}"
        print(f"| {name} | {len(rows)} | {cell['gold0']} | {cell['gold_peak']} | {cell['kl_peak']} "
              f"| {cell['gold_end']} | {cell['kl_end']} | {cell['drop']} | {proxy} |")
    for (seed, run), points in sorted(runs.items()):
        cells = [f"{kl['mean']:.2f}: {gold['mean']:+.3f}" + (f" / {proxy['mean']:+.2f}" if proxy else "")
                 for kl, gold, proxy in points]
        print(f"\nseed {seed} {run} (KL: gold / proxy): {', '.join(cells)}")
    print()
    for (seed, piece), r in sorted(done.items()):
        if "seconds" in r:
            print(f"seed {seed} {piece}: {r['seconds']:.0f}s")


def panel_key(run):
    """a run -> (its panel, its line's key): online runs by beta and judge, offline by beta"""
    if run.startswith("online_"):
        judge, beta = online_judge(run)
        return f"online DPO, beta {beta}, judged by", judge
    if run.startswith("offline_b"):
        return "offline DPO, 3 passes, beta", run[len("offline_b"):]
    return "best-of-n from SFT, picked by", run[len("bon_"):]


def plot(done, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"rm_all": "tab:blue", "rm_tenth": "tab:red", "toy": "tab:green",
              "0.01": "tab:purple", "0.1": "tab:orange", "1.0": "tab:brown"}
    titles = ["online DPO, beta 0.1, judged by", "online DPO, beta 0.01, judged by",
              "offline DPO, 3 passes, beta", "best-of-n from SFT, picked by"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    axes = dict(zip(titles, axes.ravel()))
    twins, labelled = {}, set()
    runs = curves(done)
    for (seed, run), points in sorted(runs.items()):  # each seed its own line: they peak at other steps
        title, key = panel_key(run)
        ax = axes[title]
        kl = [x[0]["mean"] for x in points]
        seeds = sum(r == run for _, r in runs)
        label = None if (title, key) in labelled else f"{key} ({seeds} seed{'s' * (seeds > 1)})"
        labelled.add((title, key))
        ax.plot(kl, [x[1]["mean"] for x in points], "-o", ms=2.5, lw=1, color=colors[key], label=label)
        if points[-1][2] and key != "toy":  # the proxy: a reward model's own score, its own scale
            if title not in twins:
                twins[title] = ax.twinx()
                twins[title].set_ylabel("reward model's score (dashed)")
            twins[title].plot(kl, [x[2]["mean"] for x in points], "--", lw=1, color=colors[key], alpha=0.6)
    for title, ax in axes.items():
        ax.set_title(title, fontsize=10)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL(policy || SFT), nats (log scale above 1)")
        ax.set_ylabel("gold reward (solid)")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv):
    opts = {"seeds": "1,2,3", "pieces": ",".join(PIECES), "out": "out/overopt"}
    flags = set()
    for a in argv:
        key, eq, value = a.lstrip("-").partition("=")
        if key in ("table",) and not eq:
            flags.add(key)
        elif key in opts or key == "plot":
            opts[key] = value
        else:
            sys.exit(f"unknown option {a}; see --help" if a not in ("-h", "--help") else __doc__)
    out = os.path.join(ROOT, opts["out"]) if not os.path.isabs(opts["out"]) else opts["out"]
    os.makedirs(out, exist_ok=True)
    done = read(out)
    if "table" not in flags and "plot" not in opts:
        pieces = opts["pieces"].split(",")
        unknown = [x for x in pieces if x not in PIECES]
        if unknown:
            sys.exit(f"--pieces: unknown {','.join(unknown)}; expected some of {','.join(PIECES)}")
        torch.set_num_threads(1)
        for seed in map(int, opts["seeds"].split(",")):
            run_seed(seed, pieces, out, done)
    table(done)
    if "plot" in opts:
        plot(done, opts["plot"])


if __name__ == "__main__":
    main(sys.argv[1:])
