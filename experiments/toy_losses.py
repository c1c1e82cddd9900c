"""
Every loss type on the toy task (issue 14). Per seed: toy data and an SFT model (config/toy_sft.py),
then each loss type from that SFT model (config/toy_dpo.py: 200 steps, lr 1e-4, beta 0.1, unless
USUAL says otherwise) and the sigmoid beta sweep, each followed by `sample.py --mode=compare`, whose
JSON line goes to OUT/results.jsonl. Then the markdown tables of experiments/README.md. Runs already
in results.jsonl are skipped, so it can run in pieces. Run it from the repository root:

    python experiments/toy_losses.py              # 3 seeds, every type, SECOND, the sweep (hours)
    python experiments/toy_losses.py --seeds=1 --types=sigmoid,ipo   # a piece
    python experiments/toy_losses.py --types=none # the sweep only; --sweep=none: no beta sweep
    python experiments/toy_losses.py --table      # only print the tables of what is there
A run is a loss type with optional overrides: --types=apo_down@beta=3,discopop@discopop_tau=0.2
Options: --seeds, --types, --sweep, --out (default out/losses), --table.
Every subprocess runs with OMP_NUM_THREADS=1 (one core: leave the other to the rest of the machine).
"""
import json
import math
import os
import subprocess
import sys
import time

# the repository root: prepare.py, dpo.py, sample.py and config/ (every command runs there)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# dpo.py options on top of config/toy_dpo.py for each run's "usual" setting;
# the rest use beta 0.1 as TRL does
USUAL = {
    "sft": ["--loss_type=sft"],  # the baseline: SFT continued for the same steps at the same lr
    "sigmoid": [], "ipo": [], "hinge": [],
    # robust at label_smoothing 0 is sigmoid exactly
    "robust": ["--loss_type=robust", "--label_smoothing=0.1"],
    "exo_pair": [], "nca_pair": [], "bco_pair": [], "sppo_hard": [], "apo_zero": [], "apo_down": [],
    "discopop": [], "aot": [], "aot_pair": [], "sigmoid_norm": [],
    "simpo": ["--loss_type=simpo", "--beta=2.0", "--gamma=1.0"],  # SimPO's paper: beta 2, gamma/beta 0.5
    "rpo": ["--loss_type=sigmoid", "--sft_weight=1.0"],  # RPO: DPO + the chosen NLL per token, weight 1
}
# second settings for the types that do not beat SFT at their usual one: the setting or the loss?
SECOND = ["apo_down@beta=1.0", "discopop@discopop_tau=0.2", "discopop@beta=0.05"]
SWEEP = ["sigmoid@beta=0.01", "sigmoid@beta=0.03", "sigmoid", "sigmoid@beta=0.3", "sigmoid@beta=1.0"]


def run_args(name):
    """'type@key=value@...' -> dpo.py options"""
    base, *overrides = name.split("@")
    args = USUAL[base]
    if not any(a.startswith("--loss_type=") for a in args):
        args = [f"--loss_type={base}", *args]
    return args + [f"--{kv}" for kv in overrides]


def beta_of(name):
    overrides = dict(kv.split("=") for kv in name.split("@")[1:])
    return float(overrides.get("beta", 0.1))


