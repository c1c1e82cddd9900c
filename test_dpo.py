"""
The DPO loss family, dpo_loss. Every value is checked against an independent float64 formula written
with python's math module on scalars (never against dpo_loss itself).
All the tests: python -m pytest -q (see conftest.py).
"""
import math
import random
from decimal import Decimal, getcontext

import pytest
import torch

import dpo
from dpo import LOSS_TYPES, dpo_loss
from testlib import logsig


NEEDS_LENGTHS = {"ipo", "sigmoid_norm", "simpo", "sft", "orpo"}


# -----------------------------------------------------------------------------
# scalar reference formulas (and logsig, in testlib.py)


def sig(x):
    return math.exp(logsig(x))


def ref_losses(loss_type, pc, pr, rc, rr, lc, lr, beta, ls, gamma, delta, tau):
    """pc, pr, rc, rr, lc, lr: python lists of floats, one per pair. Returns a list of losses."""
    B = len(pc)
    cl = [pc[i] - rc[i] for i in range(B)]  # chosen log-ratio
    rl = [pr[i] - rr[i] for i in range(B)]  # rejected log-ratio
    cdpo = lambda u: -(1 - ls) * logsig(u) - ls * logsig(-u)
    out = []
    if loss_type == "aot":
        a = sorted(pc[i] - pr[i] for i in range(B))
        b = sorted(rc[i] - rr[i] for i in range(B))
        return [cdpo(beta * (a[i] - b[i])) for i in range(B)]
    if loss_type in ("aot_pair", "aot_unpaired"):
        a, b = sorted(cl), sorted(rl)
        return [cdpo(beta * (a[i] - b[i])) for i in range(B)]
    for i in range(B):
        h = beta * (cl[i] - rl[i])
        if loss_type == "sigmoid":
            v = cdpo(h)
        elif loss_type == "ipo":
            v = (cl[i] / lc[i] - rl[i] / lr[i] - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            v = max(0.0, 1 - h)
        elif loss_type == "robust":
            v = ((1 - ls) * -logsig(h) - ls * -logsig(-h)) / (1 - 2 * ls)
        elif loss_type == "exo_pair":
            e = ls if ls > 0 else 1e-3
            q = sig(h)  # model's probability that chosen wins
            v = q * math.log(q / (1 - e)) + (1 - q) * math.log((1 - q) / e)
        elif loss_type == "nca_pair":
            a, b = beta * cl[i], beta * rl[i]
            v = -logsig(a) - 0.5 * logsig(-a) - 0.5 * logsig(-b)
        elif loss_type == "bco_pair":
            a, b = beta * cl[i], beta * rl[i]
            v = -logsig(a - delta) - logsig(delta - b)
        elif loss_type == "sppo_hard":
            v = (cl[i] - 1 / (2 * beta)) ** 2 + (rl[i] + 1 / (2 * beta)) ** 2
        elif loss_type == "apo_zero":
            v = 1 - sig(beta * cl[i]) + sig(beta * rl[i])
        elif loss_type == "apo_down":
            v = sig(beta * cl[i]) + 1 - sig(h)
        elif loss_type == "discopop":
            m = sig(h / tau)
            v = -logsig(h) * (1 - m) + math.exp(-h) * m
        elif loss_type == "sigmoid_norm":
            v = cdpo(beta * (cl[i] / lc[i] - rl[i] / lr[i]))
        elif loss_type == "simpo":
            v = cdpo(beta * (pc[i] / lc[i] - pr[i] / lr[i]) - gamma)
        elif loss_type == "sft":
            v = -pc[i] / lc[i]
        # the odds p / (1 - p) of the per-token average probability, naively
        elif loss_type == "orpo":
            odds = lambda a: math.exp(a) / (1 - math.exp(a))
            v = -pc[i] / lc[i] - beta * logsig(math.log(odds(pc[i] / lc[i]) / odds(pr[i] / lr[i])))
        elif loss_type == "reward":  # the inputs are a reward model's rewards r_w, r_l
            v = -logsig(pc[i] - pr[i])
        else:
            raise AssertionError(loss_type)
        out.append(v)
    return out


def random_batch(B, seed, dtype=torch.float64):
    rng = random.Random(seed)
    lc = [rng.randint(3, 40) for _ in range(B)]
    lr = [rng.randint(3, 40) for _ in range(B)]
    pc = [-rng.uniform(0.5, 3.0) * n for n in lc]  # summed log-probs: about -0.5..-3 nats per token
    pr = [-rng.uniform(0.5, 3.0) * n for n in lr]
    rc = [x + rng.uniform(-4, 4) for x in pc]
    rr = [x + rng.uniform(-4, 4) for x in pr]
    t = lambda v: torch.tensor(v, dtype=dtype)
    return (pc, pr, rc, rr, lc, lr), (t(pc), t(pr), t(rc), t(rr), t(lc), t(lr))


def call(loss_type, tensors, **kw):
    pc, pr, rc, rr, lc, lr = tensors
    return dpo_loss(pc, pr, rc, rr, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr, **kw)


# -----------------------------------------------------------------------------
# the worked examples


def test_worked_example_reference_free():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-2.0])
    want = -math.log(1 / (1 + math.exp(-1.0)))  # -log sigmoid(1)
    # flag, or reference log-probs passed as None
    for kwargs in (dict(reference_free=True), dict()):
        losses, cr, rjr = dpo_loss(pc, pr, None, None, beta=1.0, **kwargs)
        assert abs(losses.item() - want) < 1e-6
        assert round(losses.item(), 4) == 0.3133
        assert cr.item() == -1.0 and rjr.item() == -2.0
    # reference_free=True must ignore reference log-probs that are passed
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-7.0]), torch.tensor([3.0]), beta=1.0, reference_free=True)
    assert abs(losses.item() - want) < 1e-6


