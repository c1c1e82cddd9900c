"""
Direct Preference Optimization (DPO) for GPT-2, top to bottom: config -> micro-batches ->
response log-probs -> the loss -> the reference -> the training loop (batches.py: the data side).

The offline toy run (CPU, a few minutes; `python sample.py --mode=demo` runs all four):
    python prepare.py                                  # writes data/toy/
    python dpo.py --config=config/toy_sft.py           # SFT  -> out/toy_sft
    python dpo.py --config=config/toy_dpo.py           # DPO  -> out/toy_dpo (reference: SFT)
    python sample.py --mode=compare --config=config/toy_dpo.py --init_from=out/toy_dpo
Real data and real GPT-2 weights, on one GPU, 8 (DDP) or sharded (FSDP):
    python prepare.py --dataset=hh --hh_subsets=harmless-base,helpful-base --out_dir=data/hh
    python dpo.py --config=config/hh_gpt2.py
    torchrun --standalone --nproc_per_node=8 dpo.py --config=config/hh_gpt2.py
    torchrun --standalone --nproc_per_node=4 dpo.py --config=config/hh_gpt2.py --fsdp=true
Options: python dpo.py --help; --key=value, or --config=FILE with `key = value` lines.
"""
import contextlib
import copy
import math
import os
import re
import sys
import time
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import configurator
import judged
import launch
import reward
from batches import PairData, make_shape, micro_batches, on_device, step_pairs, to_device
from launch import print0, setup
from model import attention_mask, flex_block_mask
from prepare import PrepareError
from shards import list_shards

# -----------------------------------------------------------------------------
# config

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "apo_zero", "apo_down", "discopop", "aot", "aot_pair", "aot_unpaired", "sigmoid_norm",
              "simpo", "sft", "orpo", "reward")
REFERENCE_FREE_LOSSES = ("simpo", "sft", "orpo", "reward")  # these never look at a reference model
NEEDS_LENGTHS = ("ipo", "sigmoid_norm", "simpo", "sft", "orpo")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                       "sft")  # f-DPO's beta log Z(x) cancels in these only

@dataclass
class Config:
    # run
    out_dir: str = "out"  # checkpoints, metrics.jsonl
    data_dir: str = "data/toy"  # prepare.py's output folder (train_*.bin, val_*.bin)
    init_from: str = "scratch"  # scratch | gpt2[-medium|-large|-xl] | a checkpoint or HF folder | resume
    seed: int = 1337
    # model, used when init_from=scratch
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 0  # positions, every pair must fit; 0 = the data's longest pair, at most 1024
    dropout: float = 0.0
    bias: bool = True
    # loss
    loss_type: str = "sigmoid"  # see dpo_loss; a comma list sums them (MPO); "sft" alone: chosen responses only
    loss_weights: str = ""  # comma list, one weight per loss_type entry; empty = 1.0 each
    beta: float = 0.1  # strength of the KL leash to the reference
    label_smoothing: float = 0.0  # conservative DPO: assumed probability that a label is flipped
    gamma: float = 0.5  # simpo's target margin
    sft_weight: float = 0.0  # adds this times the chosen NLL per token to any loss (RPO; = sft in the list)
    bco_delta: float = 0.0  # bco_pair's reward shift
    discopop_tau: float = 0.05  # discopop's mixing temperature
    center_rewards_coefficient: float = 0.0  # loss_type=reward (reward.py): + this * (r_w + r_l)^2
    f_divergence_type: str = "reverse_kl"  # f-DPO: reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5  # alpha of alpha_divergence
    ld_alpha: float = 1.0  # LD-DPO: response tokens past the pair's shorter response count this much
    use_weighting: bool = False  # WPO: each pair's loss times its responses' per-token probability weights
    sync_ref_model: bool = False  # TR-DPO: every tau steps, reference = alpha*policy + (1-alpha)*reference
    ref_model_mixup_alpha: float = 0.6  # TR-DPO's alpha
    ref_model_sync_steps: int = 512  # TR-DPO's tau
    reference: str = "cached"  # cached: log-probs computed once | model: a frozen copy run every step
    # batching
    global_batch_size: int = 32  # pairs per optimizer step, summed over ranks and micro-steps
    batch_size: int = 8  # pairs per micro-step (plain layout) or the packing target (packed layout)
    layout: str = "packed"  # packed: prompt once, then both responses, pairs end to end | plain: padded rows
    pack_len: int = 0  # row length in tokens; 0 = the longest pair (packed) or sequence (plain)
    pack_rows: int = 0  # rows per packed micro-batch; 0 = room for about batch_size pairs
    truncate: bool = False  # pairs longer than block_size: False refuses, True cuts them (prompt start first)
    logprob_chunk: int = 4096  # tokens per lm_head chunk: full (tokens, vocab) logits never exist at once
    prefetch: bool = True  # build the next step's micro-batches while this step runs on the GPU
    grad_checkpointing: bool = False  # recompute block activations in backward (big models, less memory)
    # optimizer
    max_iters: int = 200
    learning_rate: float = 1e-4
    min_lr: float = 1e-5
    warmup_iters: int = 10
    lr_decay_iters: int = 0  # 0 = max_iters
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    # eval, logging, checkpoints
    eval_interval: int = 50  # also the checkpoint interval; 0 = neither (a checkpoint still at the end)
    eval_pairs: int = 0  # val pairs per eval, 0 = all
    eval_judge: str = ""  # toy | module:function | rm:PATH: judge the policy's samples at each eval (judged.py)
    eval_judge_prompts: int = 64  # the first this many unique val prompts
    eval_judge_samples: int = 4  # samples per prompt, from the policy and (once) the reference
    eval_judge_tokens: int = 64  # max new tokens per sample
    log_interval: int = 1
    save_checkpoint: bool = True
    export_hf: bool = False  # at the end also write out_dir/hf (config.json, model.safetensors)
    wandb_log: bool = False
    wandb_project: str = "nanodpo"
    wandb_run_name: str = "dpo"
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"  # auto (bfloat16 on cuda, else float32) | float32 | bfloat16
    compile: str = "auto"  # auto (on for cuda) | true | false
    fsdp: bool = False  # shard weights, grads and AdamW state over the torchrun ranks (FSDP2), not DDP

