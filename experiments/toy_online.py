"""
Offline vs online DPO on the toy task (issue 20). Per seed, toy_losses.py's steps (toy data, the SFT model
config/toy_sft.py, offline DPO config/toy_dpo.py: 200 steps of 32 pairs, beta 0.1), then online DPO from the same SFT
model with the same options (config/toy_online.py: the 200 steps over 4 rounds of 1600 pairs sampled from the policy
and judged by the exact toy reward), each followed by `sample.py --mode=compare`. Offline runs and their JSON lines go
to OUT/results.jsonl (toy_losses.py's file: its runs are reused), online ones to OUT/online.jsonl. Runs already there
are skipped and an online run that was stopped resumes at its round, so it can be run in pieces.

    python toy_online.py                        # seeds 1-3: offline and online (k=2); k=4 and the beta sweep on seed 1
    python toy_online.py --seeds=2 --runs=k2    # a piece; --sweep=none: no beta sweep
    python toy_online.py --table                # only the table of what is there
    python toy_online.py --plot=reward_kl.png   # the reward-KL plane (needs matplotlib, used nowhere else)
Every subprocess runs with OMP_NUM_THREADS=1.
"""
import json
import os
import re
import sys

import toy_losses
from toy_losses import beta_of, pm, sh

SWEEP = ["sigmoid@beta=0.03", "sigmoid@beta=0.3", "sigmoid@beta=1.0"]  # with beta 0.1, the offline run itself


def read(path):
    return {(r["seed"], r["run"]): r for r in map(json.loads, open(path))} if os.path.exists(path) else {}