def test_worked_example_with_reference():
    # policy margin 1.0, reference margin 0.0 -> loss = -log sigmoid(0.1 * 1.0)
    pc, pr = torch.tensor([-1.0]), torch.tensor([-2.0])
    rc, rr = torch.tensor([-1.5]), torch.tensor([-1.5])
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert abs(losses.item() - math.log1p(math.exp(-0.1))) < 1e-6
    assert round(losses.item(), 4) == 0.6444
    assert abs(cr.item() - 0.05) < 1e-7 and abs(rjr.item() + 0.05) < 1e-7


# -----------------------------------------------------------------------------
# every loss type vs its float64 formula


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.0), (0.3, 0.2)])
def test_matches_formula(loss_type, beta, ls):
    gamma, delta, tau = 0.7, 0.25, 0.05
    plain, tensors = random_batch(9, seed=100 * LOSS_TYPES.index(loss_type) + int(10 * beta) + int(10 * ls))
    losses, cr, rjr = call(loss_type, tensors, beta=beta, label_smoothing=ls, gamma=gamma,
                           bco_delta=delta, discopop_tau=tau)
    want = ref_losses(loss_type, *plain, beta, ls, gamma, delta, tau)
    assert losses.shape == (9,) and losses.dtype == torch.float64
    for got, w in zip(losses.tolist(), want):
        assert got == pytest.approx(w, rel=1e-9, abs=1e-12), (loss_type, got, w)
    pc, pr, rc, rr, lc, lr = plain
    if loss_type == "reward":  # a reward model's own rewards, as they came
        want_c, want_r = pc, pr
    elif loss_type in ("simpo", "orpo"):  # their own reward: beta * per-token average policy log-prob
        want_c = [beta * pc[i] / lc[i] for i in range(9)]
        want_r = [beta * pr[i] / lr[i] for i in range(9)]
    else:
        want_c = [beta * (pc[i] - rc[i]) for i in range(9)]
        want_r = [beta * (pr[i] - rr[i]) for i in range(9)]
    assert cr.tolist() == pytest.approx(want_c, rel=1e-12)
    assert rjr.tolist() == pytest.approx(want_r, rel=1e-12)


def test_rewards_detached():
    _, (pc, pr, rc, rr, lc, lr) = random_batch(4, seed=1)
    pc.requires_grad_(True); pr.requires_grad_(True)
    for loss_type in LOSS_TYPES:
        losses, cr, rjr = call(loss_type, (pc, pr, rc, rr, lc, lr))
        assert losses.requires_grad and not cr.requires_grad and not rjr.requires_grad