CHOICES = dict(layout=("packed", "plain"), reference=("cached", "model"),
               dtype=("auto", "float32", "bfloat16"), compile=("auto", "true", "false"))
POSITIVE = ("global_batch_size", "batch_size", "log_interval", "n_layer", "n_head", "n_embd",
            "logprob_chunk", "beta", "ref_model_sync_steps", "discopop_tau")
NON_NEGATIVE = ("block_size", "max_iters", "eval_interval", "eval_pairs", "warmup_iters",
                "lr_decay_iters", "pack_len", "pack_rows", "learning_rate", "min_lr", "grad_clip",
                "weight_decay", "dropout", "sft_weight")
NUMBER = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"

def needs_reference(cfg):
    return not set(cfg.loss_type.split(",")) <= set(REFERENCE_FREE_LOSSES)

def loss_terms(cfg):
    """[(loss type, weight)]: the terms the loss sums; --sft_weight adds sft (RPO)"""
    types = cfg.loss_type.split(",")
    weights = [1.0] * len(types)
    if cfg.loss_weights:
        weights = [float(w) for w in cfg.loss_weights.split(",")]
    terms = list(zip(types, weights))
    if cfg.sft_weight:
        terms.append(("sft", cfg.sft_weight))
    return terms

def check_config(cfg):
    """every value checked before any work, as one line naming the option"""
    for field in fields(cfg):
        value = getattr(cfg, field.name)
        if field.type is float and not math.isfinite(value):
            raise ValueError(f"--{field.name}={value}: expected a finite number")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"--{key}={getattr(cfg, key)}: expected one of {' | '.join(allowed)}")
    types = cfg.loss_type.split(",")
    if set(types) - set(LOSS_TYPES):
        raise ValueError(f"--loss_type={cfg.loss_type}: expected one of {' | '.join(LOSS_TYPES)} "
                         f"(or a comma list)")
    if cfg.f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"--f_divergence_type={cfg.f_divergence_type}: expected one of "
                         f"{' | '.join(F_DIVERGENCES)}")
    for key in POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be > 0")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be >= 0")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_head={cfg.n_head} must divide --n_embd={cfg.n_embd}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be in [0, 1)")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing={cfg.label_smoothing}: must be in [0, 0.5)")
    weights = cfg.loss_weights.split(",") if cfg.loss_weights else []
    numbers = all(re.fullmatch(NUMBER, w) for w in weights)
    if weights and (len(weights) != len(types) or not numbers):
        raise ValueError(f"--loss_weights={cfg.loss_weights}: expected {len(types)} comma-separated "
                         f"numbers, one per --loss_type entry")
    terms = dict(loss_terms(cfg))
    if not all(math.isfinite(w) and w >= 0 for w in terms.values()):
        raise ValueError(f"--loss_weights={cfg.loss_weights}: each weight must be finite and >= 0")
    if len(terms) < len(loss_terms(cfg)):  # each term is logged by its name
        raise ValueError(f"--loss_type={cfg.loss_type} (with --sft_weight={cfg.sft_weight}): a loss type "
                         f"twice; give each type once, weighted by --loss_weights")
    if not any(terms.values()):
        raise ValueError(f"--loss_weights={cfg.loss_weights}: all zero, the run would learn nothing")
    no_f = sorted(set(types) - set(F_DIVERGENCE_LOSSES))
    if cfg.f_divergence_type != "reverse_kl" and no_f:
        raise ValueError(f"--f_divergence_type={cfg.f_divergence_type} works with --loss_type "
                         f"{' | '.join(F_DIVERGENCE_LOSSES)} only (as TRL), not {','.join(no_f)}")
    sft_alone = set(types) == {"sft"} and not cfg.sft_weight
    if not 0 <= cfg.ld_alpha <= 1:
        raise ValueError(f"--ld_alpha={cfg.ld_alpha}: must be in [0, 1]")
    if cfg.ld_alpha < 1 and sft_alone:
        raise ValueError(f"--ld_alpha={cfg.ld_alpha}: not with sft alone (ld_alpha weighs the tokens "
                         f"past a pair's shorter response; sft reads the chosen response only)")
    aot = sorted({"aot", "aot_pair", "aot_unpaired"} & set(types))
    if cfg.use_weighting and aot:
        raise ValueError(f"--use_weighting=true: not with --loss_type {','.join(aot)} (it sorts the "
                         f"batch: weights would land on other pairs)")
    if cfg.sync_ref_model and (cfg.reference != "model" or not needs_reference(cfg)):
        raise ValueError("--sync_ref_model=true needs --reference=model (cached log-probs would go "
                         "stale) and a loss type with a reference")
    if not 0 <= cfg.ref_model_mixup_alpha <= 1:
        raise ValueError(f"--ref_model_mixup_alpha={cfg.ref_model_mixup_alpha}: must be in [0, 1]")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise ValueError(f"--device={cfg.device}: expected auto, cpu, cuda, cuda:N or mps")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={cfg.device}, but this torch sees no CUDA GPU (try --device=cpu)")
    reward.check_config(cfg)
    judged.check_config(cfg)

def parse_config(argv, cls=Config, defaults=None):
    cfg = configurator.parse(argv, cls, defaults)
    if cfg.init_from == "resume" and cls is Config:  # the checkpoint's options, changed where named
        return checkpoint.resume_config(cfg.out_dir, argv, cls, check_config)
    check_config(cfg)
    return cfg


# -----------------------------------------------------------------------------
# response log-probs of a micro-batch (batches.py builds them)

class SequenceSums(NamedTuple):
    logps: torch.Tensor  # (n_seq,) each response's summed log-prob (LD-DPO's tail weighted)
    wpo: torch.Tensor | None  # (n_seq,) WPO: the sums of log p(y_t) - log sum_v p(v)^2, or None

