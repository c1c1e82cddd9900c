"""
Judges: one spec everywhere (online.py --judge, dpo.py --eval_judge) for a function of
(prompts, responses) -> rewards, called once per batch:

    toy              prepare.toy_reward of each response: the toy task's exact reward
    module:function  your function (prompt text, response text) -> float, called per pair
    rm:PATH          a reward model, a run of dpo.py --loss_type=reward (reward.py): a batched
                     forward on the device, read at each response's end (<|endoftext|>, as trained)

    judge = load_judge("rm:out/toy_rm", device="cuda")
    rewards = score(judge, "rm:out/toy_rm", prompts, responses)  # checked: finite floats
"""
import importlib
import math
import numbers
import os
import types

import torch

import checkpoint
from prepare import EOT, gpt2_encoding, truncate
from toy import toy_reward

FORMS = "toy, module:function (module on sys.path) or rm:PATH (a dpo.py --loss_type=reward run)"


class JudgeError(ValueError):
    """a judge failed on one pair: the message names it"""


def well_formed(spec):
    """toy, or two non-empty parts around a colon (nothing is loaded)"""
    kind, colon, rest = spec.partition(":")
    return spec == "toy" or bool(colon and kind and rest)


def load_judge(spec, device=None):
    """spec -> judge(prompts, responses) -> list of floats; a bad spec is one ValueError line"""
    if not well_formed(spec):
        raise ValueError(f"judge {spec!r}: expected {FORMS}")
    if spec == "toy":
        return lambda prompts, responses: [toy_reward(r) for r in responses]
    kind, _, rest = spec.partition(":")
    if kind == "rm":
        return RewardModelJudge(spec, rest, torch.device(device or "cpu"))
    try:
        fn = getattr(importlib.import_module(kind), rest)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"judge {spec}: could not load it ({checkpoint.one_line(e, 200)}); "
                         f"expected {FORMS}") from None
    if not callable(fn):
        raise ValueError(f"judge {spec}: {rest} is not a function (expected {FORMS})")
    return per_pair(fn, spec)


def per_pair(fn, spec):
    """a (prompt, response) -> float function as a batched judge"""
    def judge(prompts, responses):
        out = []
        for p, r in zip(prompts, responses):
            try:
                out.append(fn(p, r))
            except Exception as e:  # the user's code: any failure is one line naming the pair
                why = checkpoint.one_line(e, 200)
                raise JudgeError(f"judge {spec} raised {type(e).__name__}: {why} "
                                 f"(prompt {p!r}, response {r!r})") from None
        return out
    return judge


def score(judge, spec, prompts, responses):
    """judge(prompts, responses), every value checked: a finite float, one per response"""
    try:
        values = list(judge(prompts, responses))
    except JudgeError:
        raise
    except Exception as e:
        why = checkpoint.one_line(e, 200)
        raise ValueError(f"judge {spec} raised {type(e).__name__}: {why}") from None
    if len(values) != len(responses):
        raise ValueError(f"judge {spec} returned {len(values)} values for {len(responses)} responses")
    for s, p, r in zip(values, prompts, responses):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise ValueError(f"judge {spec} returned {s!r} ({type(s).__name__}) for prompt {p!r}, "
                             f"response {r!r}: expected a finite float")
    return [float(s) for s in values]


class RewardModelJudge:
    """rm:PATH: the run's scalar head at the last token of prompt + response + <|endoftext|>, the
    place it was trained to read; rows padded on the right, `rows` per forward"""

    def __init__(self, spec, path, device, rows=32):
        ck_path = checkpoint.checkpoint_path(path)
        if ck_path is None:
            raise ValueError(f"judge {spec}: no checkpoint at {path} (expected a dpo.py "
                             f"--loss_type=reward run's folder or its ckpt.pt)")
        ck = checkpoint.read_checkpoint(ck_path)  # an unreadable file: one line already
        if not ck["model_config"].get("reward_head"):
            raise ValueError(f"judge {spec}: {ck_path} is not a reward model (train one with "
                             f"--loss_type=reward)")
        model = checkpoint.model_from_checkpoint(ck, types.SimpleNamespace(dropout=0.0), ck_path)
        self.model = model.to(device).eval()
        self.device = device
        self.rows = rows
        self.enc = gpt2_encoding()
        self.name = os.path.abspath(ck_path)

    def tokens(self, prompt, response):
        """as prepare.py writes a pair: the response ends with EOT; a long one is cut as there"""
        block = self.model.config.block_size
        p = self.enc.encode_ordinary(prompt)
        r = self.enc.encode_ordinary(response) + [EOT]
        p, r, _, _ = truncate(p, r, r, block, block // 2)
        return p + r

    @torch.no_grad()
    def __call__(self, prompts, responses):
        seqs = [self.tokens(p, r) for p, r in zip(prompts, responses)]
        out = torch.zeros(len(seqs))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # alike lengths share a forward
        for start in range(0, len(order), self.rows):
            ids = order[start: start + self.rows]
            T = max(len(seqs[i]) for i in ids)
            idx = torch.tensor([seqs[i] + [EOT] * (T - len(seqs[i])) for i in ids], device=self.device)
            ends = [row * T + len(seqs[i]) - 1 for row, i in enumerate(ids)]  # each row's last token
            last = torch.tensor(ends, device=self.device)
            h = self.model.hidden(idx).flatten(0, 1)  # causal: padding on the right is never seen
            out[ids] = self.model.score(h[last]).squeeze(-1).float().cpu()
        return out.tolist()