def test_reference_none_is_zero_and_simpo_ignores_reference():
    plain, (pc, pr, rc, rr, lc, lr) = random_batch(5, seed=2)
    zero = torch.zeros_like(pc)
    for loss_type in LOSS_TYPES:
        a = dpo_loss(pc, pr, None, None, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
        b = dpo_loss(pc, pr, zero, zero, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
        for x, y in zip(a, b):
            assert torch.equal(x, y), loss_type
    a = dpo_loss(pc, pr, rc, rr, loss_type="simpo", chosen_lengths=lc, rejected_lengths=lr)
    b = dpo_loss(pc, pr, None, None, loss_type="simpo", chosen_lengths=lc, rejected_lengths=lr)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_label_smoothing_sigmoid_cdpo():
    # margin h: cDPO = -(1-e) log sig(h) - e log sig(-h);
    # e = 0.5 gives (softplus(h) + softplus(-h)) / 2
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-3.0, -7.0, -4.0, -6.0))
    h = 0.5 * ((-3.0 + 4.0) - (-7.0 + 6.0))  # = 1.0
    for e in (0.0, 0.1, 0.3, 0.49):
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=e)
        assert losses.item() == pytest.approx(-(1 - e) * logsig(h) - e * logsig(-h), rel=1e-12)
    # smoothing makes the loss grow (not vanish) as the margin grows: it penalizes overconfidence
    big = dpo_loss(pc * 0 + 100.0, pr * 0, None, None, beta=1.0, label_smoothing=0.1)[0].item()
    assert big == pytest.approx(0.1 * 100.0, rel=1e-3)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)


def test_exo_pair_default_epsilon():
    _, tensors = random_batch(5, seed=3)
    a = call("exo_pair", tensors, label_smoothing=0.0)[0]
    b = call("exo_pair", tensors, label_smoothing=1e-3)[0]
    assert torch.allclose(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "nca_pair", "hinge"])
def test_sft_weight_adds_chosen_nll_per_token(loss_type):
    plain, tensors = random_batch(6, seed=4)
    pc, lc = plain[0], plain[4]
    base = call(loss_type, tensors, beta=0.2)[0]
    for w in (0.5, 1.0, 2.0):
        mixed = call(loss_type, tensors, beta=0.2, sft_weight=w)[0]
        want = [w * -pc[i] / lc[i] for i in range(6)]
        assert (mixed - base).tolist() == pytest.approx(want, rel=1e-9)


def test_sft_weight_and_length_types_need_lengths():
    pc, pr = torch.tensor([-5.0, -6.0]), torch.tensor([-7.0, -8.0])
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, None, None, sft_weight=1.0)
    for loss_type in sorted(NEEDS_LENGTHS):
        with pytest.raises(ValueError, match="chosen_lengths"):
            dpo_loss(pc, pr, None, None, loss_type=loss_type)
        with pytest.raises(ValueError, match="rejected_lengths"):
            dpo_loss(pc, pr, None, None, loss_type=loss_type, chosen_lengths=torch.tensor([3, 4]))
        with pytest.raises(ValueError, match="shape"):
            dpo_loss(pc, pr, None, None, loss_type=loss_type, chosen_lengths=torch.tensor([3, 4, 5]),
                     rejected_lengths=torch.tensor([3, 4]))
    # the other types work without lengths
    for loss_type in set(LOSS_TYPES) - NEEDS_LENGTHS:
        losses, _, _ = dpo_loss(pc, pr, None, None, loss_type=loss_type)
        assert losses.shape == (2,)


def test_unknown_loss_type():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-2.0])
    with pytest.raises(ValueError) as err:
        dpo_loss(pc, pr, None, None, loss_type="kto")
    msg = str(err.value)
    assert "'kto'" in msg and all(name in msg for name in LOSS_TYPES)
    # 17 losses + the aot_unpaired alias + a reward model's (reward.py)
    assert isinstance(LOSS_TYPES, tuple) and len(set(LOSS_TYPES)) == 19


