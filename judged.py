"""
Judged evaluation while training (dpo.py --eval_judge=SPEC, a judges.py spec), and the statistics
sample.py's compare shares with it.

At each eval the policy samples eval_judge_samples responses (temperature 1) to each of a fixed set
of val prompts, the first eval_judge_prompts unique ones; the reference sampled them once, at the
start. Logged (metrics.jsonl, wandb), each with its standard error:
    judge/reward      the judge's mean reward of the policy's samples (judge/ref_reward: the
                      reference's)
    judge/win_rate    how often a policy sample beats a reference sample of the same prompt
                      (ties count 1/2)
    judge/kl          KL(policy || reference), the mean of log pi(y|x) - log pi_ref(y|x) over the
                      policy's samples y (an unbiased estimate: temperature 1, no top_k)
The reference and the policy draw from generators of their own, the policy's restarted at each eval:
the reference's numbers never move with the policy, and two evals differ by the policy alone.
Samples of one prompt are not independent draws: standard errors are clustered by prompt.
"""
import copy
import math

import numpy as np
import torch
import torch.distributed as dist

import judges
from launch import print0
from prepare import EOT, gpt2_encoding

REFERENCE_STREAM, POLICY_STREAM = 1, 2  # each model's own generator: seed * 10 + its stream


def check_config(cfg):
    if not cfg.eval_judge:
        return
    if cfg.eval_judge != "toy" and ":" not in cfg.eval_judge:
        raise ValueError(f"--eval_judge={cfg.eval_judge}: expected {judges.FORMS}")
    for key in ("eval_judge_prompts", "eval_judge_samples", "eval_judge_tokens"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be >= 1")
    if cfg.fsdp:
        raise ValueError(f"--eval_judge={cfg.eval_judge}: not with --fsdp=true (sampling from "
                         f"sharded weights is not built); evaluate a saved checkpoint with sample.py")


# -----------------------------------------------------------------------------
# statistics

def clustered_sem(values, clusters):
    """the standard error of mean(values) when values of one cluster (prompt) are correlated: the
    cluster-robust (sandwich) variance with its n / (n - 1) correction, n clusters. with equal
    cluster sizes it is the standard deviation of the cluster means over sqrt(n)"""
    values = np.asarray(values, dtype=np.float64)
    _, cluster = np.unique(np.asarray(clusters), return_inverse=True)
    n = cluster.max() + 1
    if n < 2:
        return float("nan")
    residual_sums = np.bincount(cluster, weights=values - values.mean())  # (n,)
    variance = n / (n - 1) * np.sum(residual_sums ** 2) / len(values) ** 2
    return float(math.sqrt(variance))


def win_rates(policy, reference):
    """(n, k) policy rewards, (n, k') reference rewards -> (n, k): each policy sample's share of the
    same prompt's reference samples it beats, a tie counting one half"""
    p = np.asarray(policy, dtype=np.float64)[:, :, None]
    r = np.asarray(reference, dtype=np.float64)[:, None, :]
    return (p > r).mean(2) + 0.5 * (p == r).mean(2)


# -----------------------------------------------------------------------------
# sampling and log-probs of many prompts, batched

def generator(device, seed, stream):
    return torch.Generator(device=device).manual_seed(seed * 10 + stream)


def cut_response(row):
    """generated tokens -> the response: up to and with the first EOT"""
    out = row.tolist()
    return out[: out.index(EOT) + 1] if EOT in out else out


@torch.no_grad()
def draw(model, prompts, k, max_new_tokens, gen, rows=64):
    """k samples (temperature 1) of each prompt (token lists) -> per prompt a list of k responses"""
    device = model.lm_head.weight.device
    out = []
    per_call = max(rows // k, 1)
    for start in range(0, len(prompts), per_call):
        batch = prompts[start: start + per_call]
        T = max(len(p) for p in batch)
        idx = torch.tensor([[EOT] * (T - len(p)) + p for p in batch for _ in range(k)], device=device)
        pad = torch.tensor([T - len(p) for p in batch for _ in range(k)], device=device)
        seq = model.generate(idx, max_new_tokens, temperature=1.0, generator=gen, pad_left=pad)
        for i in range(len(batch)):
            out.append([cut_response(row[T:]) for row in seq[i * k: (i + 1) * k]])
    return out


@torch.no_grad()
def sequence_logps(model, prompt, responses):
    """summed log-prob of each response (token lists) after one prompt; rows of prompt + response,
    the last block_size tokens of each (the window generate samples in), padded on the right"""
    block = model.config.block_size
    device = model.lm_head.weight.device
    rows = [(prompt + r)[-block:] for r in responses]
    T = max(len(r) for r in rows)
    idx = torch.tensor([r + [EOT] * (T - len(r)) for r in rows], device=device)
    src, tgt, seq = [], [], []
    for i, (row, resp) in enumerate(zip(rows, responses)):
        first = len(row) - len(resp)  # the response's first token, predicted from the one before
        src += [i * T + first - 1 + t for t in range(len(resp))]
        tgt += resp
        seq += [i] * len(resp)
    was_training = model.training
    model.eval()
    h = model.hidden(idx).flatten(0, 1)[torch.tensor(src, device=device, dtype=torch.long)]
    model.train(was_training)
    logp = model.token_logprobs(h, torch.tensor(tgt, device=device, dtype=torch.long))
    sums = torch.zeros(len(responses), dtype=torch.float64, device=device)
    sums.index_add_(0, torch.tensor(seq, device=device, dtype=torch.long), logp.double())
    return sums.cpu().numpy()


def judge_samples(judge, spec, texts, samples, k):
    """prompt texts and k sampled responses (token lists) of each -> the judge's (n, k) rewards"""
    enc = gpt2_encoding()
    replies = [enc.decode([t for t in s if t != EOT]) for per in samples for s in per]
    asked = [text for text in texts for _ in range(k)]
    return np.array(judges.score(judge, spec, asked, replies)).reshape(len(texts), k)


# -----------------------------------------------------------------------------
# the hook dpo.py calls at each eval

class JudgedEval:
    """judged(policy) -> the judge/* fields of this eval's record. ranks split the prompts; the
    numbers then depend on the number of ranks (each rank's samples come from its own batches)"""

    def __init__(self, cfg, run, ref_model, val_data):
        if val_data is None:
            raise ValueError(f"--eval_judge={cfg.eval_judge}: {cfg.data_dir} has no val pairs to take "
                             f"prompts from")
        if cfg.eval_judge_tokens >= val_data.block_size:
            raise ValueError(f"--eval_judge_tokens={cfg.eval_judge_tokens}: must be < block_size "
                             f"{val_data.block_size}")
        self.cfg, self.run = cfg, run
        self.judge = judges.load_judge(cfg.eval_judge, run.device)
        unique = dict.fromkeys(tuple(val_data[i][0].tolist()) for i in range(len(val_data)))
        prompts = [list(p) for p in unique][: cfg.eval_judge_prompts]
        self.n = len(prompts)
        self.mine = list(range(run.rank, self.n, run.world))  # this rank's prompts
        self.prompts = [prompts[i] for i in self.mine]
        enc = gpt2_encoding()
        self.texts = [enc.decode(p) for p in self.prompts]
        # the reference as it starts (cached: the policy itself, which training then moves)
        self.reference = copy.deepcopy(ref_model).to(run.device).eval().requires_grad_(False)
        gen = generator(run.device, cfg.seed, REFERENCE_STREAM)
        k = cfg.eval_judge_samples
        with run.ctx:
            samples = draw(self.reference, self.prompts, k, cfg.eval_judge_tokens, gen)
        rewards = judge_samples(self.judge, cfg.eval_judge, self.texts, samples, k)
        self.ref = self.gather(rewards)

    def gather(self, mine):
        """this rank's (len(mine), k) rows -> all (n, k) rows, on every rank"""
        k = self.cfg.eval_judge_samples
        full = torch.zeros(self.n, k, dtype=torch.float64, device=self.run.device)
        rows = np.asarray(mine, dtype=np.float64).reshape(len(self.mine), k)  # a rank may have none
        full[self.mine] = torch.from_numpy(rows).to(self.run.device)
        if self.run.world > 1:
            dist.all_reduce(full)  # each prompt's row comes from exactly one rank
        return full.cpu().numpy()

    def __call__(self, policy):
        cfg, run = self.cfg, self.run
        gen = generator(run.device, cfg.seed, POLICY_STREAM)  # restarted: the same noise each eval
        with run.ctx:
            samples = draw(policy, self.prompts, cfg.eval_judge_samples, cfg.eval_judge_tokens, gen)
            kl = [sequence_logps(policy, p, s) - sequence_logps(self.reference, p, s)
                  for p, s in zip(self.prompts, samples)]
        rewards = self.gather(judge_samples(self.judge, cfg.eval_judge, self.texts, samples,
                                            cfg.eval_judge_samples))
        kl = self.gather(np.array(kl))
        wins = win_rates(rewards, self.ref)
        clusters = np.repeat(np.arange(self.n), rewards.shape[1])
        rec = {}
        fields = (("reward", rewards), ("ref_reward", self.ref), ("win_rate", wins), ("kl", kl))
        for name, values in fields:
            rec[f"judge/{name}"] = float(values.mean())
            rec[f"judge/{name}_se"] = clustered_sem(values.ravel(), clusters)
        print0(f"judge {cfg.eval_judge} ({self.n} val prompts x {rewards.shape[1]}): reward "
               f"{rec['judge/reward']:+.4f} ± {rec['judge/reward_se']:.4f} (reference "
               f"{rec['judge/ref_reward']:+.4f}), win rate {rec['judge/win_rate']:.3f} ± "
               f"{rec['judge/win_rate_se']:.3f}, KL {rec['judge/kl']:.3f} ± {rec['judge/kl_se']:.3f}")
        return rec
