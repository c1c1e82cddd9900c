"""
Direct Preference Optimization (DPO) for GPT-2, in one file: config -> data -> packed micro-batches -> response
log-probs -> dpo_loss -> training loop.

The offline toy run (CPU, a few minutes; `python sample.py --mode=demo` runs all four):
    python prepare.py                                  # writes data/toy/
    python dpo.py --config=config/toy_sft.py           # SFT  -> out/toy_sft
    python dpo.py --config=config/toy_dpo.py           # DPO  -> out/toy_dpo (reference = the SFT model)
    python sample.py --mode=compare --config=config/toy_dpo.py --init_from=out/toy_dpo
Real data and real GPT-2 weights:
    python prepare.py --dataset=hh --hh_subsets=harmless-base,helpful-base --out_dir=data/hh
    python dpo.py --config=config/hh_gpt2.py                                     # one GPU
    torchrun --standalone --nproc_per_node=8 dpo.py --config=config/hh_gpt2.py   # DDP: each rank a slice of the batch
    torchrun --standalone --nproc_per_node=4 dpo.py --config=config/hh_gpt2.py --init_from=gpt2-xl --fsdp=true
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 dpo.py ...
Options: python dpo.py --help; --key=value on the command line, --config=FILE reads `key = value` lines first.

Left out on purpose: generation while training (online DPO is online.py), LoRA, tensor and pipeline parallelism,
a dataset library (prepare.py writes token shards once), schedules beyond warmup + cosine.
"""
import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import configurator
from checkpoint import print0, setup
from prepare import EOT, PrepareError, list_shards, load_pairs, truncate as cut_pair

# -----------------------------------------------------------------------------
# config

@dataclass
class Config:
    # run
    out_dir: str = "out"  # checkpoints, metrics.jsonl
    data_dir: str = "data/toy"  # prepare.py's output folder (train_*.bin, val_*.bin)
    init_from: str = "scratch"  # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a path (checkpoint or HF folder) | resume
    seed: int = 1337
    # model, used when init_from=scratch
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 0  # positions, every pair must fit (see truncate); 0 = the data's longest pair, at most 1024
    dropout: float = 0.0
    bias: bool = True
    # loss
    loss_type: str = "sigmoid"  # see dpo_loss; a comma list sums them (MPO); "sft" alone trains on the chosen responses only
    loss_weights: str = ""  # comma list, one weight per loss_type entry; empty = 1.0 each
    beta: float = 0.1  # strength of the KL leash to the reference
    label_smoothing: float = 0.0  # conservative DPO: assumed probability that a label is flipped
    gamma: float = 0.5  # simpo's target margin
    sft_weight: float = 0.0  # adds this times the chosen NLL per token to any loss (RPO; = sft with this weight in the list)
    bco_delta: float = 0.0  # bco_pair's reward shift
    discopop_tau: float = 0.05  # discopop's mixing temperature
    f_divergence_type: str = "reverse_kl"  # f-DPO: reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5  # alpha of alpha_divergence
    ld_alpha: float = 1.0  # LD-DPO: response tokens past the pair's shorter response count this much (1 = all alike)
    use_weighting: bool = False  # WPO: each pair's loss times its two responses' per-token policy probability weights
    sync_ref_model: bool = False  # TR-DPO: every ref_model_sync_steps steps reference = alpha*policy + (1-alpha)*reference
    ref_model_mixup_alpha: float = 0.6  # TR-DPO's alpha
    ref_model_sync_steps: int = 512  # TR-DPO's tau
    reference: str = "cached"  # cached: reference log-probs computed once, then the model is freed | model: a frozen copy run every step
    # batching
    global_batch_size: int = 32  # pairs per optimizer step, summed over ranks and micro-steps
    batch_size: int = 8  # pairs per micro-step (plain layout) or the packing target (packed layout)
    layout: str = "packed"  # packed: prompt once, chosen and rejected after it, several pairs per row | plain: padded rows
    pack_len: int = 0  # row length in tokens; 0 = the longest pair (packed) or sequence (plain) in the data
    pack_rows: int = 0  # rows per packed micro-batch; 0 = room for about batch_size pairs of mean train length
    truncate: bool = False  # pairs longer than block_size: False refuses with an error, True cuts them (prompt start first)
    logprob_chunk: int = 4096  # tokens per lm_head chunk, so full (tokens, vocab) logits never exist at once
    prefetch: bool = True  # build the next step's micro-batches (and copy them to the GPU) while this step runs
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
    log_interval: int = 1
    save_checkpoint: bool = True
    export_hf: bool = False  # at the end also write out_dir/hf: config.json + model.safetensors for transformers
    wandb_log: bool = False
    wandb_project: str = "nanodpo"
    wandb_run_name: str = "dpo"
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"  # auto (bfloat16 on cuda, else float32) | float32 | bfloat16
    compile: str = "auto"  # auto (on for cuda) | true | false
    fsdp: bool = False  # shard weights, grads and AdamW state over the torchrun ranks (FSDP2) instead of DDP

def check_config(cfg):
    """every value checked before any work, as one line naming the option"""
    choices = dict(layout=("packed", "plain"), reference=("cached", "model"), dtype=("auto", "float32", "bfloat16"),
                   compile=("auto", "true", "false"), loss_type=LOSS_TYPES, f_divergence_type=F_DIVERGENCES)
    for key, allowed in choices.items():
        if set(getattr(cfg, key).split(",") if key == "loss_type" else [getattr(cfg, key)]) - set(allowed):
            raise ValueError(f"--{key}={getattr(cfg, key)}: expected one of {' | '.join(allowed)}{' (or a comma list)' * (key == 'loss_type')}")
    positive = ("global_batch_size", "batch_size", "log_interval", "n_layer", "n_head", "n_embd", "logprob_chunk", "beta", "ref_model_sync_steps")
    for key in positive + ("block_size", "max_iters", "eval_interval", "eval_pairs", "warmup_iters", "lr_decay_iters", "pack_len",
                           "pack_rows", "learning_rate", "min_lr", "grad_clip", "weight_decay", "dropout"):
        if getattr(cfg, key) < 0 or (key in positive and getattr(cfg, key) == 0):
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be {'> 0' if key in positive else '>= 0'}")
    types, weights = cfg.loss_type.split(","), cfg.loss_weights.split(",") if cfg.loss_weights else []
    number, aot = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", sorted({"aot", "aot_pair", "aot_unpaired"} & set(types))
    for invalid, why in [
        (cfg.n_embd % cfg.n_head, f"--n_head={cfg.n_head} must divide --n_embd={cfg.n_embd}"),
        (not 0 <= cfg.label_smoothing < 0.5, f"--label_smoothing={cfg.label_smoothing}: must be in [0, 0.5)"),
        (weights and (len(weights) != len(types) or not all(re.fullmatch(number, w) for w in weights)),
         f"--loss_weights={cfg.loss_weights}: expected {len(types)} comma-separated numbers, one per --loss_type entry"),
        (cfg.f_divergence_type != "reverse_kl" and set(types) - set(F_DIVERGENCE_LOSSES), f"--f_divergence_type={cfg.f_divergence_type} "
         f"works with --loss_type {' | '.join(F_DIVERGENCE_LOSSES)} only (as TRL), not {','.join(sorted(set(types) - set(F_DIVERGENCE_LOSSES)))}"),
        (not 0 <= cfg.ld_alpha <= 1 or (cfg.ld_alpha < 1 and set(types) == {"sft"} and not cfg.sft_weight),
         f"--ld_alpha={cfg.ld_alpha}: must be in [0, 1], and weighs tokens past a pair's shorter response (not with sft alone)"),
        (cfg.use_weighting and aot, f"--use_weighting=true: not with --loss_type {','.join(aot)} (it sorts the batch: weights would land on other pairs)"),
        (cfg.sync_ref_model and (cfg.reference != "model" or set(types) <= set(REFERENCE_FREE_LOSSES)),
         f"--sync_ref_model=true needs --reference=model (cached log-probs would go stale) and a loss type with a reference"),
        (not 0 <= cfg.ref_model_mixup_alpha <= 1, f"--ref_model_mixup_alpha={cfg.ref_model_mixup_alpha}: must be in [0, 1]"),
        (not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device), f"--device={cfg.device}: expected auto, cpu, cuda, cuda:N or mps"),
        (cfg.device.startswith("cuda") and not torch.cuda.is_available(), f"--device={cfg.device}, but this torch sees no CUDA GPU (try --device=cpu)")]:
        if invalid:
            raise ValueError(why)