def test_only_one_reference_is_an_error():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-2.0])
    with pytest.raises(ValueError, match="both reference"):
        dpo_loss(pc, pr, torch.tensor([-1.0]), None)


# -----------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck(loss_type):
    # central finite differences vs autograd, float64, through all four log-prob inputs
    _, (pc, pr, rc, rr, lc, lr) = random_batch(5, seed=5)
    inputs = tuple(t.clone().requires_grad_(True) for t in (pc, pr, rc, rr))
    f = lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3, loss_type=loss_type, label_smoothing=0.1,
                                    chosen_lengths=lc, rejected_lengths=lr, sft_weight=0.5,
                                    bco_delta=0.1)[0]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_sigmoid_gradient_closed_form():
    # d/d(policy_chosen) of -log sig(beta*h) = -beta * sig(-beta*h); manual check with the formula
    plain, (pc, pr, rc, rr, lc, lr) = random_batch(6, seed=6)
    pc.requires_grad_(True)
    beta = 0.4
    dpo_loss(pc, pr, rc, rr, beta=beta)[0].sum().backward()
    P, R, RC, RR = plain[:4]
    want = [-beta * sig(-beta * ((P[i] - RC[i]) - (R[i] - RR[i]))) for i in range(6)]
    assert pc.grad.tolist() == pytest.approx(want, rel=1e-12)


# -----------------------------------------------------------------------------
# numerical stability at huge margins (float32, where exp overflows at ~88)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_finite_at_huge_margins(loss_type, beta):
    for m in (1e4, -1e4):
        # realistic signs: the better response has log-prob -1, the worse one -1 - |m|
        pc = torch.tensor([-1.0, -1.0 - abs(m)] if m > 0 else [-1.0 - abs(m), -1.0], requires_grad=True)
        pr = torch.tensor([-1.0 - abs(m), -1.0] if m > 0 else [-1.0, -1.0 - abs(m)], requires_grad=True)
        for ref in (None, (torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -3.0]))):
            rc, rr = ref if ref is not None else (None, None)
            for ls in (0.0, 0.1):
                losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                           label_smoothing=ls, chosen_lengths=torch.tensor([1, 1]),
                                           rejected_lengths=torch.tensor([1, 1]), sft_weight=0.1)
                assert losses.dtype == torch.float32
                assert torch.isfinite(losses).all(), (loss_type, m, losses)
                assert torch.isfinite(cr).all() and torch.isfinite(rjr).all()
                pc.grad = pr.grad = None
                losses.sum().backward()
                assert torch.isfinite(pc.grad).all(), (loss_type, m)
                if loss_type == "sft":  # plain SFT never looks at the rejected response
                    assert pr.grad is None
                else:
                    assert torch.isfinite(pr.grad).all(), (loss_type, m)


def test_huge_margin_values_sigmoid():
    # -log sig(z): ~0 for z = +1000, exactly ~1000 for z = -1000 (naive form gives inf or nan)
    pc, pr = torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0])
    losses, _, _ = dpo_loss(pc, pr, None, None, beta=0.1)
    assert losses[0].item() < 1e-30 and losses[1].item() == pytest.approx(1000.0, rel=1e-6)


def test_discopop_large_negative_margin_value():
    # at h = -50 the exp branch is switched off (sigmoid(h/tau) ~ 1e-435): loss ~ softplus(50) = 50
    pc, pr = torch.tensor([-60.0], dtype=torch.float64), torch.tensor([-10.0], dtype=torch.float64)
    losses, _, _ = dpo_loss(pc, pr, None, None, beta=1.0, loss_type="discopop")
    assert losses.item() == pytest.approx(50.0 + math.log1p(math.exp(-50.0)), rel=1e-12)


# -----------------------------------------------------------------------------
# TRL's DPO options in the loss: combined losses (MPO), f-divergences, orpo