class SequenceLogps(nn.Module):
    """the trainable forward: a micro-batch -> the summed log-prob of every response. the mask,
    the transformer, the response positions, the chunked lm_head and the sums are one compiled
    graph. one module: DDP and FSDP see one forward"""

    def __init__(self, gpt, compile=False, chunk=4096, flex=False, ld_alpha=1.0, wpo=False,
                 scalar=False):
        super().__init__()
        self.scalar = scalar  # a reward model: its scalar head at each response's last token
        self.gpt = gpt
        self.chunk = chunk
        self.flex = flex
        self.ld_alpha = ld_alpha
        self.wpo = wpo
        self.logps = torch.compile(self._logps) if compile else self._logps

    def forward(self, idx, pos, doc, branch, src, tgt, seq, n_seq, tail, last):
        return self.logps(idx, pos, doc, branch, src, tgt, seq, n_seq, tail, last)

    def _logps(self, idx, pos, doc, branch, src, tgt, seq, n_seq, tail, last):
        if doc is None:
            mask = None  # plain rows: causal
        elif self.flex:
            mask = flex_block_mask(doc, branch)
        else:
            mask = attention_mask(doc, branch)
        h = self.gpt.hidden(idx, pos=pos, attn_mask=mask).flatten(0, 1)
        if self.scalar:  # loss_type=reward: (n_seq,) rewards stand in for the sums
            return SequenceSums(reward.scores(self.gpt, h, last), None)
        h = h[src]  # (N, C) the positions that predict response tokens
        out = self.gpt.token_logprobs(h, tgt, chunk_size=self.chunk, sum_sq=self.wpo)
        logp = out[0] if self.wpo else out  # (N,) float32
        weighted = logp
        if self.ld_alpha != 1:  # LD-DPO: tokens past the shorter response count ld_alpha
            weighted = logp * torch.where(tail, self.ld_alpha, 1.0)
        zeros = torch.zeros(n_seq, dtype=torch.float32, device=idx.device)
        sums = zeros.index_add(0, seq, weighted)
        if not self.wpo:
            return SequenceSums(sums, None)
        log_sum_sq = out[1]  # (N,) log sum_v p(v)^2
        wpo = zeros.index_add(0, seq, logp.detach() - log_sum_sq)
        return SequenceSums(sums, wpo)

class PairLogps(NamedTuple):
    chosen: torch.Tensor  # (K,) summed log-probs of each pair's chosen response
    rejected: torch.Tensor  # (K,) and of its rejected one
    weights: torch.Tensor | None  # (K,) WPO's pair weights, else None

def batch_logps(module, b):
    """the response log-probs of a micro-batch that is on the device"""
    K = len(b.pair_ids)
    out = module(b.idx, b.pos, b.doc, b.branch, b.src, b.tgt, b.seq, b.n_seq, b.tail, b.last)
    logps = out.logps[:2 * K]
    weights = None
    if out.wpo is not None:
        # WPO: w = exp(mean_t log p(y_t) - log sum_v p(v)^2) per response, w_chosen * w_rejected
        mean = out.wpo[:2 * K].view(-1, 2) / b.lengths.T.clamp(min=1)  # (K, 2)
        weights = torch.exp(mean.sum(1))
    return PairLogps(logps[0::2], logps[1::2], weights)


# -----------------------------------------------------------------------------
# the DPO loss family: one function, one short branch per loss type, in README's symbols:
# s_w, s_l summed response log-probs (B,); rho_w = s_w - log pi_ref(y_w|x), rho_l likewise;
# h = beta (rho_w - rho_l) the reward margin; n_w, n_l token counts; eps = label_smoothing

def f_prime(u, f_divergence_type, alpha):
    """f'(e^u) of a log-ratio u (f-DPO, Wang et al. 2023): it takes u's place in the margin"""
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-u)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(u)  # log(2t / (1 + t))
    if f_divergence_type == "alpha_divergence" and abs(alpha - 1) >= 1e-6:  # 1: reverse_kl
        # clamped at 80 as TRL: exp stays finite in float32
        return torch.expm1(((alpha - 1) * u).clamp(max=80.0)) / (alpha - 1)
    return u  # reverse_kl: DPO

def _smoothed_logistic(z, eps):
    # -log sigmoid(z), with a fraction eps of the labels assumed flipped (cDPO). logsigmoid stays
    # finite and has a finite gradient for any z, unlike log(exp(z)/(1+exp(z)))
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)

def _token_counts(lengths, like, what, why):
    if lengths is None or torch.as_tensor(lengths).shape != like.shape:
        got = "none" if lengths is None else f"shape {tuple(torch.as_tensor(lengths).shape)}"
        raise ValueError(f"dpo_loss: {why} needs {what}, the response token count of each sequence "
                         f"(per-token averages), shape {tuple(like.shape)}; got {got}")
    counts = torch.as_tensor(lengths, dtype=like.dtype, device=like.device)
    return counts.clamp(min=1)  # an empty response: no 0/0

def _log_odds(a):
    # log odds of a per-token average log-prob a: a - log(1 - e^a); expm1 is exact near a = 0
    return a - torch.log((-torch.expm1(a)).clamp(min=1e-30))

class LossOut(NamedTuple):
    losses: torch.Tensor  # (B,) the caller takes the mean
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached

def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
             reference_free=False, chosen_lengths=None, rejected_lengths=None, gamma=0.5,
             sft_weight=0.0, bco_delta=0.0, discopop_tau=0.05, loss_weights=None,
             f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, pair_weights=None,
             center_rewards_coefficient=0.0):
    """
    Pairwise preference loss on (B,) log-probs SUMMED over the response tokens -> LossOut: the
    losses and the rewards beta * rho, detached, as TRL's DPOTrainer (simpo and orpo: beta times
    the per-token average policy log-prob, their own reward). README's "Loss types" has every
    formula. loss_type: one, or a list ("sigmoid,bco_pair,sft") summed with loss_weights (MPO).
    reference_free=True, or both reference tensors None: reference log-probs are 0.
    label_smoothing (eps): cDPO's flip rate, robust's noise rate, exo_pair's target (0: 1e-3).
    gamma: simpo's margin in reward units, as TRL's CPOTrainer(simpo_gamma).
    sft_weight: adds sft_weight * (-s_w / n_w) (RPO). bco_delta: bco_pair's reward shift.
    pair_weights: None, or (B,) factors of each pair's loss (WPO's weights).
    reward: the inputs are a reward model's rewards r_w, r_l (reward.py), also the rewards reported.
    """
    types = loss_type.split(",") if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if sft_weight != 0.0:  # RPO, Pang et al. 2024: + weighted NLL of the chosen response
        types = types + ["sft"]
        weights = weights + [sft_weight]
    f_ok = f_divergence_type == "reverse_kl" or not set(types) - set(F_DIVERGENCE_LOSSES)
    known = not set(types) - set(LOSS_TYPES) and f_divergence_type in F_DIVERGENCES
    if not known or len(weights) != len(types) or not f_ok:
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} with loss_weights {loss_weights} and "
                         f"f_divergence_type {f_divergence_type!r}: expected types of {LOSS_TYPES}, "
                         f"one weight each, f-divergences of {F_DIVERGENCES}, not reverse_kl only "
                         f"with {F_DIVERGENCE_LOSSES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} must be in [0, 0.5) "
                         f"(it is the assumed fraction of flipped preference labels)")
    s_w, s_l = policy_chosen_logps, policy_rejected_logps  # (B,), (B,)
    if s_w.shape != s_l.shape or s_w.dim() != 1:
        raise ValueError(f"dpo_loss: policy log-probs must both be (B,), got {tuple(s_w.shape)} "
                         f"and {tuple(s_l.shape)}")
    if (reference_chosen_logps is None) != (reference_rejected_logps is None):
        raise ValueError("dpo_loss: pass both reference log-prob tensors or neither "
                         "(None = reference-free)")
    if reference_free or reference_chosen_logps is None:
        ref_w, ref_l = torch.zeros_like(s_w), torch.zeros_like(s_l)
    else:
        ref_w, ref_l = reference_chosen_logps, reference_rejected_logps
    if set(types) & set(NEEDS_LENGTHS):
        why = f"loss_type={','.join(types)!r}"
        n_w = _token_counts(chosen_lengths, s_w, "chosen_lengths", why)
        n_l = _token_counts(rejected_lengths, s_l, "rejected_lengths", why)
    rho_w = s_w - ref_w  # (B,) log pi(y_w|x)/pi_ref(y_w|x)
    rho_l = s_l - ref_l  # (B,) log pi(y_l|x)/pi_ref(y_l|x)
    f_w = f_prime(rho_w, f_divergence_type, f_alpha_divergence_coef)  # DPO: rho_w itself
    f_l = f_prime(rho_l, f_divergence_type, f_alpha_divergence_coef)
    h = beta * (f_w - f_l)  # (B,) DPO reward margin
    eps = label_smoothing
    losses = 0.0

    for t, weight in zip(types, weights):
        if t == "sigmoid":  # DPO, Rafailov et al. 2023; eps > 0: conservative DPO (cDPO)
            loss = _smoothed_logistic(h, eps)
        elif t == "ipo":  # IPO, Azar et al. 2023, eq. 17 (beta plays tau)
            # per-token AVERAGED log-ratios, as TRL: the target 1/(2 beta) is a per-token scale,
            # and with sums the squared loss would grow with response length
            loss = (f_w / n_w - f_l / n_l - 1 / (2 * beta)) ** 2
        elif t == "hinge":  # SLiC, Zhao et al. 2023: hinge on the margin, beta = 1/delta
            loss = torch.relu(1 - h)
        elif t == "robust":  # rDPO, Chowdhury et al. 2024: unbiased under label-flip rate eps
            loss = (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
        elif t == "exo_pair":  # EXO, Ji et al. 2024, eq. 16: KL(model pair dist || [1-e, e])
            e = eps if eps > 0 else 1e-3
            loss = (torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-e))
                    + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(e)))
        elif t == "nca_pair":  # NCA, Chen et al. 2024: absolute rewards, not just their difference
            r_w, r_l = beta * rho_w, beta * rho_l
            loss = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
        elif t == "bco_pair":  # BCO, Jung et al. 2024: chosen vs rejected as binary classes
            r_w, r_l = beta * rho_w, beta * rho_l
            loss = -F.logsigmoid(r_w - bco_delta) - F.logsigmoid(-(r_l - bco_delta))
        elif t == "sppo_hard":  # SPPO, Wu et al. 2024, with hard win probabilities 1 and 0
            loss = (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
        elif t == "apo_zero":  # APO-zero, D'Oosterlinck et al. 2024, eq. 7: chosen up, rejected down
            loss = torch.sigmoid(-beta * rho_w) + torch.sigmoid(beta * rho_l)
        elif t == "apo_down":  # APO-down, same paper, eq. 8: chosen down, rejected down more
            loss = torch.sigmoid(beta * rho_w) + torch.sigmoid(-h)
        elif t == "discopop":  # DiscoPOP, Lu et al. 2024, eq. 5: logistic/exp blend
            # exp(-h) sigmoid(h/tau) as exp(logsigmoid(h/tau) - h): never inf * 0 at large |h|
            logistic = -F.logsigmoid(h) * torch.sigmoid(-h / discopop_tau)
            loss = logistic + torch.exp(F.logsigmoid(h / discopop_tau) - h)
        elif t == "aot":  # AOT, Melnyk et al. 2024: sort policy and reference margins over the batch
            margin_sorted, _ = torch.sort(s_w - s_l, dim=0)
            ref_sorted, _ = torch.sort(ref_w - ref_l, dim=0)
            loss = _smoothed_logistic(beta * (margin_sorted - ref_sorted), eps)
        elif t in ("aot_pair", "aot_unpaired"):  # AOT unpaired (TRL's newer name): each side sorted
            chosen_sorted, _ = torch.sort(rho_w, dim=0)
            rejected_sorted, _ = torch.sort(rho_l, dim=0)
            loss = _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), eps)
        elif t == "sigmoid_norm":  # DPO on per-token averaged log-ratios (as TRL)
            loss = _smoothed_logistic(beta * (f_w / n_w - f_l / n_l), eps)
        elif t == "simpo":  # SimPO, Meng et al. 2024: reference-free, per-token average, margin gamma
            loss = _smoothed_logistic(beta * (s_w / n_w - s_l / n_l) - gamma, eps)
        elif t == "sft":  # plain supervised loss: per-token NLL of the chosen response
            loss = -s_w / n_w
        elif t == "orpo":  # ORPO, Hong et al. 2024: chosen NLL + lambda (= beta) * odds-ratio loss
            loss = -s_w / n_w - beta * F.logsigmoid(_log_odds(s_w / n_w) - _log_odds(s_l / n_l))
        elif t == "reward":  # Bradley-Terry on a reward model's r_w, r_l, as TRL's RewardTrainer
            loss = -F.logsigmoid(s_w - s_l) + center_rewards_coefficient * (s_w + s_l) ** 2
        losses = losses + weight * loss
    if pair_weights is not None:
        losses = losses * pair_weights

    if types == ["reward"]:  # a reward model's own rewards, as they came
        return LossOut(losses, s_w.detach(), s_l.detach())
    # simpo and orpo (alone or together) report their own reward: per-token average log-probs
    own_reward = set(types) <= set(REFERENCE_FREE_LOSSES) and set(types) & {"simpo", "orpo"}
    chosen_rewards, rejected_rewards = (s_w / n_w, s_l / n_l) if own_reward else (rho_w, rho_l)
    return LossOut(losses, (beta * chosen_rewards).detach(), (beta * rejected_rewards).detach())