def run_online(seed, k, out, done):
    d = os.path.join(out, f"seed{seed}")
    log, run, py = os.path.join(d, "log.txt"), os.path.join(d, "runs", f"online_k{k}"), sys.executable
    common = [f"--seed={seed}", f"--data_dir={os.path.join(d, 'data')}"]
    print(f"seed {seed} online k={k}: sampling and training", flush=True)
    _, train_s = sh([py, "online.py", "--config=config/toy_online.py", *common, f"--init_from={os.path.join(d, 'sft')}",
                     f"--out_dir={run}", f"--num_samples={k}"], log)
    rounds = [json.load(open(os.path.join(run, r, "round.json"))) for r in sorted(os.listdir(run)) if r.startswith("round_")]
    out_text, compare_s = sh([py, "sample.py", "--mode=compare", "--config=config/toy_dpo.py", *common,
                              f"--init_from={os.path.join(run, f'round_{len(rounds) - 1:03d}')}"], log, capture=True)
    res = {"seed": seed, "run": f"online_k{k}", "k": k, "rounds": rounds, "compare_s": compare_s,
           "train_s": sum(r["train_s"] for r in rounds), "sample_s": sum(r["sample_s"] for r in rounds),
           **json.loads(out_text.strip().splitlines()[-1])}
    res["total_s"] = res["train_s"] + res["sample_s"]  # of this process's runs (a resumed run: all its pieces)
    with open(os.path.join(out, "online.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")
    done[seed, res["run"]] = res
    print(f"seed {seed} online k={k}: reward {res['policy']['sampled']:+.3f}, KL {res['kl']:.2f}, "
          f"{res['sample_s']:.0f}s sampling + {res['train_s']:.0f}s training", flush=True)


def table(offline, online):
    seeds = sorted({s for s, n in offline if n == "sigmoid"})
    print(f"\nseeds {','.join(map(str, seeds))}; ± is one standard error over seeds\n")
    print("| run | reward, sampled | reward, greedy | KL(policy ‖ SFT), nats | implicit reward accuracy | train + sample time (s) |")
    print("|---|---|---|---|---|---|")
    rows = [offline[s, "sigmoid"] for s in seeds]
    if rows:
        print(f"| SFT model | {pm([r['reference']['sampled'] for r in rows])} | {pm([r['reference']['greedy'] for r in rows])} "
              f"| 0 | | {pm([r['sft_s'] for r in rows], '.0f')} |")
    for name, what in (("sigmoid", "offline DPO"), ("online_k2", "online DPO, k=2"), ("online_k4", "online DPO, k=4")):
        src = offline if name == "sigmoid" else online
        rs = [src[s, name] for s in sorted({s for s, _ in src}) if (s, name) in src]
        if rs:
            print(f"| {what} ({len(rs)} seed{'s' * (len(rs) > 1)}) | {pm([r['policy']['sampled'] for r in rs])} | "
                  f"{pm([r['policy']['greedy'] for r in rs])} | {pm([r['kl'] for r in rs], '.2f')} | "
                  f"{pm([r['implicit_acc'] for r in rs], '.3f')} | {pm([r['train_s'] for r in rs], '.0f')}"
                  + (f" + {pm([r['sample_s'] for r in rs], '.0f')}" if name != "sigmoid" else "") + " |")
    for (s, name), r in sorted(online.items()):
        print(f"\nseed {s} {name}, per round: pairs from prompts (ties replaced), judge's mean score of the samples / "
              f"chosen / rejected: " + "; ".join(f"{x['pairs']}/{x['prompts_tried']}, {x['sample_score']:+.3f} / "
                                                  f"{x['chosen_score']:+.3f} / {x['rejected_score']:+.3f}" for x in r["rounds"]))


def plot(offline, online, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    if not any(n.startswith("sigmoid@") for _, n in offline):  # no sweep runs here: README's (toy_losses.py, 3 seeds)
        text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
        rows = re.findall(r"^\| ([0-9.]+) \| ([+-][0-9.]+) ± [0-9.]+ \| [^|]+ \| ([0-9.]+) ± ", text, re.M)
        ax.plot([float(k) for _, _, k in rows], [float(r) for _, r, _ in rows], "--o", color="tab:blue", ms=3,
                label="offline DPO, beta sweep (README table, 3 seeds)")
        for b, r, k in rows:
            ax.annotate(f"β={b}", (float(k), float(r)), fontsize=6, xytext=(3, -8), textcoords="offset points")
    for s in sorted({s for s, _ in offline}):
        sweep = sorted((r for (s_, n), r in offline.items() if s_ == s and n.startswith("sigmoid")), key=lambda r: r["kl"])
        if len(sweep) > 1:
            ax.plot([0] + [r["kl"] for r in sweep], [sweep[0]["reference"]["sampled"]] + [r["policy"]["sampled"] for r in sweep],
                    "-o", color="tab:blue", ms=3, label=f"offline DPO, beta sweep (seed {s})")
            for r in sweep:
                ax.annotate(f"β={beta_of(r['run'])}", (r["kl"], r["policy"]["sampled"]), fontsize=6, xytext=(3, -8), textcoords="offset points")
    for (s, n), r in sorted(offline.items()):
        if n == "sigmoid":
            ax.plot(r["kl"], r["policy"]["sampled"], "s", color="tab:blue", ms=5, label="offline DPO, β=0.1")
            ax.plot(0, r["reference"]["sampled"], "k^", ms=5, label="SFT")
    for (s, n), r in sorted(online.items()):
        ax.plot(r["kl"], r["policy"]["sampled"], "o" if r["k"] == 2 else "D", color="tab:red" if r["k"] == 2 else "tab:orange",
                ms=5, label=f"online DPO, k={r['k']}, β=0.1")
    h, labels = ax.get_legend_handles_labels()
    keep = dict(zip(labels, h))  # one legend entry per kind
    ax.legend(keep.values(), keep.keys(), fontsize=6, loc="lower right")
    ax.set_xlabel("KL(policy ‖ SFT), nats per response", fontsize=8)
    ax.set_ylabel("ground-truth reward, sampled", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv):
    opts = {"seeds": "1,2,3", "runs": "k2,k4", "sweep": ",".join(SWEEP), "out": "out/online_exp", "table": None, "plot": None}
    for a in argv:
        k, _, v = a.lstrip("-").partition("=")
        if k not in opts:
            sys.exit(f"unknown option {a}; options: " + " ".join(f"--{k}=" for k in opts))
        opts[k] = v
    out, seeds = os.path.abspath(opts["out"]), [int(s) for s in opts["seeds"].split(",") if s]
    os.makedirs(out, exist_ok=True)
    offline, online = read(os.path.join(out, "results.jsonl")), read(os.path.join(out, "online.jsonl"))
    if opts["table"] is None and opts["plot"] is None:
        runs = [r for r in opts["runs"].split(",") if r in ("k2", "k4")]
        sweep = [x for x in opts["sweep"].split(",") if x and x != "none"]
        for seed in seeds:  # seed by seed: offline, online k=2 (the table); then k=4 and the sweep on the first seed
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