F_PRIME = {  # f'(t) of each f-divergence at t = pi / pi_ref (f-DPO, Wang et al. 2023), written in t
    "reverse_kl": lambda t, a: math.log(t),
    "forward_kl": lambda t, a: 1 - 1 / t,
    "js_divergence": lambda t, a: math.log(2 * t / (1 + t)),
    "alpha_divergence": lambda t, a: (t ** (a - 1) - 1) / (a - 1) if a != 1 else math.log(t),
}


@pytest.mark.parametrize("f_div, alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                          ("alpha_divergence", 0.2), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", dpo.F_DIVERGENCE_LOSSES)
def test_f_divergence_matches_formula(loss_type, f_div, alpha):
    # the log-ratios u become f'(e^u) before the margin; the reference formula gets them in place of
    # the log-ratios
    beta, ls, n = 0.3, 0.1 if loss_type in ("robust", "exo_pair") else 0.0, 9
    plain, tensors = random_batch(n, seed=7 + dpo.F_DIVERGENCE_LOSSES.index(loss_type))
    pc, pr, rc, rr, lc, lr = plain
    losses, cr, rjr = call(loss_type, tensors, beta=beta, label_smoothing=ls, f_divergence_type=f_div,
                           f_alpha_divergence_coef=alpha)
    f = lambda u: F_PRIME[f_div](math.exp(u), alpha)
    sw, sl = [f(pc[i] - rc[i]) for i in range(n)], [f(pr[i] - rr[i]) for i in range(n)]
    zero = [0.0] * n
    want = (ref_losses("sft", pc, pr, rc, rr, lc, lr, beta, ls, 0, 0, 0.05) if loss_type == "sft" else
            ref_losses(loss_type, sw, sl, zero, zero, lc, lr, beta, ls, 0, 0, 0.05))
    assert losses.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    # rewards: plain ratios
    assert cr.tolist() == pytest.approx([beta * (pc[i] - rc[i]) for i in range(n)], rel=1e-12)


def test_alpha_divergence_is_clamped_as_trl_and_other_types_are_refused():
    # (alpha - 1) u is clamped at 80 (TRL's float32 bound), so exp stays finite:
    # u = -400 at alpha 0.5 gives e^80
    pc, pr = torch.tensor([-401.0, -1.0]), torch.tensor([-1.0, -1.0])
    rc, rr = torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.0])
    z = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="hinge", f_divergence_type="alpha_divergence")[0]
    assert z.tolist() == pytest.approx([1 - (math.exp(80) - 1) / -0.5, 1.0], rel=1e-6)
    for t in set(LOSS_TYPES) - set(dpo.F_DIVERGENCE_LOSSES):
        with pytest.raises(ValueError, match="f_divergence_type"):
            dpo_loss(pc, pr, rc, rr, loss_type=t, f_divergence_type="forward_kl",
                     chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2))


def test_combined_losses_are_the_weighted_sum_and_sft_weight_is_sft_in_the_list():
    plain, tensors = random_batch(7, seed=11)
    kw = dict(beta=0.2, label_smoothing=0.1)
    types, weights = ["sigmoid", "bco_pair", "sft", "ipo"], [0.8, 0.2, 1.0, -0.3]
    got = call(",".join(types), tensors, loss_weights=weights, **kw)[0]
    assert torch.equal(got, call(types, tensors, loss_weights=[str(w) for w in weights], **kw)[0])
    want = [sum(w * ref_losses(t, *plain, 0.2, 0.1, 0.5, 0.0, 0.05)[i]
                for t, w in zip(types, weights)) for i in range(7)]
    assert got.tolist() == pytest.approx(want, rel=1e-9)
    assert call("sigmoid,sigmoid", tensors)[0].tolist() == pytest.approx((2 * call("sigmoid", tensors)[0]).tolist())
    rpo = call("sigmoid", tensors, sft_weight=0.7)[0]
    assert rpo.tolist() == pytest.approx(call("sigmoid,sft", tensors, loss_weights=[1, 0.7])[0].tolist(), rel=1e-12)
    for bad in (dict(loss_type="sigmoid,kto"), dict(loss_type="sigmoid,sft", loss_weights=[1.0])):
        with pytest.raises(ValueError, match="loss_type"):
            call(bad.pop("loss_type"), tensors, **bad)