def loss_kwargs(cfg):
    keys = ("beta", "loss_type", "label_smoothing", "gamma", "sft_weight", "bco_delta",
            "discopop_tau", "f_divergence_type", "f_alpha_divergence_coef", "center_rewards_coefficient")
    kwargs = {k: getattr(cfg, k) for k in keys}
    kwargs["loss_weights"] = cfg.loss_weights.split(",") if cfg.loss_weights else None
    return kwargs


# -----------------------------------------------------------------------------
# the reference

class Reference:
    """ref(batch, split) -> the reference log-probs (K,) chosen, (K,) rejected of a micro-batch's
    pairs: looked up in tables computed once (--reference=cached), computed now by a frozen copy
    (--reference=model), or (None, None) for reference-free losses"""

    def __init__(self, run, ref_model, meta, datasets):
        self.run = run
        self.tables = None
        self.model = None
        cfg = run.cfg
        if not needs_reference(cfg):
            return
        if cfg.reference == "cached":
            ref_model.to(run.device)
            self.tables = {d.split: reference_logps(ref_model, meta, d, run) for d in datasets}
        else:
            frozen = copy.deepcopy(ref_model).to(run.device).eval().requires_grad_(False)
            frozen.gradient_checkpointing = False
            self.model = SequenceLogps(frozen, compile=run.compile, chunk=cfg.logprob_chunk,
                                       flex=run.flex, ld_alpha=cfg.ld_alpha)

    def __call__(self, b, split):
        if self.model is not None:
            with torch.no_grad(), self.run.ctx:
                out = batch_logps(self.model, b)
            return out.chosen.float(), out.rejected.float()
        if self.tables is None:
            return None, None
        chosen, rejected = self.tables[split]
        j = torch.from_numpy(b.pair_ids)
        return to_device(chosen[j], self.run.device), to_device(rejected[j], self.run.device)

    @torch.no_grad()
    def sync(self, model, alpha):
        """TR-DPO: reference = alpha * policy + (1 - alpha) * reference"""
        for r, p in zip(self.model.gpt.parameters(), model.parameters()):
            if hasattr(p, "full_tensor"):  # fsdp: a sharded DTensor
                p = p.full_tensor()
            r.mul_(1 - alpha).add_(p, alpha=alpha)

def reference_logps(ref_model, meta, data, run):
    """(N,) chosen and (N,) rejected reference log-probs of every pair of `data`, computed once
    (ranks split the pairs) and cached beside the shards, under the hashes of the reference's
    weights and of this split's shards (online rounds share their val split)"""
    ld = f"_ld{run.cfg.ld_alpha}" if run.cfg.ld_alpha != 1 else ""  # LD-DPO's sums differ
    shards = meta["split_hash"][data.split]  # computed with the data hash, in the same read
    name = f"ref_logps_{data.split}_{meta['ref_hash']}{ld}_{shards}_{data.block_size}.pt"
    path = os.path.join(data.data_dir, name)
    return checkpoint.cached(path, len(data), run, lambda: compute_reference(ref_model, data, run))

@torch.inference_mode()
def compute_reference(ref_model, data, run):
    cfg = run.cfg
    out = torch.zeros(2, len(data), dtype=torch.float32, device=run.device)
    module = SequenceLogps(ref_model, chunk=cfg.logprob_chunk, flex=run.flex, ld_alpha=cfg.ld_alpha)
    module.eval()
    ids = np.arange(run.rank, len(data), run.world)
    step = 16 * cfg.batch_size
    t0, last = time.time(), 0
    print0(f"reference log-probs {data.split}: {len(data)} pairs, computed once and cached beside "
           f"the shards (--reference=model skips this pass: a frozen copy runs every step instead)")
    for i in range(0, len(ids), step):
        for b in micro_batches(data, ids[i: i + step], run.shape):
            with run.ctx:
                logps = batch_logps(module, on_device(b, run.device))
            j = torch.from_numpy(b.pair_ids).to(run.device)
            out[0, j] = logps.chosen.float()
            out[1, j] = logps.rejected.float()
        if time.time() - last > 5:  # the first eta at once (last = 0), then every 5 s
            last, done = time.time(), min(i + step, len(ids))
            eta = (last - t0) / done * (len(ids) - done)
            print0(f"reference log-probs {data.split}: {done}/{len(ids)} pairs, eta {eta:.0f}s")
    if run.world > 1:
        dist.all_reduce(out)  # each pair was computed by exactly one rank, zeros elsewhere
    return out[0].cpu(), out[1].cpu()


