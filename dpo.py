"""
Direct Preference Optimization (DPO) for GPT-2, in one file: config -> data -> packed micro-batches -> response
log-probs -> dpo_loss -> training loop.

The offline toy run (CPU, a few minutes; `python sample.py --mode=demo` runs all four):
    python prepare.py                                  # writes data/toy/
    python dpo.py --config=config/toy_sft.py           # SFT  -> out/toy_sft
    python dpo.py --config=config/toy_dpo.py           # DPO  -> out/toy_dpo (reference = the SFT model)
    python sample.py --mode=compare --config=config/toy_dpo.py --init_from=out/toy_dpo
Real data and real GPT-2 weights:
    python prepare.py --dataset=hh --out_dir=data/hh
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
import warnings
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
from prepare import EOT, PrepareError, list_shards, load_pairs, truncate

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
    block_size: int = 256  # positions; every pair must fit (see truncate)
    dropout: float = 0.0
    bias: bool = True
    # loss
    loss_type: str = "sigmoid"  # see dpo_loss; "sft" trains on the chosen responses only (no reference)
    beta: float = 0.1  # strength of the KL leash to the reference
    label_smoothing: float = 0.0  # conservative DPO: assumed probability that a label is flipped
    gamma: float = 0.5  # simpo's target margin
    sft_weight: float = 0.0  # adds this times the chosen NLL per token to any loss (RPO)
    bco_delta: float = 0.0  # bco_pair's reward shift
    discopop_tau: float = 0.05  # discopop's mixing temperature
    reference: str = "cached"  # cached: reference log-probs computed once, then the model is freed | model: a frozen copy run every step
    # batching
    global_batch_size: int = 32  # pairs per optimizer step, summed over ranks and micro-steps
    batch_size: int = 8  # pairs per micro-step (plain layout) or the packing target (packed layout)
    layout: str = "packed"  # packed: prompt once, chosen and rejected after it, several pairs per row | plain: padded rows
    pack_len: int = 0  # row length in tokens; 0 = the longest pair (packed) or sequence (plain) in the data
    pack_rows: int = 0  # rows per packed micro-batch; 0 = room for about batch_size pairs of mean train length
    truncate: bool = False  # pairs longer than block_size: False refuses with an error, True cuts them (prompt start first)
    logprob_chunk: int = 4096  # tokens per lm_head chunk, so full (tokens, vocab) logits never exist at once
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
                   compile=("auto", "true", "false"), loss_type=LOSS_TYPES)
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"--{key}={getattr(cfg, key)}: expected one of {' | '.join(allowed)}")
    for key in ("global_batch_size", "batch_size", "log_interval", "n_layer", "n_head", "n_embd", "block_size",
                "logprob_chunk", "beta", "max_iters", "eval_interval", "eval_pairs", "warmup_iters", "lr_decay_iters",
                "pack_len", "pack_rows", "learning_rate", "min_lr", "grad_clip", "weight_decay", "dropout"):
        positive = key in ("global_batch_size", "batch_size", "log_interval", "n_layer", "n_head", "n_embd",
                           "block_size", "logprob_chunk", "beta")
        if getattr(cfg, key) < 0 or (positive and getattr(cfg, key) == 0):
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be {'> 0' if positive else '>= 0'}")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_head={cfg.n_head} must divide --n_embd={cfg.n_embd}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing={cfg.label_smoothing}: must be in [0, 0.5)")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise ValueError(f"--device={cfg.device}: expected auto, cpu, cuda, cuda:N or mps")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={cfg.device}, but this torch sees no CUDA GPU (try --device=cpu)")

def parse_config(argv, cls=Config):
    cfg = configurator.parse(argv, cls)
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
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.lengths = np.concatenate([s.lengths for s in self.shards]).astype(np.int64)  # (N, 3)
        seq_len = self.lengths[:, 0] + self.lengths[:, 1:].max(1)  # (N,) the longer sequence of each pair
        self.n_cut = int((seq_len > block_size).sum())
        if self.n_cut and not truncate:
            raise ValueError(
                f"{data_dir} ({split}): {self.n_cut} pairs are longer than block_size={block_size} "
                f"(longest prompt+response: {seq_len.max()} tokens). Set --truncate=true to cut them, raise --block_size "
                f"(GPT-2 has 1024 positions), or re-run prepare.py with --max_length={block_size}")
        if self.n_cut:
            self.lengths = np.array([[len(x) for x in self[i]] for i in range(len(self))], dtype=np.int64)
        if chosen_only:
            self.lengths[:, 2] = 0

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i):
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        p, c, r = self.shards[s][i - int(self.starts[s])]
        if self.n_cut:  # prepare.py's rule: the prompt keeps its last block_size // 2 tokens, then responses lose their end
            p, c, r = truncate(p, c, r, self.block_size, self.block_size // 2)[:3]
        return p.astype(np.int64), c.astype(np.int64), r[: 0 if self.chosen_only else len(r)].astype(np.int64)

    def fingerprint(self):
        """identifies the data for the reference cache: every token and length, and the block size"""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.tokens)  # the memmap, read once (about 1 s per 200M tokens)
        h.update(self.lengths.tobytes() + str(self.block_size).encode())
        return h.hexdigest()[:16]

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
    pair_ids: np.ndarray  # (K,) dataset indices of the pairs in this micro-batch
    n_tokens: int  # real (non-padding) tokens the model runs on
    ctx_sum: int  # sum over real tokens of how many keys each attends to (for the attention FLOPs)

def plain_batch(data, ids, row_len):
    """reference layout: one padded row per sequence, rows 2k (prompt+chosen) and 2k+1 (prompt+rejected)"""
    idx = np.full((2 * len(ids), row_len), EOT, dtype=np.int64)
    src, tgt, seq = [], [], []
    n_tokens = ctx_sum = 0
    for k, i in enumerate(ids):
        p, c, r = data[i]
        for row, resp in ((2 * k, c), (2 * k + 1, r)):
            s = np.concatenate([p, resp])
            idx[row, : len(s)] = s
            src.append(row * row_len + len(p) - 1 + np.arange(len(resp)))  # token t of the response <- position P+t-1
            tgt.append(resp)
            seq.append(np.full(len(resp), row))
            n_tokens += len(s)
            ctx_sum += len(s) * (len(s) + 1) // 2
    t = lambda parts: torch.from_numpy(np.concatenate(parts))
    return Batch(torch.from_numpy(idx), None, None, None, t(src), t(tgt), t(seq), np.asarray(ids), n_tokens, ctx_sum)

def plan_packed(need, row_len):
    """first-fit decreasing: longest pair first, each into the first row with room for it.
    `need` (K,) tokens per pair; returns the rows, each a list of (k, offset) with k the pair's index in `need`"""
    rows, used = [], []
    for k in np.argsort(-np.asarray(need), kind="stable"):
        j = next((j for j, u in enumerate(used) if u + need[k] <= row_len), len(rows))
        if j == len(rows):
            rows.append([])
            used.append(0)
        rows[j].append((int(k), used[j]))
        used[j] += int(need[k])
    return rows