def test_orpo_log_odds_near_zero_and_minus_infinity():
    # ORPO: -a_w + lambda * -log sigmoid(log odds(a_w) - log odds(a_l)), a the per-token average
    # log-prob, log odds(a) = log(e^a / (1 - e^a)); the reference in 60-digit decimals
    getcontext().prec = 60
    def want(aw, al, lam):
        odds = lambda a: Decimal(a).exp() / (1 - Decimal(a).exp())
        d = (odds(aw) / odds(al)).ln()
        return float(-Decimal(aw) + lam * (1 + (-d).exp()).ln())
    a = [-1e-12, -1e-8, -1e-4, -0.5, -0.69, -0.7, -3.0, -40.0, -1e3, -1e4]
    aw, al = torch.tensor(a, dtype=torch.float64), torch.tensor(a[::-1], dtype=torch.float64)
    n = torch.tensor([3.0] * len(a), dtype=torch.float64)  # summed log-probs are 3 x the average
    losses, cr, rjr = dpo_loss(3 * aw, 3 * al, None, None, beta=0.25, loss_type="orpo",
                               chosen_lengths=n, rejected_lengths=n)
    assert losses.tolist() == pytest.approx([want(x, y, Decimal("0.25")) for x, y in zip(a, a[::-1])], rel=1e-12)
    # TRL's ORPO reward: lambda * a
    assert cr.tolist() == pytest.approx([0.25 * x for x in a], rel=1e-12)
    # float32 at the ends, including a = 0 exactly (every token certain): finite values and
    # gradients
    pc = torch.tensor([0.0, -1e-7, -3e4, -1.0], requires_grad=True)
    pr = torch.tensor([0.0, -2.0, -1.0, -3e4], requires_grad=True)
    one = torch.ones(4)
    losses = dpo_loss(pc, pr, None, None, beta=0.1, loss_type="orpo", chosen_lengths=one,
                      rejected_lengths=one)[0]
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # equal odds: -log sigmoid(0)
    assert losses[0].item() == pytest.approx(0.1 * math.log(2), rel=1e-6)
    assert losses[2].item() == pytest.approx(3e4 + 0.1 * (3e4 - 1 - math.log(-math.expm1(-1.0))), rel=1e-6)


def test_orpo_is_reference_free():
    _, (pc, pr, rc, rr, lc, lr) = random_batch(5, seed=12)
    a = dpo_loss(pc, pr, rc, rr, loss_type="orpo", chosen_lengths=lc, rejected_lengths=lr)
    b = dpo_loss(pc, pr, None, None, loss_type="orpo", chosen_lengths=lc, rejected_lengths=lr)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_reward_model_loss_is_trls_bradley_terry_with_centering():
    # TRL's RewardTrainer: mean(-log sigma(r_w - r_l)) + c * mean((r_w + r_l)^2), here per pair (the caller
    # takes the mean); a reward model's rewards go in where log-probs go, references and beta play no part
    rng = random.Random(11)
    rw = [rng.uniform(-6, 6) for _ in range(7)]
    rl = [rng.uniform(-6, 6) for _ in range(7)]
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)
    for c in (0.0, 0.01, 0.5):
        a, b = t(rw), t(rl)
        losses, cr, rjr = dpo_loss(a, b, torch.zeros(7, dtype=torch.float64), torch.ones(7, dtype=torch.float64),
                                   beta=0.3, loss_type="reward", center_rewards_coefficient=c)
        want = [-logsig(x - y) + c * (x + y) ** 2 for x, y in zip(rw, rl)]
        assert losses.tolist() == pytest.approx(want, rel=1e-12)
        assert cr.tolist() == rw and rjr.tolist() == rl
        losses.mean().backward()
        grad_w = [(-sig(-(x - y)) + 2 * c * (x + y)) / 7 for x, y in zip(rw, rl)]
        grad_l = [(sig(-(x - y)) + 2 * c * (x + y)) / 7 for x, y in zip(rw, rl)]
        assert a.grad.tolist() == pytest.approx(grad_w, rel=1e-10)
        assert b.grad.tolist() == pytest.approx(grad_l, rel=1e-10)
