"""
The judges online.py scores its samples with. A judge is called on a batch:
    judge(prompts: list[str], responses: list[str]) -> list[float]
load_judge(spec) builds one from --judge:
    toy              prepare.toy_reward of each response (the toy task's exact reward)
    module:function  your (prompt, response) -> float, called pair by pair (module on sys.path)
score() calls it and checks every value: a judge that fails, hangs or returns a non-number is one
line naming the judge (a ValueError), never a traceback from inside the rounds.
"""
import contextlib
import importlib
import math
import numbers
import signal
import threading

from prepare import toy_reward


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
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"--judge={spec}: could not load it ({e}); expected toy or "
                         f"module:function (module on sys.path)") from None
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