def sh(cmd, log, capture=False):
    """run cmd in the repository root, its output appended to log -> (stdout if captured, seconds)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        stdout = subprocess.PIPE if capture else f
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=f, text=True)
        if capture:
            f.write(r.stdout)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return r.stdout, time.time() - t


def once(marker, cmd, log):
    """run cmd unless marker exists; -> seconds it took (now or the first time)"""
    if not os.path.exists(marker):
        _, seconds = sh(cmd, log)
        with open(marker, "w") as f:
            json.dump({"seconds": seconds}, f)
    return json.load(open(marker))["seconds"]


def run_seed(seed, names, out, done):
    d = os.path.join(out, f"seed{seed}")
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "log.txt")
    data = os.path.join(d, "data")
    sft = os.path.join(d, "sft")
    py = sys.executable
    common = [f"--seed={seed}", f"--data_dir={data}"]
    prepare_cmd = [py, "prepare.py", f"--seed={seed}", f"--out_dir={data}", "--num_workers=1"]
    once(os.path.join(d, "prepared.json"), prepare_cmd, log)
    sft_cmd = [py, "dpo.py", "--config=config/toy_sft.py", *common, f"--out_dir={sft}"]
    sft_s = once(os.path.join(d, "sft.json"), sft_cmd, log)
    for name in names:
        if (seed, name) in done:
            continue
        run = os.path.join(d, "runs", name.replace("@", "_"))
        print(f"seed {seed} {name}: training", flush=True)
        train_cmd = [py, "dpo.py", "--config=config/toy_dpo.py", *common, f"--init_from={sft}",
                     f"--out_dir={run}", *run_args(name)]
        _, train_s = sh(train_cmd, log)
        compare_cmd = [py, "sample.py", "--mode=compare", "--config=config/toy_dpo.py", *common,
                       f"--init_from={run}"]
        out_text, compare_s = sh(compare_cmd, log, capture=True)
        scores = json.loads(out_text.strip().splitlines()[-1])  # compare's last line: its numbers
        res = {"seed": seed, "run": name, "args": run_args(name), "train_s": train_s,
               "compare_s": compare_s, "sft_s": sft_s, **scores}
        with open(os.path.join(out, "results.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
        done[(seed, name)] = res
        reward = res["policy"]["sampled"]
        sft_reward = res["reference"]["sampled"]
        print(f"seed {seed} {name}: reward {reward:+.3f} (SFT {sft_reward:+.3f}), KL {res['kl']:.2f}, "
              f"{train_s:.0f}s + {compare_s:.0f}s", flush=True)


def mean_se(xs):
    """mean and its standard error (nan for one value)"""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    variance = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(variance / len(xs))


def pm(xs, fmt="+.3f"):
    """'mean ± se' (the se without the sign)"""
    m, se = mean_se(xs)
    if math.isnan(se):
        return f"{m:{fmt}}"
    se_fmt = fmt.lstrip("+")
    return f"{m:{fmt}} ± {se:{se_fmt}}"


def policy_cells(rs):
    """'reward, sampled | reward, greedy | KL | implicit reward accuracy' of runs rs, over seeds"""
    sampled = pm([r["policy"]["sampled"] for r in rs])
    greedy = pm([r["policy"]["greedy"] for r in rs])
    kl = pm([r["kl"] for r in rs], ".2f")
    acc = pm([r["implicit_acc"] for r in rs], ".3f")
    return f"{sampled} | {greedy} | {kl} | {acc}"


def tables(done, names, sweep):
    seeds = sorted({s for s, _ in done})
    print(f"\nseeds {','.join(map(str, seeds))}; ± is one standard error over seeds; 'beats SFT' "
          f"counts seeds where the sampled reward beats the SFT model's by more than 2 standard "
          f"errors of the 240 samples")
    print("\n| run | dpo.py options | reward, sampled | reward, greedy | KL (nats) "
          "| implicit reward accuracy | beats SFT | train time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    if done:  # the SFT model itself: the reference side of a seed's compares, averaged over its runs
        per_seed = [[r for (s_, _), r in done.items() if s_ == s] for s in seeds]
        sampled = [sum(r["reference"]["sampled"] for r in rs) / len(rs) for rs in per_seed]
        greedy = [sum(r["reference"]["greedy"] for r in rs) / len(rs) for rs in per_seed]
        sft_s = pm([rs[0]["sft_s"] for rs in per_seed], ".0f")
        print(f"| SFT model (start) | `config/toy_sft.py` | {pm(sampled)} | {pm(greedy)} | 0 | | | {sft_s} |")
    for name in names:
        rs = [done[s, name] for s in seeds if (s, name) in done]
        if not rs:
            continue
        beats = 0
        for r in rs:
            gain = r["policy"]["sampled"] - r["reference"]["sampled"]
            noise = math.hypot(r["sampled_sem"]["policy"], r["sampled_sem"]["reference"])
            beats += gain > 2 * noise
        opts = " ".join(run_args(name))
        train_s = pm([r["train_s"] for r in rs], ".0f")
        print(f"| {name} | `{opts}` | {policy_cells(rs)} | {beats}/{len(rs)} | {train_s} |")
    if any((s, n) in done for s in seeds for n in sweep):
        print("\nsigmoid (DPO) beta sweep: ground-truth reward vs KL(policy || SFT)\n")
        print("| beta | reward, sampled | reward, greedy | KL (nats) | implicit reward accuracy |")
        print("|---|---|---|---|---|")
        for name in sorted(sweep, key=beta_of):
            rs = [done[s, name] for s in seeds if (s, name) in done]
            if rs:
                print(f"| {beta_of(name)} | {policy_cells(rs)} |")


def split(text):
    """'a,b,none' -> ['a', 'b']"""
    return [x for x in text.split(",") if x and x != "none"]


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return
    opts = {"seeds": "1,2,3", "types": ",".join([*USUAL, *SECOND]), "sweep": ",".join(SWEEP),
            "out": "out/losses", "table": None}
    for a in argv:
        k, _, v = a.lstrip("-").partition("=")
        if k not in opts:
            sys.exit(f"unknown option {a}; options: " + " ".join(f"--{k}=" for k in opts))
        opts[k] = v
    types = split(opts["types"])
    sweep = split(opts["sweep"])
    out = os.path.abspath(opts["out"])
    for name in types + sweep:
        if name.split("@")[0] not in USUAL:
            sys.exit(f"unknown run {name}: a loss type ({', '.join(USUAL)}) "
                     f"with optional @key=value overrides")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.jsonl")
    done = {}
    if os.path.exists(path):
        for line in open(path):
            r = json.loads(line)
            done[r["seed"], r["run"]] = r
    t0 = time.time()
    if opts["table"] is None:
        for seed in map(int, split(opts["seeds"])):
            run_seed(seed, list(dict.fromkeys(types + sweep)), out, done)
        print(f"done in {time.time() - t0:.0f}s", flush=True)
    # the usual settings first, then any others (the second settings)
    runs = [n for n in USUAL if any(k == n for _, k in done)]
    runs += [n for n in dict.fromkeys(k for _, k in done) if n not in runs and n not in sweep]
    tables(done, runs, sweep)


if __name__ == "__main__":
    main(sys.argv[1:])