def parse_config(argv, cls=Config, defaults=None):
    cfg = configurator.parse(argv, cls, defaults)
    if cfg.init_from == "resume" and cls is Config:  # the run as it was: the checkpoint's options, changed where named
        cfg = checkpoint.resume_config(cfg.out_dir, argv, cls)
    check_config(cfg)
    return cfg


# -----------------------------------------------------------------------------
# data: prepare.py's shards, memory-mapped

class PairData:
    """all pairs of one split; pair i -> (prompt, chosen, rejected) int64 arrays"""

    def __init__(self, data_dir, split, block_size, truncate=False, chosen_only=False, vocab_size=None):
        self.data_dir, self.split, self.block_size = data_dir, split, block_size
        self.chosen_only = chosen_only  # sft never looks at the rejected responses: don't compute them
        self.shards = [load_pairs(p) for p in list_shards(data_dir, split)]
        for s in self.shards:
            if vocab_size and s.max_token >= vocab_size:
                raise ValueError(f"{s.path}: token id {s.max_token} >= the model's vocabulary ({vocab_size}); "
                                 f"was it prepared with another tokenizer?")
        self.shard_of = np.repeat(np.arange(len(self.shards)), [len(s) for s in self.shards])  # (N,)
        stored = np.concatenate([s.lengths for s in self.shards]).astype(np.int64)  # (N, 3) prompt, chosen, rejected
        seq_len = stored[:, 0] + stored[:, 1:].max(1)  # (N,) the longer sequence of each pair
        self.n_cut = int((seq_len > block_size).sum())
        if self.n_cut and not truncate:
            raise ValueError(
                f"{data_dir} ({split}): {self.n_cut} pairs are longer than block_size={block_size} "
                f"(longest prompt+response: {seq_len.max()} tokens). Set --truncate=true to cut them, raise --block_size "
                f"(GPT-2 has 1024 positions), or re-run prepare.py with --max_length={block_size}")
        self.lengths = stored.copy()  # as the trainer sees them
        if self.n_cut:  # prepare.py's rule: the prompt keeps its last block_size // 2 tokens, then responses lose their end
            pairs = (pair for sh in self.shards for pair in (sh[j] for j in range(len(sh))))
            self.lengths = np.array([[len(x) for x in cut_pair(*pair, block_size, block_size // 2)[:3]] for pair in pairs])
        if chosen_only:
            self.lengths[:, 2] = 0
        # where each pair's prompt, chosen and rejected tokens start in its shard (a cut prompt keeps its end)
        start = np.concatenate([s.offsets for s in self.shards])[:, None]
        self.seg = start + np.stack([stored[:, 0] - self.lengths[:, 0], stored[:, 0], stored[:, :2].sum(1)], 1)  # (N, 3)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        """pair i as the trainer sees it (cut to block_size by --truncate): (prompt, chosen, rejected) int64 arrays"""
        tokens = self.shards[self.shard_of[i]].tokens
        return tuple(tokens[a: a + n].astype(np.int64) for a, n in zip(self.seg[i], self.lengths[i]))

    def tokens(self, pairs, kinds):
        """segments end to end, kinds[s] (0 prompt, 1 chosen, 2 rejected) of pair pairs[s] -> their tokens (n,) int64,
        and for each token its segment (n,) and its place in it (n,)"""
        seg, within = spans(self.lengths[pairs, kinds])
        at = self.seg[pairs, kinds][seg] + within
        if len(self.shards) == 1:
            return self.shards[0].tokens[at].astype(np.int64), seg, within
        out, shard = np.empty(len(at), dtype=np.int64), self.shard_of[pairs][seg]
        for s, sh in enumerate(self.shards):  # a loop over shards, not pairs
            out[shard == s] = sh.tokens[at[shard == s]]
        return out, seg, within

def step_pairs(n, seed, step, global_batch, rank, world):
    """the dataset indices this rank trains on at optimizer step `step`: a fixed function of (seed, step), so a
    resumed run sees the same pairs. each epoch is a fresh permutation"""
    order = lambda epoch: np.random.default_rng([seed, epoch]).permutation(n)
    epoch, offset = divmod(step * global_batch, n)
    idx = order(epoch)[offset: offset + global_batch]
    while len(idx) < global_batch:  # the step runs over an epoch boundary
        epoch += 1
        idx = np.concatenate([idx, order(epoch)[: global_batch - len(idx)]])
    per = global_batch // world
    return idx[rank * per: (rank + 1) * per]


# -----------------------------------------------------------------------------
# micro-batches: the plain layout (one padded row per sequence) and the packed one (pairs end to end)

@dataclass
class Batch:
    idx: torch.Tensor  # (R, T) input tokens
    pos: torch.Tensor | None  # (R, T) position ids (packed) or None (plain: 0..T-1)
    doc: torch.Tensor | None  # (R, T) which pair a token belongs to, -1 for padding (packed)
    branch: torch.Tensor | None  # (R, T) 0 prompt, 1 chosen, 2 rejected (packed)
    src: torch.Tensor  # (N,) flat index into (R*T) of the position that predicts each response token
    tgt: torch.Tensor  # (N,) the response tokens
    seq: torch.Tensor  # (N,) 2*k for pair k's chosen, 2*k+1 for its rejected
    lengths: torch.Tensor  # (2, K) float: response tokens of each pair's chosen and rejected, known here
    pair_ids: np.ndarray  # (K,) dataset indices of the pairs in this micro-batch
    n_tokens: int  # real (non-padding) tokens the model runs on
    n_resp: int  # real response tokens (the lm_head's work)
    ctx_sum: int  # sum over real tokens of how many keys each attends to (for the attention FLOPs)
    n_seq: int = 0  # sequence slots of the sums: 2K, or more for fixed shapes (the spare ones take padding)
    tail: torch.Tensor = None  # (N,) bool: the token is past the pair's shorter response (LD-DPO weighs it ld_alpha)

def spans(lengths):
    """segments of these lengths laid end to end -> for each element its segment and its place in it:
    lengths [2, 3] -> segment [0, 0, 1, 1, 1], place [0, 1, 0, 1, 2]"""
    seg = np.repeat(np.arange(len(lengths)), lengths)
    return seg, np.arange(len(seg)) - (np.cumsum(lengths) - lengths)[seg]

def lay_out(data, pairs, kinds, dst, pred, rows, row_len):
    """segments (kinds[s] of pair pairs[s]) written at flat offsets dst[s] of a (rows, row_len) grid of EOT; a response's
    first token is predicted from position pred[s], the others from the token before -> grid, per-token and src arrays,
    and which response tokens are past the shorter response of their pair (LD-DPO's tail)"""
    tok, seg, within = data.tokens(pairs, kinds)
    at = dst[seg] + within
    idx = np.full(rows * row_len, EOT, dtype=np.int64)
    idx[at] = tok
    resp = np.flatnonzero(kinds[seg] > 0)
    src = np.where(within[resp] == 0, pred[seg[resp]], at[resp] - 1)
    tail = within[resp] >= data.lengths[pairs, 1:].min(1)[seg[resp]]
    return idx.reshape(rows, row_len), seg, within, at, src, tok[resp], seg[resp], tail

def plain_batch(data, ids, row_len):
    """reference layout: one padded row per sequence, rows 2k (prompt+chosen) and 2k+1 (prompt+rejected)"""
    K = len(ids)
    L = data.lengths[ids]  # (K, 3)
    rows = 2 * np.arange(K)[:, None] + [0, 0, 1, 1]  # (K, 4) segments prompt, chosen | prompt, rejected
    dst = (rows * row_len + L[:, [0]] * [0, 1, 0, 1]).ravel()
    pred = (rows * row_len + L[:, [0]] - 1).ravel()
    idx, _, _, _, src, tgt, seg, tail = lay_out(data, np.repeat(ids, 4), np.tile([0, 1, 0, 2], K), dst, pred, 2 * K, row_len)
    seq_len = L[:, [0]] + L[:, 1:]  # (K, 2)
    t = torch.from_numpy
    return Batch(t(idx), None, None, None, t(src), t(tgt), t(rows.ravel()[seg]), t(L[:, 1:].T.astype(np.float32)),
                 np.asarray(ids), int(seq_len.sum()), len(tgt), int((seq_len * (seq_len + 1) // 2).sum()), 2 * K, t(tail))

def plan_packed(need, row_len):
    """first-fit decreasing: longest pair first, each into the first row with room for it.
    need (K,) tokens per pair -> row (K,) and offset (K,) of each pair (plain python: 2x numpy's speed at ~40 rows)"""
    free, row, offset, sizes = [], np.zeros(len(need), dtype=np.int64), np.zeros(len(need), dtype=np.int64), list(map(int, need))
    for k in np.argsort(-np.asarray(need), kind="stable").tolist():
        j = next((j for j, f in enumerate(free) if f >= sizes[k]), len(free))  # the first row with room, or a new one
        free += [row_len] * (j == len(free))
        row[k], offset[k] = j, row_len - free[j]
        free[j] -= sizes[k]
    return row, offset

def packed_batch(data, pair, row, offset, rows, row_len):
    """prefix sharing: each pair is [prompt | chosen | rejected] in one row. pair (K,) dataset indices, numbered in
    this order, placed at (row, offset); rows beyond the last used one are padding. a pair of P=3, C=2, R=3 at o:

        token    p0 p1 p2 c0 c1 r0 r1 r2      rejected sees the prompt, never chosen (attention_mask)
        pos       0  1  2  3  4  3  4  5      and its positions continue from the prompt's end
        predicts       c0 c1  .  r1 r2  .     and r0 is predicted from p2: src = o + [P-1, P+C, P+C+1]
    """
    K, L, base = len(pair), data.lengths[pair], row * row_len + offset  # base: (K,) flat offset of each pair
    P, C, R = L.T
    dst = (base[:, None] + np.stack([0 * P, P, P + C], 1)).ravel()  # (3K,) where each segment starts
    first = np.stack([0 * P, P, P], 1).ravel()  # (3K,) the position id of each segment's first token
    pred = np.repeat(base + P - 1, 3)
    idx, seg, within, at, src, tgt, rseg, tail = lay_out(data, np.repeat(pair, 3), np.tile([0, 1, 2], K), dst, pred, rows, row_len)
    pos, doc, branch = (np.full(rows * row_len, fill, dtype=np.int64) for fill in (0, -1, 0))
    pos[at], doc[at], branch[at] = first[seg] + within, np.repeat(np.arange(K), 3)[seg], np.tile([0, 1, 2], K)[seg]
    t = lambda a: torch.from_numpy(a.reshape(rows, row_len))
    ctx_sum = (P + C) * (P + C + 1) // 2 + R * (2 * P + R + 1) // 2
    return Batch(torch.from_numpy(idx), t(pos), t(doc), t(branch), torch.from_numpy(src), torch.from_numpy(tgt),
                 torch.from_numpy(rseg - rseg // 3 - 1), torch.from_numpy(L[:, 1:].T.astype(np.float32)), pair,
                 int(L.sum()), len(tgt), int(ctx_sum.sum()), 2 * K, torch.from_numpy(tail))

@dataclass
class Shape:
    """how a rank's pairs become micro-batches: decided once (make_shape) for train, val and the reference pass"""
    layout: str  # packed | plain
    row_len: int  # tokens per row
    rows: int  # packed: rows per micro-batch (the token budget is rows * row_len); plain: pairs per micro-batch
    fixed: bool  # every micro-batch the same tensor shapes, the one graph torch.compile and FlexAttention want
    multiple: int = 64  # row lengths are multiples of this (FlexAttention computes blocks of 128)
    n_pred: int = 0  # fixed: response tokens per micro-batch, padded up to this (and never more: a micro-batch ends)

def round_up(n, multiple):
    return int(-(-n // multiple) * multiple)

def make_shape(cfg, datasets, fixed, multiple=64):
    """rows as long as the longest pair (packed) or sequence (plain) of all splits; the first dataset (train) sizes the
    token budget: room for about batch_size pairs of its mean length, and 1.25 times their mean response tokens"""
    L = np.concatenate([d.lengths for d in datasets])
    longest = int((L.sum(1) if cfg.layout == "packed" else L[:, 0] + L[:, 1:].max(1)).max())
    if cfg.pack_len and cfg.pack_len < longest:
        raise ValueError(f"pack_len={cfg.pack_len} is shorter than the longest {'pair' if cfg.layout == 'packed' else 'sequence'} ({longest} tokens)")
    row_len, train = cfg.pack_len or round_up(longest, multiple), datasets[0].lengths
    # fixed: a tenth more room, or first fit often spills a step into one more, nearly empty micro-batch (README)
    rows = cfg.batch_size if cfg.layout == "plain" else \
        cfg.pack_rows or max(1, math.ceil((1.1 if fixed else 1) * cfg.batch_size * train.sum(1).mean() / row_len))
    pairs, most = (rows, L[:, 1:].sum(1).max()) if cfg.layout == "plain" else (rows * row_len / train.sum(1).mean(), row_len)
    n_pred = round_up(max(1.25 * pairs * train[:, 1:].sum(1).mean(), most), 64) if fixed else 0  # one row always fits
    return Shape(cfg.layout, row_len, rows, fixed, multiple, n_pred)

def groups(sizes, most, cap):
    """consecutive items (pairs or rows) in groups of at most `most` items and `cap` in size -> each item's group"""
    out, g, n, total = np.zeros(len(sizes), dtype=np.int64), 0, 0, 0
    for i, size in enumerate(sizes.tolist()):
        if n == most or total + size > cap:
            g, n, total = g + 1, 0, 0
        out[i], n, total = g, n + 1, total + size
    return out

def padded(b, shape, n_seq):
    """fixed shapes: response tokens padded to n_pred (token 0 predicted from position 0 into the spare last sum),
    plain rows to 2 * rows, so every micro-batch of a call has the same tensor shapes"""
    extra = shape.n_pred - len(b.tgt)
    grow = lambda t, fill, n: torch.cat([t, torch.full((n, *t.shape[1:]), fill, dtype=t.dtype)])
    idx = b.idx if b.pos is not None else grow(b.idx, EOT, 2 * shape.rows - len(b.idx))
    return dataclasses.replace(b, idx=idx, src=grow(b.src, 0, extra), tgt=grow(b.tgt, 0, extra),
                               seq=grow(b.seq, n_seq - 1, extra), n_seq=n_seq, tail=grow(b.tail, False, extra))

def micro_batches(data, ids, shape):
    """one rank's pairs for a step -> micro-batches. fixed: every one (rows, row_len) with n_pred response tokens; else
    rows as long as this step's longest pair, as many as the token budget allows (~45% vs ~39% MFU on the CPU bench)"""
    resp, cap = data.lengths[ids, 1:].sum(1), shape.n_pred or float("inf")  # (K,) response tokens of each pair
    if not len(ids):
        return []
    if shape.layout == "plain":
        group = groups(resp, shape.rows, cap)
        mbs = [plain_batch(data, k, shape.row_len) for k in np.split(ids, np.flatnonzero(np.diff(group)) + 1)]
    else:
        need = data.lengths[ids].sum(1)  # (K,) tokens of each pair: prompt + chosen + rejected
        rows, row_len = shape.rows, shape.row_len
        if not shape.fixed and len(need):
            row_len = min(row_len, round_up(need.max(), shape.multiple))
            rows = max(1, shape.rows * shape.row_len // row_len)
        row, offset = plan_packed(need, row_len)
        group = groups(np.bincount(row, weights=resp, minlength=row.max(initial=0) + 1), rows, cap)  # (rows,) micro-batch of each
        first = np.flatnonzero(np.r_[1, np.diff(group)])  # its first row
        order = np.lexsort((offset, row))  # pairs numbered row by row, left to right
        mbs = []
        for k in np.split(order, np.flatnonzero(np.diff(group[row[order]])) + 1):
            r = row[k] - first[group[row[k[0]]]]
            mbs.append(packed_batch(data, ids[k], r, offset[k], rows if shape.fixed else r.max() + 1, row_len))
    return [padded(b, shape, 2 * len(ids) + 1) for b in mbs] if shape.fixed else mbs


# -----------------------------------------------------------------------------
# sequence log-probs

def attention_mask(doc, branch):
    """(R, 1, T, T) bool, True = may attend: same pair, causal, and never chosen <-> rejected.
    padding (doc -1) attends causally to other padding, so no row is empty (no NaN from softmax)"""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    same_pair = doc[:, :, None] == doc[:, None, :]
    same_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])  # the prompt, or my own response
    return (causal & same_pair & same_branch)[:, None]

def flex_block_mask(doc, branch, block=128):
    """the same mask as a FlexAttention BlockMask, built from the ids by tensor ops inside the compiled forward (no
    host sync, nothing compiled per call): a (query block, key block) tile where nothing may attend is skipped, one
    where everything may runs without mask_mod"""
    from torch.nn.attention.flex_attention import BlockMask
    R, T = doc.shape  # T: a multiple of block (make_shape)
    tiles = attention_mask(doc, branch).view(R, T // block, block, T // block, block)
    some, every = tiles.any(4).any(2), tiles.all(4).all(2)  # (R, T/block, T/block)

    def kv(tile):  # per query block: how many key blocks, and which (those first)
        order = torch.argsort(tile.to(torch.int8), dim=-1, descending=True, stable=True)
        return tile.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def mask_mod(b, h, q, k):
        return (k <= q) & (doc[b, q] == doc[b, k]) & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))
    return BlockMask.from_kv_blocks(*kv(some & ~every), *kv(every), BLOCK_SIZE=block, mask_mod=mask_mod)

class SequenceLogps(nn.Module):
    """the trainable forward: a micro-batch -> the summed log-prob of every response. the mask, the transformer, the
    response positions, the chunked lm_head and the sums are one compiled graph. one module: DDP/FSDP see one forward"""

    def __init__(self, gpt, compile=False, chunk=4096, flex=False, ld_alpha=1.0, wpo=False):
        super().__init__()
        self.gpt, self.chunk, self.flex, self.ld_alpha, self.wpo = gpt, chunk, flex, ld_alpha, wpo
        self.logps = torch.compile(self._logps) if compile else self._logps

    def forward(self, idx, pos, doc, branch, src, tgt, seq, n_seq, tail):
        return self.logps(idx, pos, doc, branch, src, tgt, seq, n_seq, tail)

    def _logps(self, idx, pos, doc, branch, src, tgt, seq, n_seq, tail):
        mask = None if doc is None else flex_block_mask(doc, branch) if self.flex else attention_mask(doc, branch)
        h = self.gpt.hidden(idx, pos=pos, attn_mask=mask).flatten(0, 1)[src]  # (N, C) the positions that predict responses
        out = self.gpt.token_logprobs(h, tgt, chunk_size=self.chunk, sum_sq=self.wpo)  # (N,) float32 [, log sum_v p(v)^2]
        logp = out[0] if self.wpo else out
        terms = [logp if self.ld_alpha == 1 else logp * torch.where(tail, self.ld_alpha, 1.0)]  # LD-DPO weighs the tail
        terms += [logp.detach() - out[1]] if self.wpo else []  # and WPO's per-token term, summed alike
        return torch.zeros(len(terms), n_seq, dtype=torch.float32, device=idx.device).index_add(1, seq, torch.stack(terms))  # (1|2, n_seq)

def to_device(t, device):
    """pinned, non-blocking on CUDA: a pageable copy would make the host wait for all queued GPU work"""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

def on_device(b, device):
    return dataclasses.replace(b, **{k: to_device(v, device) for k, v in vars(b).items() if isinstance(v, torch.Tensor)})

def batch_logps(module, b):
    """summed response log-probs (K,) chosen and (K,) rejected of a micro-batch that is on the device, and WPO's (K,)
    pair weights w_chosen * w_rejected, w = exp(the response's mean of log p(y_t) - log sum_v p(v)^2); else None"""
    sums = module(b.idx, b.pos, b.doc, b.branch, b.src, b.tgt, b.seq, b.n_seq, b.tail)[:, :2 * len(b.pair_ids)]
    w = torch.exp((sums[1].view(-1, 2) / b.lengths.T.clamp(min=1)).sum(1)) if len(sums) == 2 else None
    return sums[0, 0::2], sums[0, 1::2], w


# -----------------------------------------------------------------------------
# the DPO loss family: one function, one short branch per loss type.
# inputs are SUMMED response log-probs, one number per sequence, shape (B,).
# the types that need per-token averages divide by the response token counts.

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down", "discopop", "aot", "aot_pair", "aot_unpaired", "sigmoid_norm", "simpo", "sft", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "sft", "orpo")  # these never look at a reference model
NEEDS_LENGTHS = ("ipo", "sigmoid_norm", "simpo", "sft", "orpo")
# f'(e^u) of a log-ratio u (f-DPO, Wang et al. 2023), a = f_alpha_divergence_coef; alpha: (a - 1) u clamped at 80 as
# TRL (exp stays finite in float32), a -> 1 is reverse_kl. f-DPO's beta log Z(x) cancels in F_DIVERGENCE_LOSSES only
F_DIVERGENCES = {"reverse_kl": lambda u, a: u, "forward_kl": lambda u, a: 1 - torch.exp(-u),
                 "js_divergence": lambda u, a: math.log(2) + F.logsigmoid(u),  # log(2t / (1 + t))
                 "alpha_divergence": lambda u, a: torch.expm1(((a - 1) * u).clamp(max=80.0)) / (a - 1) if abs(a - 1) >= 1e-6 else u}
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")

def _smoothed_logistic(z, label_smoothing):
    # -log sigmoid(z), with a fraction label_smoothing of the labels assumed flipped (cDPO).
    # logsigmoid stays finite and has a finite gradient for any z, unlike log(exp(z)/(1+exp(z)))
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)

def _token_counts(lengths, like, what, why):
    if lengths is None or torch.as_tensor(lengths).shape != like.shape:
        got = "none" if lengths is None else f"shape {tuple(torch.as_tensor(lengths).shape)}"
        raise ValueError(f"dpo_loss: {why} needs {what}, the response token count of each sequence (per-token "
                         f"averages), shape {tuple(like.shape)}; got {got}")
    return torch.as_tensor(lengths, dtype=like.dtype, device=like.device).clamp(min=1)  # an empty response: no 0/0

def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference_free=False,
             chosen_lengths=None, rejected_lengths=None, gamma=0.5, sft_weight=0.0,
             bco_delta=0.0, discopop_tau=0.05, loss_weights=None, f_divergence_type="reverse_kl",
             f_alpha_divergence_coef=0.5, pair_weights=None):
    """
    Pairwise preference loss. All log-prob inputs are (B,) tensors of log-probs SUMMED over the
    response tokens. Returns (losses, chosen_rewards, rejected_rewards), each (B,); the caller takes
    losses.mean(). Rewards are beta * (policy - reference) summed log-probs, detached, as in TRL's
    DPOTrainer (simpo, orpo: beta * per-token average policy log-prob, their own reward).
    loss_type: one, or a list ("sigmoid,bco_pair,sft"): the sum of their losses times loss_weights (1.0 each; MPO).
    reference_free=True, or both reference tensors None, treats reference log-probs as 0.
    label_smoothing: cDPO flip rate for sigmoid / sigmoid_norm / aot / aot_pair / simpo, the noise
        rate for robust, the target epsilon for exo_pair (0 means 1e-3 there). Must be in [0, 0.5).
    gamma: simpo's target reward margin, in reward units (beta * avg log-prob), as in the SimPO paper;
        TRL's CPOTrainer(simpo_gamma=gamma) means the same (it subtracts gamma/beta before scaling by beta).
    sft_weight: adds sft_weight * (-policy_chosen_logps / chosen_lengths) (RPO), as "sft" in the list would.
    bco_delta: bco_pair's reward shift, a running mean of the (detached) batch mean of chosen and
        rejected rewards kept by the caller, e.g. an EMA; 0 gives the unshifted loss (as current TRL).
    discopop_tau: temperature of discopop's mixing sigmoid.
    f_divergence_type, f_alpha_divergence_coef: f-DPO's f'(e^u) replaces each log-ratio u (F_DIVERGENCES).
    pair_weights: None, or (B,) factors of each pair's loss (WPO's weights).
    """
    types = loss_type.split(",") if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if sft_weight != 0.0:  # RPO, Pang et al. 2024: DPO-style loss + weighted NLL of the chosen response
        types, weights = types + ["sft"], weights + [sft_weight]
    if set(types) - set(LOSS_TYPES) or len(weights) != len(types) or f_divergence_type not in F_DIVERGENCES or (
            f_divergence_type != "reverse_kl" and set(types) - set(F_DIVERGENCE_LOSSES)):  # the f-divergence types: TRL's
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} with loss_weights {loss_weights} and f_divergence_type {f_divergence_type!r}: expected "
                         f"types of {LOSS_TYPES}, one weight each, f-divergences of {tuple(F_DIVERGENCES)}, not reverse_kl only with {F_DIVERGENCE_LOSSES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} must be in [0, 0.5) "
                         f"(it is the assumed fraction of flipped preference labels)")
    pc, pr = policy_chosen_logps, policy_rejected_logps  # (B,), (B,)
    if pc.shape != pr.shape or pc.dim() != 1:
        raise ValueError(f"dpo_loss: policy log-probs must both be (B,), got {tuple(pc.shape)} and {tuple(pr.shape)}")
    if (reference_chosen_logps is None) != (reference_rejected_logps is None):
        raise ValueError("dpo_loss: pass both reference log-prob tensors or neither (None = reference-free)")
    free = reference_free or reference_chosen_logps is None
    rc, rr = (torch.zeros_like(pc), torch.zeros_like(pr)) if free else (reference_chosen_logps, reference_rejected_logps)
    if set(types) & set(NEEDS_LENGTHS):
        lc = _token_counts(chosen_lengths, pc, "chosen_lengths", f"loss_type={','.join(types)!r}")
        lr = _token_counts(rejected_lengths, pr, "rejected_lengths", f"loss_type={','.join(types)!r}")
    chosen_logratios = pc - rc  # (B,) log pi(y_w|x)/pi_ref(y_w|x)
    rejected_logratios = pr - rr  # (B,) log pi(y_l|x)/pi_ref(y_l|x)
    sw, sl = (F_DIVERGENCES[f_divergence_type](u, f_alpha_divergence_coef) for u in (chosen_logratios, rejected_logratios))
    z = beta * (sw - sl)  # (B,) DPO reward margin
    ls, losses = label_smoothing, 0.0

    for t, weight in zip(types, weights):
        if t == "sigmoid":  # DPO, Rafailov et al. 2023; ls > 0 is conservative DPO (cDPO, Mitchell 2023)
            loss = _smoothed_logistic(z, ls)
        elif t == "ipo":  # IPO, Azar et al. 2023, eq. 17 (beta plays tau)
            # log-ratios are AVERAGED per token here, not summed: the target margin 1/(2 beta) is a
            # per-token scale, and with sums the squared loss would grow with response length (TRL does the same)
            loss = (sw / lc - sl / lr - 1 / (2 * beta)) ** 2
        elif t == "hinge":  # SLiC, Zhao et al. 2023: hinge on the margin, beta = 1/delta
            loss = torch.relu(1 - z)
        elif t == "robust":  # rDPO, Chowdhury et al. 2024: unbiased under label-flip rate ls
            loss = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
        elif t == "exo_pair":  # EXO, Ji et al. 2024, eq. 16: KL(model pair dist || [1-eps, eps])
            eps = ls if ls > 0 else 1e-3
            loss = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                    + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
        elif t == "nca_pair":  # NCA, Chen et al. 2024: absolute rewards, not just their difference
            r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
            loss = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
        elif t == "bco_pair":  # BCO, Jung et al. 2024: chosen vs rejected as binary classes, shifted by delta
            r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
            loss = -F.logsigmoid(r_w - bco_delta) - F.logsigmoid(-(r_l - bco_delta))
        elif t == "sppo_hard":  # SPPO, Wu et al. 2024, with hard win probabilities 1 and 0
            loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif t == "apo_zero":  # APO-zero, D'Oosterlinck et al. 2024, eq. 7: push chosen up, rejected down
            loss = torch.sigmoid(-beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
        elif t == "apo_down":  # APO-down, same paper, eq. 8: push chosen down, rejected down more
            loss = torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(-z)
        elif t == "discopop":  # DiscoPOP, Lu et al. 2024, eq. 5: logistic/exp blend
            # exp(-z) * sigmoid(z/tau) written as exp(logsigmoid(z/tau) - z): never inf * 0 at large |z|
            loss = -F.logsigmoid(z) * torch.sigmoid(-z / discopop_tau) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
        elif t == "aot":  # AOT, Melnyk et al. 2024: sort policy and reference log-ratio margins across the batch
            margin_sorted, _ = torch.sort(pc - pr, dim=0)
            ref_sorted, _ = torch.sort(rc - rr, dim=0)
            loss = _smoothed_logistic(beta * (margin_sorted - ref_sorted), ls)
        elif t in ("aot_pair", "aot_unpaired"):  # AOT unpaired (TRL's newer name): sort each side separately
            chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
            rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
            loss = _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), ls)
        elif t == "sigmoid_norm":  # DPO on per-token averaged log-ratios (length-normalized, as TRL)
            loss = _smoothed_logistic(beta * (sw / lc - sl / lr), ls)
        elif t == "simpo":  # SimPO, Meng et al. 2024: reference-free, per-token average, margin gamma
            loss = _smoothed_logistic(beta * (pc / lc - pr / lr) - gamma, ls)
        elif t == "sft":  # plain supervised loss: per-token NLL of the chosen response
            loss = -pc / lc
        elif t == "orpo":  # ORPO, Hong et al. 2024: chosen NLL + lambda (= beta) * odds-ratio loss, no reference
            # log odds(y) = a - log(1 - e^a), a = per-token average log-prob; expm1: exact near a = 0, clamp: finite at 0
            log_odds = lambda a: a - torch.log((-torch.expm1(a)).clamp(min=1e-30))
            loss = -pc / lc - beta * F.logsigmoid(log_odds(pc / lc) - log_odds(pr / lr))
        losses = losses + weight * loss
    losses = losses if pair_weights is None else losses * pair_weights

    own = set(types) <= set(REFERENCE_FREE_LOSSES) and set(types) & {"simpo", "orpo"}  # their own reward, per token
    chosen_rewards, rejected_rewards = (pc / lc, pr / lr) if own else (chosen_logratios, rejected_logratios)
    return losses, (beta * chosen_rewards).detach(), (beta * rejected_rewards).detach()

def loss_kwargs(cfg):
    keys = "beta loss_type label_smoothing gamma sft_weight bco_delta discopop_tau f_divergence_type f_alpha_divergence_coef"
    return {k: getattr(cfg, k) for k in keys.split()} | dict(loss_weights=cfg.loss_weights.split(",") if cfg.loss_weights else None)


# -----------------------------------------------------------------------------
# the reference

class Reference:
    """ref(batch, split) -> the reference log-probs (K,) chosen, (K,) rejected of a micro-batch's pairs: looked up in
    tables computed once (--reference=cached), computed now by a frozen copy (--reference=model), or (None, None)
    for reference-free losses"""

    def __init__(self, run, ref_model, meta, datasets):
        self.run, self.tables, self.model = run, None, None
        if set(run.cfg.loss_type.split(",")) <= set(REFERENCE_FREE_LOSSES):
            return
        if run.cfg.reference == "cached":
            self.tables = {d.split: reference_logps(ref_model.to(run.device), meta, d, run) for d in datasets}
        else:
            frozen = copy.deepcopy(ref_model).to(run.device).eval().requires_grad_(False)
            frozen.gradient_checkpointing = False
            self.model = SequenceLogps(frozen, compile=run.compile, chunk=run.cfg.logprob_chunk, flex=run.flex, ld_alpha=run.cfg.ld_alpha)

    def __call__(self, b, split):
        if self.model is not None:
            with torch.no_grad(), self.run.ctx:
                c, r, _ = batch_logps(self.model, b)
            return c.float(), r.float()
        if self.tables is None:
            return None, None
        c, r = self.tables[split]
        j = torch.from_numpy(b.pair_ids)
        return to_device(c[j], self.run.device), to_device(r[j], self.run.device)

def reference_logps(ref_model, meta, data, run):
    """(N,) chosen and (N,) rejected reference log-probs of every pair of `data`, computed once (ranks split the
    pairs) and cached beside the shards, keyed by the reference's weights and the data (their hashes in the run's meta)"""
    ld = f"_ld{run.cfg.ld_alpha}" * (run.cfg.ld_alpha != 1)  # LD-DPO's sums are other numbers
    path = os.path.join(data.data_dir, f"ref_logps_{data.split}_{meta['ref_hash']}{ld}_{meta['data_hash']}_{data.block_size}.pt")
    return checkpoint.cached(path, len(data), run, lambda: compute_reference(ref_model, data, run))

@torch.inference_mode()
def compute_reference(ref_model, data, run):
    out = torch.zeros(2, len(data), dtype=torch.float32, device=run.device)
    module = SequenceLogps(ref_model, chunk=run.cfg.logprob_chunk, flex=run.flex, ld_alpha=run.cfg.ld_alpha).eval()
    ids, step, t0, last = np.arange(run.rank, len(data), run.world), 16 * run.cfg.batch_size, time.time(), 0
    print0(f"reference log-probs {data.split}: {len(data)} pairs, computed once and cached beside the shards "
           f"(--reference=model skips this pass: a frozen copy runs every step instead)")
    for i in range(0, len(ids), step):
        for b in micro_batches(data, ids[i: i + step], run.shape):
            with run.ctx:
                c, r, _ = batch_logps(module, on_device(b, run.device))
            j = torch.from_numpy(b.pair_ids).to(run.device)
            out[0, j], out[1, j] = c.float(), r.float()
        if time.time() - last > 5:  # the first eta at once (last = 0), then every 5 s
            last, done = time.time(), min(i + step, len(ids))
            print0(f"reference log-probs {data.split}: {done}/{len(ids)} pairs, eta {(last - t0) / done * (len(ids) - done):.0f}s")
    if run.world > 1:
        dist.all_reduce(out)  # each pair was computed by exactly one rank, zeros elsewhere
    return out[0].cpu(), out[1].cpu()


# -----------------------------------------------------------------------------
# schedule, accounting, evaluation, stopping

def get_lr(it, cfg):
    """linear warmup, then cosine decay to min_lr"""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)

GPU_PEAK = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("4090", 165e12))

def peak_flops(device):
    """bf16 dense peak of a known GPU, what MFU is reported against; None elsewhere (bench.py measures a CPU's)"""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((flops for key, flops in GPU_PEAK if key in name), None)

class Metrics:
    """sums over pairs, kept on the device; the host's counts beside them; all-reduced across ranks, then averaged"""
    KEYS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")

    def __init__(self, device):
        self.t, self.host = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device), np.zeros(3)

    def add(self, losses, chosen_rewards, rejected_rewards, pc, pr, tokens=0, flops=0.0):
        cr, rr = chosen_rewards, rejected_rewards
        vals = [losses.sum(), (cr > rr).float().sum(), (cr - rr).sum(), cr.sum(), rr.sum(), pc.sum(), pr.sum()]
        self.t += torch.stack(vals).detach().double()
        self.host += (len(losses), tokens, flops)

    def result(self, world, norm=None, stop=False):
        """-> (averages, tokens, flops, stop asked on any rank, norm), read in one copy: the step's one host sync"""
        t = torch.cat([self.t, torch.tensor([*self.host, stop], dtype=torch.float64, device=self.t.device)])
        if world > 1:  # the host's counts travel in the same all_reduce
            dist.all_reduce(t)
        *sums, pairs, tokens, flops, stop, norm = torch.cat([t, (t[:1] if norm is None else norm).double().view(1)]).tolist()
        return {k: v / max(pairs, 1) for k, v in zip(self.KEYS, sums)}, tokens, flops, stop > 0, norm