def packed_batch(data, ids, plan, rows, row_len):
    """prefix sharing: each pair is [prompt | chosen | rejected] in one row. plan: rows of (j, offset), j an index
    into ids; `rows` >= len(plan), the rest is padding. one pair of P=3, C=2, R=3 tokens at offset o:

        token    p0 p1 p2 c0 c1 r0 r1 r2      rejected sees the prompt, never chosen (attention_mask)
        pos       0  1  2  3  4  3  4  5      and its positions continue from the prompt's end
        predicts       c0 c1  .  r1 r2  .     and r0 is predicted from p2: src = o + [P-1, P+C, P+C+1]
    """
    idx = np.full((rows, row_len), EOT, dtype=np.int64)
    pos, branch, doc = np.zeros((rows, row_len), dtype=np.int64), np.zeros((rows, row_len), dtype=np.int64), idx * 0 - 1
    src, tgt, seq, pair_ids = [], [], [], []
    n_tokens = ctx_sum = 0
    placed = [(j, row, o) for row, items in enumerate(plan) for j, o in items]
    for k, (j, row, o) in enumerate(placed):
        p, c, r = data[ids[j]]
        P, C, R = len(p), len(c), len(r)
        idx[row, o: o + P + C + R] = np.concatenate([p, c, r])
        pos[row, o: o + P + C + R] = np.concatenate([np.arange(P + C), np.arange(P, P + R)])
        doc[row, o: o + P + C + R] = k
        branch[row, o + P: o + P + C], branch[row, o + P + C: o + P + C + R] = 1, 2
        base = row * row_len + o
        src += [base + P - 1 + np.arange(C), base + np.r_[P - 1, P + C + np.arange(R - 1)][:R]]
        tgt += [c, r]
        seq += [np.full(C, 2 * k), np.full(R, 2 * k + 1)]
        pair_ids.append(ids[j])
        n_tokens += P + C + R
        ctx_sum += (P + C) * (P + C + 1) // 2 + R * (2 * P + R + 1) // 2
    t = lambda a: torch.from_numpy(np.concatenate(a) if isinstance(a, list) else a)
    return Batch(t(idx), t(pos), t(doc), t(branch), t(src), t(tgt), t(seq), np.asarray(pair_ids), n_tokens, ctx_sum)