# -----------------------------------------------------------------------------
# schedule, accounting, evaluation

def get_lr(it, cfg):
    """linear warmup, then cosine decay to min_lr"""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)

GPU_PEAK = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
            ("L4", 121e12), ("4090", 165e12))  # bf16 dense FLOP/s

def peak_flops(device):
    """a known GPU's peak, what MFU is reported against; None elsewhere (bench.py measures CPUs)"""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((flops for key, flops in GPU_PEAK if key in name), None)

class StepStats(NamedTuple):
    averages: dict  # Metrics.keys -> mean over the pairs
    tokens: float
    flops: float
    stop: bool  # a stop signal reached some rank
    grad_norm: float

class Metrics:
    """sums over pairs, kept on the device, and the host's counts; all-reduced, then averaged.
    a loss of several terms also sums each term: "loss/sigmoid", "loss/sft", ..."""
    KEYS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp",
            "rejected_logp")

    def __init__(self, device, cfg):
        terms = [f"loss/{t}" for t, _ in loss_terms(cfg)]
        self.keys = self.KEYS + tuple(terms if len(terms) > 1 else [])
        self.t = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        self.host = np.zeros(3)  # pairs, tokens, flops

    def add(self, loss, logps, terms, tokens=0, flops=0.0):
        cr, rr = loss.chosen_rewards, loss.rejected_rewards
        sums = [loss.losses.sum(), (cr > rr).float().sum(), (cr - rr).sum(), cr.sum(), rr.sum(),
                logps.chosen.sum(), logps.rejected.sum()] + [term.sum() for term in terms]
        self.t += torch.stack(sums).detach().double()
        self.host += (len(loss.losses), tokens, flops)

    def result(self, world, norm=None, stop=False):
        """-> StepStats, read in one copy: the step's one wait for the device"""
        host = torch.tensor([*self.host, stop], dtype=torch.float64, device=self.t.device)
        t = torch.cat([self.t, host])
        if world > 1:  # the host's counts travel in the same all_reduce
            dist.all_reduce(t)
        if norm is None:
            norm = t[:1]  # a stand-in, so the copy has one shape
        values = torch.cat([t, norm.double().view(1)]).tolist()
        n = len(self.keys)
        pairs, tokens, flops, stop, norm = values[n:]
        averages = {k: v / max(pairs, 1) for k, v in zip(self.keys, values[:n])}
        return StepStats(averages, tokens, flops, stop > 0, norm)

class MicroBatch(NamedTuple):
    batch: object  # batches.Batch, on the device
    weight: float  # 1, or 0 for fsdp's extra forwards
    ref_chosen: torch.Tensor | None  # (K,) reference log-probs, None when reference-free
    ref_rejected: torch.Tensor | None