def load(data, ids, ref, run, split):
    """micro-batches on the device with their reference log-probs: [(batch, weight, ref chosen, ref rejected)]. fsdp
    gathers the weights in every forward, so every rank runs as many: the extra ones repeat the last and weigh 0"""
    mbs = [on_device(b, run.device) for b in micro_batches(data, ids, run.shape)]
    n = len(mbs)
    if run.cfg.fsdp and run.world > 1:  # (this waits for the device: fsdp over several ranks only)
        n = torch.tensor(n, device=run.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return [(b, float(i < len(mbs)), *ref(b, split)) for i, b in enumerate(mbs + mbs[-1:] * (int(n) - len(mbs)))]

def micro_step(module, b, ref_c, ref_r, run):
    """one micro-batch's forward and loss -> (losses, chosen_rewards, rejected_rewards, pc, pr), each (K,)"""
    with run.ctx:
        pc, pr, wpo = batch_logps(module, b)
    return *dpo_loss(pc, pr, ref_c, ref_r, chosen_lengths=b.lengths[0], rejected_lengths=b.lengths[1],
                     pair_weights=wpo, **loss_kwargs(run.cfg)), pc, pr

@torch.no_grad()
def evaluate(module, data, ref, run, n_pairs):
    module.eval()
    m = Metrics(run.device)
    for b, w, rc, rr in load(data, np.arange(run.rank, n_pairs, run.world), ref, run, "val"):
        out = micro_step(module, b, rc, rr, run)
        if w:
            m.add(*out)
    module.train()
    return m.result(run.world)[0]

# -----------------------------------------------------------------------------
# training

def train(cfg):
    """one training run; returns the per-step metric dicts (all-reduced, the same on every rank)"""
    with contextlib.ExitStack() as stack:  # the out_dir lock goes when the run fails too, even before its loop
        return _train(cfg, stack)

def _train(cfg, stack):
    run = setup(cfg)
    stack.enter_context(checkpoint.lock(cfg.out_dir))  # makes out_dir
    list_shards(cfg.data_dir, "train")  # no data: say so now, not after loading (or downloading) the weights

    model, ref_model, ck, meta = checkpoint.start(cfg)  # the policy, its reference, and the reference's identity
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.to(run.device)

    sft = set(cfg.loss_type.split(",")) == {"sft"} and not (cfg.sft_weight or cfg.use_weighting)  # chosen only: no rejected, no reference
    block, vocab = model.config.block_size, model.config.vocab_size
    train_data = PairData(cfg.data_dir, "train", block, cfg.truncate, sft, vocab)
    if not len(train_data):
        raise ValueError(f"{cfg.data_dir}: the train split has no pairs")
    val_data = PairData(cfg.data_dir, "val", block, cfg.truncate, sft, vocab) if list_shards(cfg.data_dir, "val", False) else None
    datasets = [d for d in (train_data, val_data) if d]
    run.shape = make_shape(cfg, datasets, fixed=run.compile or run.flex, multiple=128 if run.flex else 64)
    ref = Reference(run, ref_model, meta, datasets)
    del ref_model  # cached: only its tables stay
    meta = {**meta, "ref_model": ref.model.gpt.state_dict()} if cfg.sync_ref_model else meta  # TR-DPO: saved (live views)
    model.train()

    module = SequenceLogps(model, compile=run.compile, chunk=cfg.logprob_chunk, flex=run.flex, ld_alpha=cfg.ld_alpha, wpo=cfg.use_weighting)
    if cfg.fsdp:  # one shard group per block and one for the rest (embeddings, ln_f): weights gathered block by block
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16 weights in forward and backward; gradients reduced in float32 (summing many ranks in bf16 loses bits)
        bf16 = run.dtype == "bfloat16"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None)
        for block_ in model.transformer.h:
            fully_shard(block_, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
    elif dist.is_initialized():  # no buffer broadcast: with packing, ranks may run different numbers of forwards
        module = DDP(module, device_ids=[run.device.index] if run.device.type == "cuda" else None, broadcast_buffers=False)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matmul weights and embeddings decay, biases and norms don't
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)  # cpu too: 5x faster here
    start = checkpoint.restore(ck, model, optimizer, run.device) if ck else 0  # a resume restores the rngs too
    if not ck:
        torch.manual_seed(cfg.seed + run.rank)  # dropout differs per rank
    log = checkpoint.metrics_log(cfg, stack, ck)  # a resume keeps the records before its checkpoint

    peak, s = peak_flops(run.device), run.shape
    rows = f"{'fixed' if s.fixed else 'per step'} {s.rows} x {s.row_len}" if cfg.layout == "packed" else f"rows of {s.row_len}"
    print0(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_data)} train pairs, "
           f"{len(val_data) if val_data else 0} val pairs, {run.world} rank(s) on {run.device}{' fsdp' if cfg.fsdp else ''}, "
           f"{run.dtype}, layout {cfg.layout} ({rows} tokens), compile {run.compile}, reference {meta['ref_from']}")
    ckpt, history, step_time, stop = os.path.join(cfg.out_dir, "ckpt.pt"), [], 0.0, checkpoint.Stop()
    stack.callback(stop.restore)
    step_batches = lambda it: load(train_data, step_pairs(len(train_data), cfg.seed, it, cfg.global_batch_size, run.rank,
                                                          run.world), ref, run, "train")  # this rank's, on the device
    nxt = None  # the next step's micro-batches, when built ahead (--prefetch)
    for it in range(start, cfg.max_iters + 1):
        # ---- evaluation, then checkpoint (those at `start` were done before its checkpoint was saved)
        if it > start or not ck or ck.get("stopped"):
            if val_data and cfg.eval_interval and (it % cfg.eval_interval == 0 or it == cfg.max_iters):
                ev = evaluate(module, val_data, ref, run, min(cfg.eval_pairs or len(val_data), len(val_data)))
                print0(f"eval {it}: " + ", ".join(f"{k} {ev[k]:.4f}" for k in (("loss", "chosen_logp") if sft else ev)))
                log({"iter": it, **{f"val/{k}": v for k, v in ev.items()}})
            if cfg.save_checkpoint and ((cfg.eval_interval and it % cfg.eval_interval == 0 and it > 0) or it == cfg.max_iters):
                checkpoint.save(cfg, model, optimizer, it, meta)
        if it == cfg.max_iters:
            break

        # ---- TRAINING SECTION: one optimizer step over this rank's slice of the global batch
        t0 = time.time()
        lr = get_lr(it, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        mbs, nxt = nxt or step_batches(it), None
        m = Metrics(run.device)
        for i, (b, w, ref_c, ref_r) in enumerate(mbs):
            last = i == len(mbs) - 1  # gradients are reduced across ranks in the last backward only
            if isinstance(module, DDP):
                module.require_backward_grad_sync = last
            elif cfg.fsdp:
                module.set_requires_gradient_sync(last)
            losses, cr, rr, pc, pr = micro_step(module, b, ref_c, ref_r, run)
            # each pair weighs 1/global_batch; ddp and fsdp average over ranks, hence the factor world
            (losses.sum() * w * run.world / cfg.global_batch_size).backward()
            if w:
                m.add(losses, cr, rr, pc, pr, b.n_tokens, model.flops(b.n_tokens, b.n_resp, b.ctx_sum))
        sync = cfg.sync_ref_model and (it + 1) % cfg.ref_model_sync_steps == 0  # TR-DPO after steps tau, 2 tau, .. as TRL
        if cfg.prefetch and it + 1 < cfg.max_iters and not sync:  # (a sync changes the next step's reference log-probs)
            nxt = step_batches(it + 1)  # packed, and copied to the GPU, while it still runs this step
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # fsdp: a DTensor
        stats, tokens, flops, asked, norm = m.result(run.world, norm, stop.asked)  # the one wait for the device
        if not math.isfinite(stats["loss"]) or not math.isfinite(norm):
            what = f"loss is {stats['loss']}" if not math.isfinite(stats["loss"]) else f"gradient norm is {norm}"
            raise FloatingPointError(f"step {it}: the {what}; stopping. the last good checkpoint is "
                                     f"{ckpt if os.path.exists(ckpt) else 'none saved yet'}. try a lower learning_rate or beta")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # TR-DPO: reference = alpha * policy + (1 - alpha) * reference
            for r, p in zip(ref.model.gpt.parameters(), model.parameters()) if sync else ():
                r.mul_(1 - cfg.ref_model_mixup_alpha).add_(p.full_tensor() if cfg.fsdp else p, alpha=cfg.ref_model_mixup_alpha)

        # ---- everything that follows is diagnostics, logging and the stop signal
        dt = time.time() - t0  # to the step's sync: its optimizer update runs while the next step is launched
        step_time += dt
        rec = {"iter": it, "lr": lr, **stats, "grad_norm": norm, "ms": 1000 * dt,
               "pairs_per_s": cfg.global_batch_size / dt, "tokens_per_s": tokens / dt,
               "flops_per_s": flops / dt, "mfu": flops / dt / (peak * run.world) if peak else None}
        if run.device.type == "cuda":
            rec["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        history.append(rec)
        log(rec)
        if it % cfg.log_interval == 0:
            eta = step_time / (it - start + 1) * (cfg.max_iters - it - 1)  # training steps only (not evals)
            pref = "" if sft else f", acc {stats['accuracy']:.2f}, margin {stats['margin']:.3f}"
            mfu = f", mfu {100 * rec['mfu']:.1f}%" if peak else ""
            print0(f"iter {it}: loss {stats['loss']:.4f}{pref}, lr {lr:.2e}, {1000 * dt:.0f}ms, "
                   f"{rec['pairs_per_s']:.1f} pairs/s{mfu}, eta {eta:.0f}s")
        if asked:  # every rank stops after the same step
            checkpoint.save(cfg, model, optimizer, it + 1, meta | {"stopped": True})  # before step it + 1's eval
            print0(f"stopped after step {it}: saved {ckpt}; continue with: python dpo.py --init_from=resume --out_dir={cfg.out_dir}")
            raise checkpoint.Interrupted()
    checkpoint.finish(cfg, model, max(start, cfg.max_iters))
    return history

def main(argv):
    try:
        train(parse_config(argv))
    except (ValueError, OSError, PrepareError, FloatingPointError) as e:  # bad input, missing files, no network, diverged
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (checkpoint.Interrupted, KeyboardInterrupt):
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1:])
