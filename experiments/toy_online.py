"""
Offline vs online DPO on the toy task (issue 20). Per seed, toy_losses.py's steps (toy data, the
SFT model config/toy_sft.py, offline DPO config/toy_dpo.py: 200 steps of 32 pairs, beta 0.1), then
online DPO from the same SFT model with the same options (config/toy_online.py: the 200 steps over
4 rounds of 1600 pairs sampled from the policy and judged by the exact toy reward), each followed by
`sample.py --mode=compare`. Offline runs and their JSON lines go to OUT/results.jsonl (toy_losses.py's
file: its runs are reused), online ones to OUT/online.jsonl. Runs already there are skipped and an
online run that was stopped resumes at its round, so it can run in pieces. From the repository root:

    python experiments/toy_online.py                      # 3 seeds offline, online; seed 1: k=4, sweep
    python experiments/toy_online.py --seeds=2 --runs=k2  # a piece; --sweep=none: no beta sweep
    python experiments/toy_online.py --table              # only the table of what is there
    python experiments/toy_online.py --plot=img/online_reward_kl.png   # the picture (needs matplotlib)
Options: --seeds, --runs, --sweep, --out (default out/online_exp), --table, --plot.
Every subprocess runs with OMP_NUM_THREADS=1.
"""
import json
import os
import re
import sys

import toy_losses
from toy_losses import beta_of, pm, policy_cells, sh

HERE = os.path.dirname(os.path.abspath(__file__))
# with beta 0.1 (the offline run itself) the sweep of seed 1
SWEEP = ["sigmoid@beta=0.03", "sigmoid@beta=0.3", "sigmoid@beta=1.0"]


def read(path):
    """a JSONL file of runs -> {(seed, run): result}"""
    if not os.path.exists(path):
        return {}
    return {(r["seed"], r["run"]): r for r in map(json.loads, open(path))}