def load(data, ids, ref, run, split):
    """micro-batches on the device with their reference log-probs. fsdp gathers the weights in
    every forward, so every rank runs as many: the extra ones repeat the last and weigh 0"""
    mbs = [on_device(b, run.device) for b in micro_batches(data, ids, run.shape)]
    n = len(mbs)
    if run.cfg.fsdp and run.world > 1:  # (this waits for the device: fsdp over several ranks)
        n = torch.tensor(n, device=run.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        n = int(n)
    extra = mbs[-1:] * (n - len(mbs))
    out = []
    for i, b in enumerate(mbs + extra):
        ref_chosen, ref_rejected = ref(b, split)
        out.append(MicroBatch(b, float(i < len(mbs)), ref_chosen, ref_rejected))
    return out

class Step(NamedTuple):
    loss: LossOut
    logps: PairLogps
    terms: list  # a loss of several terms: each term's (K,) losses, unweighted (logged only)

def micro_step(module, mb, run):
    """one micro-batch's forward and loss -> Step"""
    b = mb.batch
    with run.ctx:
        logps = batch_logps(module, b)
    args = (logps.chosen, logps.rejected, mb.ref_chosen, mb.ref_rejected)
    kwargs = dict(chosen_lengths=b.lengths[0], rejected_lengths=b.lengths[1], pair_weights=logps.weights,
                  **loss_kwargs(run.cfg))
    loss = dpo_loss(*args, **kwargs)
    terms = []
    if len(loss_terms(run.cfg)) > 1:  # each term alone, for the log
        with torch.no_grad():
            for t, _ in loss_terms(run.cfg):
                one = {**kwargs, "loss_type": t, "loss_weights": None, "sft_weight": 0.0}
                terms.append(dpo_loss(*args, **one).losses)
    return Step(loss, logps, terms)

@torch.no_grad()
def evaluate(module, data, ref, run, n_pairs):
    module.eval()
    m = Metrics(run.device, run.cfg)
    for mb in load(data, np.arange(run.rank, n_pairs, run.world), ref, run, "val"):
        step = micro_step(module, mb, run)
        if mb.weight:
            m.add(*step)
    module.train()
    return m.result(run.world).averages


# -----------------------------------------------------------------------------
# setup: the run, the model, the data, the reference, the optimizer

@dataclass
class Trainer:
    """what setup builds and the training loop uses"""
    cfg: Config
    run: launch.Run
    model: nn.Module  # the GPT being trained
    module: nn.Module  # its SequenceLogps, wrapped by DDP or sharded by FSDP
    optimizer: torch.optim.Optimizer
    ref: Reference
    train_data: PairData
    val_data: PairData | None
    meta: dict  # saved in every checkpoint: the reference's identity (TR-DPO: its weights)
    resumed: dict | None  # the checkpoint this run continues, if any
    start: int  # the first step
    sft: bool  # chosen responses only: no rejected, no reference
    log: object  # log(record): metrics.jsonl and wandb
    judged: object = None  # --eval_judge: judged.JudgedEval, run at each eval

def setup_training(cfg, stack, stop):
    """-> Trainer, or None when a resumed run is already at --max_iters"""
    run = setup(cfg)
    stack.enter_context(launch.lock(cfg.out_dir))  # makes out_dir
    list_shards(cfg.data_dir, "train")  # no data: say so before loading (or downloading) weights

    # the policy, its reference, the checkpoint resumed from, and the reference's identity
    model, ref_model, ck, meta = checkpoint.start(cfg)
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    if ck and (ck["iter_num"] > cfg.max_iters or ck["iter_num"] == cfg.max_iters and not ck.get("stopped")):
        print0(f"nothing to train: {ckpt} is at step {ck['iter_num']} and --max_iters={cfg.max_iters}; "
               f"it stays as it was (a higher --max_iters trains on)")
        return None
    if ck:
        print0(f"resumed at step {ck['iter_num']} from {ckpt}")
    elif cfg.init_from == "scratch" and needs_reference(cfg):
        print0("note: --init_from=scratch: the policy and its reference are the same random model, so "
               "this DPO learns nothing useful; start from an SFT model (--config=config/toy_sft.py, then "
               "--config=config/toy_dpo.py) or --init_from=gpt2")
    model = reward.model_for(cfg, model)  # --loss_type=reward: the trunk and a scalar head
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.to(run.device)

    sft = set(cfg.loss_type.split(",")) == {"sft"} and not (cfg.sft_weight or cfg.use_weighting)
    block, vocab = model.config.block_size, model.config.vocab_size
    train_data = PairData(cfg.data_dir, "train", block, cfg.truncate, sft, vocab)
    if not len(train_data):
        raise ValueError(f"{cfg.data_dir}: the train split has no pairs")
    val_data = None
    if list_shards(cfg.data_dir, "val", False):
        val_data = PairData(cfg.data_dir, "val", block, cfg.truncate, sft, vocab)
    datasets = [d for d in (train_data, val_data) if d]
    fixed = run.compile or run.flex
    run.shape = make_shape(cfg, datasets, fixed=fixed, multiple=128 if run.flex else 64)
    stop.during = "the reference pass"
    ref = Reference(run, ref_model, meta, datasets)
    judge_eval = judged.JudgedEval(cfg, run, ref_model, val_data) if cfg.eval_judge else None
    stop.during = "setup"
    del ref_model  # cached: only its tables stay
    if cfg.sync_ref_model:  # TR-DPO: the reference's weights are saved with the run (live views)
        meta = {**meta, "ref_model": ref.model.gpt.state_dict()}
    model.train()

    module = SequenceLogps(model, compile=run.compile, chunk=cfg.logprob_chunk, flex=run.flex,
                           ld_alpha=cfg.ld_alpha, wpo=cfg.use_weighting, scalar=cfg.loss_type == "reward")
    if cfg.fsdp:  # a shard group per block and one for the rest: weights gathered block by block
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16 weights in forward and backward; gradients reduced in float32 (bf16 sums lose bits)
        bf16 = run.dtype == "bfloat16"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
        for block_ in model.transformer.h:
            fully_shard(block_, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
    elif dist.is_initialized():  # no buffer broadcast: ranks may run different numbers of forwards
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        module = DDP(module, device_ids=device_ids, broadcast_buffers=False)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matmul weights and embeddings decay
    other = [p for p in model.parameters() if p.dim() < 2]  # biases and norms don't
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                  fused=True)
    start = 0
    if ck:
        start = checkpoint.restore(ck, model, optimizer, run.device)  # the rngs too
    else:
        torch.manual_seed(cfg.seed + run.rank)  # dropout differs per rank
    log = checkpoint.metrics_log(cfg, stack, ck)  # a resume keeps the records before its checkpoint

    s = run.shape
    rows = f"rows of {s.row_len}"
    if cfg.layout == "packed":
        rows = f"{'fixed' if s.fixed else 'per step'} {s.rows} x {s.row_len}"
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    n_val = len(val_data) if val_data else 0
    where = f"{run.world} rank(s) on {run.device}{' fsdp' if cfg.fsdp else ''}"
    print0(f"{n_params:.2f}M parameters, {len(train_data)} train pairs, {n_val} val pairs, {where}, "
           f"{run.dtype}, layout {cfg.layout} ({rows} tokens), compile {run.compile}, "
           f"reference {meta['ref_from']}")
    return Trainer(cfg=cfg, run=run, model=model, module=module, optimizer=optimizer, ref=ref,
                   train_data=train_data, val_data=val_data, meta=meta, resumed=ck, start=start,
                   sft=sft, log=log, judged=judge_eval)


# -----------------------------------------------------------------------------
# training

def train(cfg, continue_with=None):
    """one training run; returns the per-step metric dicts (all-reduced, the same on every rank).
    continue_with: the command that continues a stopped run (default: dpo.py's resume)"""
    again = continue_with or f"python dpo.py --init_from=resume --out_dir={cfg.out_dir}"
    with contextlib.ExitStack() as stack:  # the out_dir lock goes when a run fails, even in setup
        stop = launch.Stop()  # a signal in setup interrupts at once: no step to finish
        stack.callback(stop.restore)
        try:
            trainer = setup_training(cfg, stack, stop)
            stop.during = None  # from here a signal finishes the step, saves and stops
            if trainer is None:
                return []
            history = training_loop(trainer, stop, again)
            if stop.asked:  # the signal came after the last step's check: all is saved; stop here too
                ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
                print0(f"stopped after step {cfg.max_iters - 1}: saved {ckpt}; continue with: {again}")
                raise launch.Interrupted()
            return history
        except KeyboardInterrupt:  # in setup, or a second signal in a step
            ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
            # before the first step only a resumed run's checkpoint is this run's
            resumable = os.path.exists(ckpt) and (cfg.init_from == "resume" or not stop.during)
            saved = f"the last checkpoint is {ckpt}" if resumable else "nothing saved"
            rerun = f"continue with: {again}" if resumable or continue_with else "rerun the same command"
            if launch.is_rank0():  # on a line of its own, after the terminal's ^C
                print(f"\ninterrupted during {stop.during or 'a step'}: {saved}; {rerun}", file=sys.stderr)
            raise launch.Interrupted() from None

def step_batches(t, it):
    """this rank's micro-batches of step it, on the device"""
    cfg, run = t.cfg, t.run
    ids = step_pairs(len(t.train_data), cfg.seed, it, cfg.global_batch_size, run.rank, run.world)
    return load(t.train_data, ids, t.ref, run, "train")

def eval_and_save(t, it):
    cfg = t.cfg
    last = it == cfg.max_iters
    if t.val_data and cfg.eval_interval and (it % cfg.eval_interval == 0 or last):
        n_pairs = min(cfg.eval_pairs or len(t.val_data), len(t.val_data))
        ev = evaluate(t.module, t.val_data, t.ref, t.run, n_pairs)
        shown = ("loss", "chosen_logp") if t.sft else ev
        print0(f"eval {it}: " + ", ".join(f"{k} {ev[k]:.4f}" for k in shown))
        rec = {"iter": it, **{f"val/{k}": v for k, v in ev.items()}}
        if t.judged:  # the policy's samples on fixed val prompts, judged (judged.py)
            rec |= t.judged(t.model)
        t.log(rec)
    interval = cfg.eval_interval and it % cfg.eval_interval == 0 and it > 0
    if cfg.save_checkpoint and (interval or last):
        checkpoint.save(cfg, t.model, t.optimizer, it, t.meta)

def training_loop(t, stop, again):
    cfg, run, model, module, optimizer = t.cfg, t.run, t.model, t.module, t.optimizer
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    peak = peak_flops(run.device)
    history, step_time = [], 0.0
    nxt = None  # the next step's micro-batches, when built ahead (--prefetch)
    for it in range(t.start, cfg.max_iters + 1):
        # evaluation, then checkpoint (those at `start` were done before its checkpoint was saved)
        if it > t.start or not t.resumed or t.resumed.get("stopped"):
            eval_and_save(t, it)
        if it == cfg.max_iters:
            break

        # ---- TRAINING SECTION: one optimizer step over this rank's slice of the global batch
        t0 = time.time()
        lr = get_lr(it, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        mbs = nxt if nxt else step_batches(t, it)
        nxt = None
        m = Metrics(run.device, cfg)
        for i, mb in enumerate(mbs):
            last = i == len(mbs) - 1  # gradients are reduced across ranks in the last backward only
            if isinstance(module, DDP):
                module.require_backward_grad_sync = last
            elif cfg.fsdp:
                module.set_requires_gradient_sync(last)
            step = micro_step(module, mb, run)
            # each pair weighs 1/global_batch; ddp and fsdp average over ranks, hence the factor world
            (step.loss.losses.sum() * mb.weight * run.world / cfg.global_batch_size).backward()
            if mb.weight:
                b = mb.batch
                m.add(*step, b.n_tokens, model.flops(b.n_tokens, b.n_resp, b.ctx_sum))
        # TR-DPO syncs after steps tau, 2 tau, ... (as TRL)
        sync = cfg.sync_ref_model and (it + 1) % cfg.ref_model_sync_steps == 0
        if cfg.prefetch and it + 1 < cfg.max_iters and not sync:  # a sync changes the reference
            nxt = step_batches(t, it + 1)  # packed and copied to the GPU while it runs this step
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        if hasattr(norm, "full_tensor"):  # fsdp: a DTensor
            norm = norm.full_tensor()
        stats = m.result(run.world, norm, stop.asked)  # the one wait for the device
        loss_now, norm = stats.averages["loss"], stats.grad_norm
        if not math.isfinite(loss_now) or not math.isfinite(norm):
            what = f"loss is {loss_now}" if not math.isfinite(loss_now) else f"gradient norm is {norm}"
            saved = ckpt if os.path.exists(ckpt) else "none saved yet"
            raise FloatingPointError(f"step {it}: the {what}; stopping. the last good checkpoint is "
                                     f"{saved}. try a lower learning_rate or beta")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sync:
            alpha = cfg.ref_model_mixup_alpha
            t.ref.sync(model, alpha)
            print0(f"iter {it}: TR-DPO reference synced: {alpha} * policy + {1 - alpha:g} * reference")

        # ---- everything that follows is diagnostics, logging and the stop signal
        dt = time.time() - t0  # to the step's sync: its optimizer update overlaps the next step
        step_time += dt
        mfu = stats.flops / dt / (peak * run.world) if peak else None
        rec = {"iter": it, "lr": lr, **stats.averages, "grad_norm": norm, "ms": 1000 * dt,
               "pairs_per_s": cfg.global_batch_size / dt, "tokens_per_s": stats.tokens / dt,
               "flops_per_s": stats.flops / dt, "mfu": mfu}
        if run.device.type == "cuda":
            rec["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        history.append(rec)
        t.log(rec)
        if it % cfg.log_interval == 0:
            eta = step_time / (it - t.start + 1) * (cfg.max_iters - it - 1)  # steps only, not evals
            s = stats.averages
            pref = "" if t.sft else f", acc {s['accuracy']:.2f}, margin {s['margin']:.3f}"
            mfu_text = f", mfu {100 * mfu:.1f}%" if peak else ""
            print0(f"iter {it}: loss {s['loss']:.4f}{pref}, lr {lr:.2e}, {1000 * dt:.0f}ms, "
                   f"{rec['pairs_per_s']:.1f} pairs/s{mfu_text}, eta {eta:.0f}s")
        if stats.stop:  # every rank stops after the same step, saved before step it + 1's eval
            checkpoint.save(cfg, model, optimizer, it + 1, t.meta | {"stopped": True})
            print0(f"stopped after step {it}: saved {ckpt}; continue with: {again}")
            raise launch.Interrupted()
    checkpoint.finish(cfg, model, max(t.start, cfg.max_iters))
    return history

def main(argv):
    try:
        train(parse_config(argv))
        if dist.is_initialized():  # leave together: a rank torn down while rank 0 still writes can abort
            dist.barrier()
    except (ValueError, OSError, PrepareError, FloatingPointError) as e:  # bad input, no file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (launch.Interrupted, KeyboardInterrupt):
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1:])