@dataclass
class Shape:
    """how a rank's pairs become micro-batches: decided once (make_shape) for train, val and the reference pass"""
    layout: str  # packed | plain
    row_len: int  # tokens per row
    rows: int  # packed: rows per micro-batch (the token budget is rows * row_len); plain: pairs per micro-batch
    fixed: bool  # packed: every micro-batch exactly (rows, row_len), the one shape torch.compile and FlexAttention want
    multiple: int = 64  # row lengths are multiples of this (FlexAttention computes blocks of 128)

def round_up(n, multiple):
    return int(-(-n // multiple) * multiple)

def make_shape(cfg, datasets, fixed, multiple=64):
    """rows as long as the longest pair (packed) or sequence (plain) of all splits; the first dataset (train) sizes
    the token budget: room for about batch_size pairs of its mean length"""
    L = np.concatenate([d.lengths for d in datasets])
    longest = int((L.sum(1) if cfg.layout == "packed" else L[:, 0] + L[:, 1:].max(1)).max())
    if cfg.pack_len and cfg.pack_len < longest:
        raise ValueError(f"pack_len={cfg.pack_len} is shorter than the longest {'pair' if cfg.layout == 'packed' else 'sequence'} ({longest} tokens)")
    row_len = cfg.pack_len or round_up(longest, multiple)
    rows = cfg.batch_size if cfg.layout == "plain" else \
        cfg.pack_rows or max(1, math.ceil(cfg.batch_size * datasets[0].lengths.sum(1).mean() / row_len))
    return Shape(cfg.layout, row_len, rows, fixed, multiple)

def micro_batches(data, ids, shape):
    """one rank's pairs for a step -> micro-batches. packed, fixed shape: every micro-batch (rows, row_len); else
    rows only as long as this step's longest pair and as many as the same token budget allows (less padding, less
    masked-out attention: ~45% vs ~39% MFU on the CPU bench)"""
    if shape.layout == "plain":
        return [plain_batch(data, ids[i: i + shape.rows], shape.row_len) for i in range(0, len(ids), shape.rows)]
    need = data.lengths[ids].sum(1)  # (K,) tokens of each pair: prompt + chosen + rejected
    rows, row_len = shape.rows, shape.row_len
    if not shape.fixed and len(need):
        row_len = min(row_len, round_up(need.max(), shape.multiple))
        rows = max(1, shape.rows * shape.row_len // row_len)
    plan = plan_packed(need, row_len)
    groups = [plan[i: i + rows] for i in range(0, len(plan), rows)]
    return [packed_batch(data, ids, g, rows if shape.fixed else len(g), row_len) for g in groups]


# -----------------------------------------------------------------------------
# sequence log-probs

def attention_mask(b, device):
    """(R, 1, T, T) bool, True = may attend: same pair, causal, and never chosen <-> rejected.
    padding (doc -1) attends causally to other padding, so no row is empty (no NaN from softmax)"""
    doc, br = b.doc.to(device), b.branch.to(device)
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    same_pair = doc[:, :, None] == doc[:, None, :]
    same_branch = (br[:, None, :] == 0) | (br[:, :, None] == br[:, None, :])  # the prompt, or my own response
    return (causal & same_pair & same_branch)[:, None]

def flex_block_mask(b, device):
    """the same mask as a FlexAttention BlockMask (CUDA): only the blocks that hold allowed pairs are computed"""
    from torch.nn.attention.flex_attention import create_block_mask
    doc, br = b.doc.to(device), b.branch.to(device)

    def mask_mod(bi, h, q, k):
        return (k <= q) & (doc[bi, q] == doc[bi, k]) & ((br[bi, k] == 0) | (br[bi, k] == br[bi, q]))

    with warnings.catch_warnings():  # _compile: 8 ms a step instead of 30 eager (H100, 124M bench); torch may deprecate it
        warnings.simplefilter("ignore", DeprecationWarning)
        return create_block_mask(mask_mod, doc.shape[0], None, doc.shape[1], doc.shape[1], device=device,
                                 _compile=device.type == "cuda")

class SequenceLogps(nn.Module):
    """the trainable forward: tokens -> summed log-prob of each response. one module, so DDP/FSDP see one forward"""

    def __init__(self, gpt, compile=False, chunk=4096):
        super().__init__()
        self.gpt, self.chunk = gpt, chunk
        self.hidden = torch.compile(gpt.hidden) if compile else gpt.hidden

    def forward(self, idx, pos, mask, src, tgt, seq, n_seq):
        h = self.hidden(idx, pos=pos, attn_mask=mask)  # (R, T, C)
        h = h.flatten(0, 1)[src]  # (N, C) only the positions that predict response tokens
        logp = self.gpt.token_logprobs(h, tgt, chunk_size=self.chunk)  # (N,) float32
        sums = torch.zeros(n_seq, dtype=torch.float32, device=idx.device).index_add(0, seq, logp)
        return sums[0::2].clone(), sums[1::2].clone()  # (K,) chosen, rejected; not views (fsdp's hooks want new tensors)

def to_device(t, device):
    """pinned, non-blocking on CUDA: a pageable copy would make the host wait for all queued GPU work"""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

def batch_logps(module, b, device, flex=False):
    """summed response log-probs (K,) chosen and rejected, and the response lengths, of one micro-batch"""
    b = dataclasses.replace(b, **{k: to_device(getattr(b, k), device) for k in ("idx", "pos", "doc", "branch", "src", "tgt", "seq")
                                  if getattr(b, k) is not None})
    mask = None if b.doc is None else flex_block_mask(b, device) if flex else attention_mask(b, device)
    chosen, rejected = module(b.idx, b.pos, mask, b.src, b.tgt, b.seq, 2 * len(b.pair_ids))
    n = torch.bincount(b.seq, minlength=2 * len(b.pair_ids)).float()
    return chosen, rejected, n[0::2], n[1::2]


# -----------------------------------------------------------------------------
# the DPO loss family: one function, one short branch per loss type.
# inputs are SUMMED response log-probs, one number per sequence, shape (B,).
# the types that need per-token averages divide by the response token counts.

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "apo_zero", "apo_down", "discopop", "aot", "aot_pair", "aot_unpaired", "sigmoid_norm", "simpo", "sft")
REFERENCE_FREE_LOSSES = ("simpo", "sft")  # these never look at a reference model
NEEDS_LENGTHS = ("ipo", "sigmoid_norm", "simpo", "sft")

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
             bco_delta=0.0, discopop_tau=0.05):
    """
    Pairwise preference loss. All log-prob inputs are (B,) tensors of log-probs SUMMED over the
    response tokens. Returns (losses, chosen_rewards, rejected_rewards), each (B,); the caller takes
    losses.mean(). Rewards are beta * (policy - reference) summed log-probs, detached, as in TRL's
    DPOTrainer (for simpo: beta * per-token average policy log-prob, SimPO's own reward).
    reference_free=True, or both reference tensors None, treats reference log-probs as 0.
    label_smoothing: cDPO flip rate for sigmoid / sigmoid_norm / aot / aot_pair / simpo, the noise
        rate for robust, the target epsilon for exo_pair (0 means 1e-3 there). Must be in [0, 0.5).
    gamma: simpo's target reward margin, in reward units (beta * avg log-prob), as in the SimPO paper;
        TRL's CPOTrainer(simpo_gamma=gamma) means the same (it subtracts gamma/beta before scaling by beta).
    sft_weight: adds sft_weight * (-policy_chosen_logps / chosen_lengths) to every loss (RPO).
    bco_delta: bco_pair's reward shift, a running mean of the (detached) batch mean of chosen and
        rejected rewards kept by the caller, e.g. an EMA; 0 gives the unshifted loss (as current TRL).
    discopop_tau: temperature of discopop's mixing sigmoid.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
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
    if loss_type in NEEDS_LENGTHS:
        lc = _token_counts(chosen_lengths, pc, "chosen_lengths", f"loss_type={loss_type!r}")
        lr = _token_counts(rejected_lengths, pr, "rejected_lengths", f"loss_type={loss_type!r}")
    chosen_logratios = pc - rc  # (B,) log pi(y_w|x)/pi_ref(y_w|x)
    rejected_logratios = pr - rr  # (B,) log pi(y_l|x)/pi_ref(y_l|x)
    z = beta * (chosen_logratios - rejected_logratios)  # (B,) DPO reward margin
    ls = label_smoothing

    if loss_type == "sigmoid":  # DPO, Rafailov et al. 2023; ls > 0 is conservative DPO (cDPO, Mitchell 2023)
        losses = _smoothed_logistic(z, ls)
    elif loss_type == "ipo":  # IPO, Azar et al. 2023, eq. 17 (beta plays tau)
        # log-ratios are AVERAGED per token here, not summed: the target margin 1/(2 beta) is a
        # per-token scale, and with sums the squared loss would grow with response length (TRL does the same)
        margin = chosen_logratios / lc - rejected_logratios / lr
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":  # SLiC, Zhao et al. 2023: hinge on the margin, beta = 1/delta
        losses = torch.relu(1 - z)
    elif loss_type == "robust":  # rDPO, Chowdhury et al. 2024: unbiased under label-flip rate ls
        losses = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    elif loss_type == "exo_pair":  # EXO, Ji et al. 2024, eq. 16: KL(model pair dist || [1-eps, eps])
        eps = ls if ls > 0 else 1e-3
        losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                  + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    elif loss_type == "nca_pair":  # NCA, Chen et al. 2024: absolute rewards, not just their difference
        r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    elif loss_type == "bco_pair":  # BCO, Jung et al. 2024: chosen vs rejected as binary classes, shifted by delta
        r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(r_w - bco_delta) - F.logsigmoid(-(r_l - bco_delta))
    elif loss_type == "sppo_hard":  # SPPO, Wu et al. 2024, with hard win probabilities 1 and 0
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":  # APO-zero, D'Oosterlinck et al. 2024, eq. 7: push chosen up, rejected down
        losses = torch.sigmoid(-beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":  # APO-down, same paper, eq. 8: push chosen down, rejected down more
        losses = torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(-z)
    elif loss_type == "discopop":  # DiscoPOP, Lu et al. 2024, eq. 5: logistic/exp blend
        # exp(-z) * sigmoid(z/tau) written as exp(logsigmoid(z/tau) - z): never inf * 0 at large |z|
        losses = -F.logsigmoid(z) * torch.sigmoid(-z / discopop_tau) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
    elif loss_type == "aot":  # AOT, Melnyk et al. 2024: sort policy and reference log-ratio margins across the batch
        margin_sorted, _ = torch.sort(pc - pr, dim=0)
        ref_sorted, _ = torch.sort(rc - rr, dim=0)
        losses = _smoothed_logistic(beta * (margin_sorted - ref_sorted), ls)
    elif loss_type in ("aot_pair", "aot_unpaired"):  # AOT unpaired (TRL's newer name): sort each side separately
        chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
        rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
        losses = _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), ls)
    elif loss_type == "sigmoid_norm":  # DPO on per-token averaged log-ratios (length-normalized, as TRL)
        losses = _smoothed_logistic(beta * (chosen_logratios / lc - rejected_logratios / lr), ls)
    elif loss_type == "simpo":  # SimPO, Meng et al. 2024: reference-free, per-token average, margin gamma
        losses = _smoothed_logistic(beta * (pc / lc - pr / lr) - gamma, ls)
    elif loss_type == "sft":  # plain supervised loss: per-token NLL of the chosen response
        losses = -pc / lc

    if sft_weight != 0.0:  # RPO, Pang et al. 2024: DPO-style loss + weighted NLL of the chosen response
        lc_sft = _token_counts(chosen_lengths, pc, "chosen_lengths", f"sft_weight={sft_weight}")
        losses = losses + sft_weight * (-pc / lc_sft)

    if loss_type == "simpo":
        chosen_rewards = (beta * pc / lc).detach()
        rejected_rewards = (beta * pr / lr).detach()
    else:
        chosen_rewards = (beta * chosen_logratios).detach()
        rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards

def loss_kwargs(cfg):
    return dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, gamma=cfg.gamma,
                sft_weight=cfg.sft_weight, bco_delta=cfg.bco_delta, discopop_tau=cfg.discopop_tau)


# -----------------------------------------------------------------------------
# the reference

class Reference:
    """ref(batch, split) -> the reference log-probs (K,) chosen, (K,) rejected of a micro-batch's pairs: looked up in
    tables computed once (--reference=cached), computed now by a frozen copy (--reference=model), or (None, None)
    for reference-free losses"""

    def __init__(self, run, ref_model, ref_hash, datasets):
        self.run, self.tables, self.model = run, None, None
        if run.cfg.loss_type in REFERENCE_FREE_LOSSES:
            return
        if run.cfg.reference == "cached":
            self.tables = {d.split: reference_logps(ref_model.to(run.device), ref_hash, d, run) for d in datasets}
        else:
            frozen = copy.deepcopy(ref_model).to(run.device).eval().requires_grad_(False)
            frozen.gradient_checkpointing = False
            self.model = SequenceLogps(frozen, compile=run.compile, chunk=run.cfg.logprob_chunk)

    def __call__(self, b, split):
        if self.model is not None:
            with torch.no_grad(), self.run.ctx:
                c, r, _, _ = batch_logps(self.model, b, self.run.device, self.run.flex)
            return c.float(), r.float()
        if self.tables is None:
            return None, None
        c, r = self.tables[split]
        j = torch.from_numpy(b.pair_ids)
        return to_device(c[j], self.run.device), to_device(r[j], self.run.device)

def reference_logps(ref_model, ref_hash, data, run):
    """(N,) chosen and (N,) rejected reference log-probs of every pair of `data`, computed once (ranks split the
    pairs) and cached beside the shards, keyed by the reference's weights and the data"""
    path = os.path.join(data.data_dir, f"ref_logps_{data.split}_{ref_hash}_{data.fingerprint()}.pt")
    return checkpoint.cached(path, len(data), run, lambda: compute_reference(ref_model, data, run))

@torch.inference_mode()
def compute_reference(ref_model, data, run):
    out = torch.zeros(2, len(data), dtype=torch.float32, device=run.device)
    module = SequenceLogps(ref_model, chunk=run.cfg.logprob_chunk).eval()
    ids, step, t0, last = np.arange(run.rank, len(data), run.world), 16 * run.cfg.batch_size, time.time(), 0
    print0(f"reference log-probs {data.split}: {len(data)} pairs, computed once and cached beside the shards "
           f"(--reference=model skips this pass: a frozen copy runs every step instead)")
    for i in range(0, len(ids), step):
        for b in micro_batches(data, ids[i: i + step], run.shape):
            with run.ctx:
                c, r, _, _ = batch_logps(module, b, run.device, run.flex)
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
    """sums over pairs, all-reduced across ranks, then averaged"""
    KEYS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")

    def __init__(self, device):
        self.t = torch.zeros(len(self.KEYS) + 1, dtype=torch.float64, device=device)

    def add(self, losses, chosen_rewards, rejected_rewards, pc, pr):
        cr, rr = chosen_rewards, rejected_rewards
        vals = [losses.sum(), (cr > rr).float().sum(), (cr - rr).sum(), cr.sum(), rr.sum(), pc.sum(), pr.sum()]
        self.t[:-1] += torch.stack(vals).detach().double()
        self.t[-1] += len(losses)

    def result(self, world):
        if world > 1:
            dist.all_reduce(self.t)
        return {k: v / max(self.t[-1].item(), 1) for k, v in zip(self.KEYS, self.t[:-1].tolist())}

def same_count(mbs, run):
    """fsdp gathers the weights in every forward, so every rank must run as many micro-batches; the extra ones
    repeat the last and weigh 0. -> (batch, weight) pairs"""
    n = torch.tensor(len(mbs), device=run.device)
    if run.cfg.fsdp and run.world > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return [(b, 1.0) for b in mbs] + [(mbs[-1], 0.0)] * (int(n) - len(mbs))

@torch.no_grad()
def evaluate(module, data, ref, run, n_pairs):
    module.eval()
    m = Metrics(run.device)
    for b, w in same_count(micro_batches(data, np.arange(run.rank, n_pairs, run.world), run.shape), run):
        with run.ctx:
            pc, pr, nc, nr = batch_logps(module, b, run.device, run.flex)
        losses, cr, rr = dpo_loss(pc, pr, *ref(b, "val"), chosen_lengths=nc, rejected_lengths=nr, **loss_kwargs(run.cfg))
        if w:
            m.add(losses, cr, rr, pc, pr)
    module.train()
    return m.result(run.world)

# -----------------------------------------------------------------------------
# training

def train(cfg):
    """one training run; returns the per-step metric dicts (all-reduced, the same on every rank)"""
    with contextlib.ExitStack() as stack:  # the out_dir lock goes when the run fails too, even before its loop
        return _train(cfg, stack)

def _train(cfg, stack):
    run = setup(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    stack.enter_context(checkpoint.lock(cfg.out_dir))
    list_shards(cfg.data_dir, "train")  # no data: say so now, not after loading (or downloading) the weights

    model, ref_model, ck, meta = checkpoint.start(cfg)  # the policy, its reference, and the reference's identity
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.to(run.device)

    sft = cfg.loss_type == "sft" and cfg.sft_weight == 0  # chosen only: no rejected responses, no reference
    block, vocab = model.config.block_size, model.config.vocab_size
    train_data = PairData(cfg.data_dir, "train", block, cfg.truncate, sft, vocab)
    if not len(train_data):
        raise ValueError(f"{cfg.data_dir}: the train split has no pairs")
    has_val = list_shards(cfg.data_dir, "val", required=False)
    val_data = PairData(cfg.data_dir, "val", block, cfg.truncate, sft, vocab) if has_val else None
    datasets = [d for d in (train_data, val_data) if d]
    run.shape = make_shape(cfg, datasets, fixed=run.compile or run.flex, multiple=128 if run.flex else 64)
    ref = Reference(run, ref_model, meta["ref_hash"], datasets)
    del ref_model  # cached: only its tables stay
    model.train()

    module = SequenceLogps(model, compile=run.compile, chunk=cfg.logprob_chunk)
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
    log = checkpoint.metrics_log(cfg, stack, append=ck is not None)

    peak, s = peak_flops(run.device), run.shape
    rows = f"{'fixed' if s.fixed else 'per step'} {s.rows} x {s.row_len}" if cfg.layout == "packed" else f"rows of {s.row_len}"
    print0(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_data)} train pairs, "
           f"{len(val_data) if val_data else 0} val pairs, {run.world} rank(s) on {run.device}{' fsdp' if cfg.fsdp else ''}, "
           f"{run.dtype}, layout {cfg.layout} ({rows} tokens), compile {run.compile}, reference {meta['ref_from']}")
    ckpt, history, step_time, stop = os.path.join(cfg.out_dir, "ckpt.pt"), [], 0.0, checkpoint.Stop()
    stack.callback(stop.restore)
    for it in range(start, cfg.max_iters + 1):
        # ---- evaluation, then checkpoint (those at `start` were done before its checkpoint was saved)
        if it > start or not ck:
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
        ids = step_pairs(len(train_data), cfg.seed, it, cfg.global_batch_size, run.rank, run.world)
        mbs = same_count(micro_batches(train_data, ids, run.shape), run)
        m, work = Metrics(run.device), np.zeros(2)  # tokens, flops: counted on the host, no per-batch copies
        for i, (b, w) in enumerate(mbs):
            last = i == len(mbs) - 1  # gradients are reduced across ranks in the last backward only
            if isinstance(module, DDP):
                module.require_backward_grad_sync = last
            elif cfg.fsdp:
                module.set_requires_gradient_sync(last)
            with run.ctx:
                pc, pr, nc, nr = batch_logps(module, b, run.device, run.flex)
            losses, cr, rr = dpo_loss(pc, pr, *ref(b, "train"), chosen_lengths=nc, rejected_lengths=nr, **loss_kwargs(cfg))
            # each pair weighs 1/global_batch; ddp and fsdp average over ranks, hence the factor world
            (losses.sum() * w * run.world / cfg.global_batch_size).backward()
            if w:
                m.add(losses, cr, rr, pc, pr)
                work += (b.n_tokens, model.flops(b.n_tokens, len(b.tgt), b.ctx_sum))
        stats = m.result(run.world)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # fsdp: a DTensor
        if not math.isfinite(stats["loss"]) or not torch.isfinite(norm):
            what = f"loss is {stats['loss']}" if not math.isfinite(stats["loss"]) else f"gradient norm is {norm.item()}"
            raise FloatingPointError(f"step {it}: the {what}; stopping. the last good checkpoint is "
                                     f"{ckpt if os.path.exists(ckpt) else 'none saved yet'}. try a lower learning_rate or beta")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- everything that follows is diagnostics, logging and the stop signal
        if run.world > 1:
            work = torch.from_numpy(work).to(run.device)
            dist.all_reduce(work)
            work = work.cpu().numpy()
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        step_time += dt
        rec = {"iter": it, "lr": lr, **stats, "grad_norm": norm.item(), "ms": 1000 * dt,
               "pairs_per_s": cfg.global_batch_size / dt, "tokens_per_s": work[0] / dt,
               "flops_per_s": work[1] / dt, "mfu": work[1] / dt / (peak * run.world) if peak else None}
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
        if stop.agreed(run.device):  # every rank stops after the same step
            checkpoint.save(cfg, model, optimizer, it + 1, meta)
            print0(f"stopped after step {it}: saved {ckpt}; continue with --init_from=resume")
            raise checkpoint.Interrupted()
    if run.rank == 0 and cfg.export_hf:
        model.save_pretrained(os.path.join(cfg.out_dir, "hf"))
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
