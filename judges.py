"""
The judges online.py scores its samples with. A judge is called on a batch:
    judge(prompts: list[str], responses: list[str]) -> list[float]
load_judge(spec) builds one from --judge (online.py) or --eval_judge (dpo.py):
    toy              toy.toy_reward of each response (the toy task's exact reward)
    module:function  your (prompt, response) -> float, called pair by pair (module on sys.path)
    rm:PATH          a reward model, a dpo.py --loss_type=reward run (reward.py): batched forwards on
                     the device, read at each response's end (<|endoftext|>, where it was trained to)
score() calls it and checks every value: a judge that fails, hangs or returns a non-number is one
line naming the judge (a ValueError), never a traceback from inside the rounds.
"""
import contextlib
import importlib
import math
import numbers
import signal
import threading
import types

import torch

import checkpoint
from prepare import EOT, gpt2_encoding, truncate
from toy import toy_reward

FORMS = "toy, module:function (module on sys.path) or rm:PATH (a dpo.py --loss_type=reward run)"


def toy(prompts, responses):
    return [toy_reward(r) for r in responses]


class PairJudge:
    """the user's (prompt, response) -> float function as a batched judge"""

    def __init__(self, function):
        self.function = function

    def __call__(self, prompts, responses):
        return [self.function(p, r) for p, r in zip(prompts, responses)]


def load_judge(spec, device=None):
    """--judge=SPEC -> a judge; a spec that does not load is one ValueError line.
    device: where a model judge runs (the toy and function judges ignore it)"""
    if spec == "toy":
        return toy
    if spec.startswith("rm:"):
        return RewardModelJudge(spec, spec[3:], torch.device(device or "cpu"))
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"--judge={spec}: could not load it ({e}); expected {FORMS}") from None
    except Exception as e:  # the module's own code failed on import
        raise ValueError(f"--judge={spec}: importing {module} raised {type(e).__name__}: {e}") from None
    if not callable(function):
        raise ValueError(f"--judge={spec} is not a function")
    return PairJudge(function)


class Timeout(BaseException):
    """a judge call ran past its time (a BaseException: the judge's own `except Exception` lets it by)"""


def on_alarm(signum, frame):
    raise Timeout()


@contextlib.contextmanager
def deadline(seconds):
    """raise Timeout in the code within after `seconds` (0: no limit). signals reach the main
    thread only: elsewhere there is no limit"""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def score(judge, spec, prompts, responses, timeout=0.0):
    """the judge's scores of the responses (a list of floats), each checked finite. a function judge
    is called (and timed) pair by pair, so that an error names its pair; other judges batch by batch"""
    if isinstance(judge, PairJudge):
        scores = []
        for p, r in zip(prompts, responses):
            scores += call(judge, spec, [p], [r], timeout)
        return scores
    return call(judge, spec, prompts, responses, timeout)


def call(judge, spec, prompts, responses, timeout):
    which = f"{len(prompts)} responses"
    if len(prompts) == 1:
        which = f"prompt {prompts[0]!r}, response {responses[0]!r}"
    try:
        with deadline(timeout):
            values = judge(prompts, responses)
    except Timeout:
        raise ValueError(f"judge {spec} gave no answer within --judge_timeout={timeout:g} seconds "
                         f"({which}): fix the judge, or raise --judge_timeout") from None
    except Exception as e:  # the judge is the user's code: any failure is one clear line
        raise ValueError(f"judge {spec} raised {type(e).__name__}: {e} ({which})") from None
    if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
        raise ValueError(f"judge {spec} returned {type(values).__name__} {str(values)[:80]} for "
                         f"{len(prompts)} responses: expected a list of {len(prompts)} floats")
    for s, p, r in zip(values, prompts, responses):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise ValueError(f"judge {spec} returned {s!r} ({type(s).__name__}) for prompt {p!r}, "
                             f"response {r!r}: expected a finite float")
    return [float(s) for s in values]


class RewardModelJudge:
    """rm:PATH: the run's scalar head at the last token of prompt + response + <|endoftext|>, the
    place it was trained to read; rows padded on the right, `rows` per forward"""

    def __init__(self, spec, path, device, rows=32):
        ck_path = checkpoint.checkpoint_path(path) if path else None
        if ck_path is None:
            raise ValueError(f"judge {spec}: no checkpoint at {path!r} (expected a dpo.py "
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
            rows = [seqs[i] + [EOT] * (T - len(seqs[i])) for i in ids]
            idx = torch.tensor(rows, device=self.device)
            ends = [row * T + len(seqs[i]) - 1 for row, i in enumerate(ids)]  # each row's last token
            last = torch.tensor(ends, device=self.device)
            h = self.model.hidden(idx).flatten(0, 1)  # causal: padding on the right is never seen
            out[ids] = self.model.score(h[last]).squeeze(-1).float().cpu()
        return out.tolist()