def run_online(seed, k, out, done):
    d = os.path.join(out, f"seed{seed}")
    log = os.path.join(d, "log.txt")
    run = os.path.join(d, "runs", f"online_k{k}")
    py = sys.executable
    common = [f"--seed={seed}", f"--data_dir={os.path.join(d, 'data')}"]
    print(f"seed {seed} online k={k}: sampling and training", flush=True)
    sft = os.path.join(d, "sft")
    online_cmd = [py, "online.py", "--config=config/toy_online.py", *common, f"--init_from={sft}",
                  f"--out_dir={run}", f"--num_samples={k}"]
    sh(online_cmd, log)
    round_dirs = [r for r in sorted(os.listdir(run)) if r.startswith("round_")]
    rounds = [json.load(open(os.path.join(run, r, "round.json"))) for r in round_dirs]
    last = os.path.join(run, f"round_{len(rounds) - 1:03d}")
    compare_cmd = [py, "sample.py", "--mode=compare", "--config=config/toy_dpo.py", *common,
                   f"--init_from={last}"]
    out_text, compare_s = sh(compare_cmd, log, capture=True)
    scores = json.loads(out_text.strip().splitlines()[-1])  # compare's last line: its numbers
    train_s = sum(r["train_s"] for r in rounds)
    sample_s = sum(r["sample_s"] for r in rounds)
    res = {"seed": seed, "run": f"online_k{k}", "k": k, "rounds": rounds, "compare_s": compare_s,
           "train_s": train_s, "sample_s": sample_s, **scores}
    res["total_s"] = res["train_s"] + res["sample_s"]  # a resumed run: the sum of all its pieces
    with open(os.path.join(out, "online.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")
    done[seed, res["run"]] = res
    print(f"seed {seed} online k={k}: reward {res['policy']['sampled']:+.3f}, KL {res['kl']:.2f}, "
          f"{res['sample_s']:.0f}s sampling + {res['train_s']:.0f}s training", flush=True)


def table(offline, online):
    seeds = sorted({s for s, n in offline if n == "sigmoid"})
    print(f"\nseeds {','.join(map(str, seeds))}; ± is one standard error over seeds\n")
    print("| run | reward, sampled | reward, greedy | KL(policy ‖ SFT), nats "
          "| implicit reward accuracy | train + sample time (s) |")
    print("|---|---|---|---|---|---|")
    rows = [offline[s, "sigmoid"] for s in seeds]
    if rows:
        sampled = pm([r["reference"]["sampled"] for r in rows])
        greedy = pm([r["reference"]["greedy"] for r in rows])
        sft_s = pm([r["sft_s"] for r in rows], ".0f")
        print(f"| SFT model | {sampled} | {greedy} | 0 | | {sft_s} |")
    kinds = (("sigmoid", "offline DPO"), ("online_k2", "online DPO, k=2"), ("online_k4", "online DPO, k=4"))
    for name, what in kinds:
        src = offline if name == "sigmoid" else online
        rs = [src[s, name] for s in sorted({s for s, _ in src}) if (s, name) in src]
        if not rs:
            continue
        seeds_text = f"{len(rs)} seeds" if len(rs) > 1 else "1 seed"
        time_s = pm([r["train_s"] for r in rs], ".0f")
        if name != "sigmoid":
            time_s += " + " + pm([r["sample_s"] for r in rs], ".0f")
        print(f"| {what} ({seeds_text}) | {policy_cells(rs)} | {time_s} |")
    for (s, name), r in sorted(online.items()):
        per_round = [f"{x['pairs']}/{x['prompts_tried']}, {x['sample_score']:+.3f} / "
                     f"{x['chosen_score']:+.3f} / {x['rejected_score']:+.3f}" for x in r["rounds"]]
        print(f"\nseed {s} {name}, per round: pairs from prompts (ties replaced), judge's mean score "
              f"of the samples / chosen / rejected: " + "; ".join(per_round))


def label(ax, text, x, y):
    ax.annotate(text, (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")


def plot_sweeps(ax, offline):
    """the offline beta sweeps: of each seed that has one, else the results page's table"""
    if not any(n.startswith("sigmoid@") for _, n in offline):  # no sweep here: the results page's
        text = open(os.path.join(HERE, "README.md")).read()
        # the beta sweep's rows: | beta | reward ± se | greedy | KL ± se | ...
        row = r"^\| ([0-9.]+) \| ([+-][0-9.]+) ± [0-9.]+ \| [^|]+ \| ([0-9.]+) ± "
        rows = re.findall(row, text, re.M)
        kls = [float(kl) for _, _, kl in rows]
        rewards = [float(reward) for _, reward, _ in rows]
        name = "offline DPO, beta sweep (results page, 3 seeds)"
        ax.plot(kls, rewards, "--o", color="tab:blue", ms=3, label=name)
        for beta, reward, kl in rows:
            label(ax, f"β={beta}", float(kl), float(reward))
    for s in sorted({s for s, _ in offline}):
        runs = [r for (s_, n), r in offline.items() if s_ == s and n.startswith("sigmoid")]
        sweep = sorted(runs, key=lambda r: r["kl"])
        if len(sweep) > 1:
            kls = [0] + [r["kl"] for r in sweep]
            rewards = [sweep[0]["reference"]["sampled"]] + [r["policy"]["sampled"] for r in sweep]
            name = f"offline DPO, beta sweep (seed {s})"
            ax.plot(kls, rewards, "-o", color="tab:blue", ms=3, label=name)
            for r in sweep:
                label(ax, f"β={beta_of(r['run'])}", r["kl"], r["policy"]["sampled"])


def plot(offline, online, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    plot_sweeps(ax, offline)
    for (s, n), r in sorted(offline.items()):
        if n == "sigmoid":
            name = "offline DPO, β=0.1"
            ax.plot(r["kl"], r["policy"]["sampled"], "s", color="tab:blue", ms=5, label=name)
            ax.plot(0, r["reference"]["sampled"], "k^", ms=5, label="SFT")
    for (s, n), r in sorted(online.items()):
        marker = "o" if r["k"] == 2 else "D"
        color = "tab:red" if r["k"] == 2 else "tab:orange"
        name = f"online DPO, k={r['k']}, β=0.1"
        ax.plot(r["kl"], r["policy"]["sampled"], marker, color=color, ms=5, label=name)
    handles, labels = ax.get_legend_handles_labels()
    keep = dict(zip(labels, handles))  # one legend entry per kind
    ax.legend(keep.values(), keep.keys(), fontsize=6, loc="lower right")
    ax.set_xlabel("KL(policy ‖ SFT), nats per response", fontsize=8)
    ax.set_ylabel("ground-truth reward, sampled", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return
    opts = {"seeds": "1,2,3", "runs": "k2,k4", "sweep": ",".join(SWEEP), "out": "out/online_exp",
            "table": None, "plot": None}
    for a in argv:
        k, _, v = a.lstrip("-").partition("=")
        if k not in opts:
            sys.exit(f"unknown option {a}; options: " + " ".join(f"--{k}=" for k in opts))
        opts[k] = v
    out = os.path.abspath(opts["out"])
    seeds = [int(s) for s in opts["seeds"].split(",") if s]
    os.makedirs(out, exist_ok=True)
    offline = read(os.path.join(out, "results.jsonl"))
    online = read(os.path.join(out, "online.jsonl"))
    if opts["table"] is None and opts["plot"] is None:
        runs = [r for r in opts["runs"].split(",") if r in ("k2", "k4")]
        sweep = toy_losses.split(opts["sweep"])
        # seed by seed: offline, online k=2 (the table); then k=4 and the sweep on the first seed
        for seed in seeds:
            toy_losses.run_seed(seed, ["sigmoid"], out, offline)
            if "k2" in runs and (seed, "online_k2") not in online:
                run_online(seed, 2, out, online)
        if seeds and "k4" in runs and (seeds[0], "online_k4") not in online:
            run_online(seeds[0], 4, out, online)
        if seeds and sweep:
            toy_losses.run_seed(seeds[0], sweep, out, offline)
    if opts["plot"]:
        plot(offline, online, opts["plot"])
    table(offline, online)


if __name__ == "__main__":
    main(sys.argv[1:])
