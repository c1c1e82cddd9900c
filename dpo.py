"""
Direct Preference Optimization (DPO) for GPT-2, in one file.

The offline toy run (CPU, a few minutes): SFT on the preferred responses, then DPO against the SFT model,
then a before/after table of the task's ground-truth reward:
    python prepare.py                                  # writes data/toy/
    python dpo.py --config=config/toy_sft.py           # SFT  -> out/toy_sft
    python dpo.py --config=config/toy_dpo.py           # DPO  -> out/toy_dpo (reference = the SFT model)
    python dpo.py --mode=compare --config=config/toy_dpo.py --init_from=out/toy_dpo
(`python dpo.py --mode=demo` runs all four.)

Real data and real GPT-2 weights (one GPU):
    python prepare.py --dataset=hh --out_dir=data/hh
    python dpo.py --config=config/hh_gpt2.py
Eight GPUs on one node (the global batch stays the same; each rank takes a disjoint slice):
    torchrun --standalone --nproc_per_node=8 dpo.py --config=config/hh_gpt2.py
Two nodes with 8 GPUs each (run on both, with the first node's address):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 dpo.py ...
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 dpo.py ...
Overrides are --key=value (see Config below); --config=FILE reads `key = value` lines first.
Sampling, policy and reference side by side:
    python dpo.py --mode=sample --init_from=out/toy_dpo --prompts="Review of the pizza:"
"""
import ast
import contextlib
import copy
import dataclasses
import functools
import difflib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, GPTConfig
from prepare import EOT, PrepareError, gpt2_encoding, list_shards, load_pairs, truncate

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    # run
    mode: str = "train"  # train | sample | compare (toy before/after table) | demo (the whole toy pipeline)
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
    reference: str = "cached"  # cached: reference log-probs computed once, then the model is freed | model: a frozen copy run every step
    # batching
    global_batch_size: int = 32  # pairs per optimizer step, summed over ranks and micro-steps
    batch_size: int = 8  # pairs per micro-step (plain layout) or the packing target (packed layout)
    layout: str = "packed"  # packed: prompt once, chosen and rejected after it, several pairs per row | plain: padded rows
    pack_len: int = 0  # packed row length in tokens; 0 = the longest pair in the data, rounded up to 64
    pack_rows: int = 0  # rows per packed micro-batch; 0 = room for about batch_size pairs of mean train length
    pack_shape: str = "auto"  # static: pack_rows x pack_len always | step: rows fit each step's longest pair | auto: static if compiled or CUDA
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
    eval_interval: int = 50
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
    # sampling (mode=sample/compare)
    prompts: str = ""  # "|"-separated prompts for mode=sample
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    num_samples: int = 8  # samples per prompt in compare


def _convert(key, text, typ):
    if typ is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--{key}={text}: expected a bool (true/false/1/0)")
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{key}={text}: expected {typ.__name__}") from None


def _check_key(key, where):
    names = [f.name for f in dataclasses.fields(Config)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{where}: unknown config key '{key}'{hint}. valid keys: {', '.join(names)}")


def read_config_file(path):
    """a config file is `key = value` lines with python literals; parsed, never executed"""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found")
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    out = {}
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{path}:{node.lineno}: expected `key = value`")
        key = node.targets[0].id
        _check_key(key, f"{path}:{node.lineno}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"{path}:{node.lineno}: the value of {key} must be a literal (number, string, bool)") from None
        typ = types[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not typ:
            raise ValueError(f"{path}:{node.lineno}: {key} expects {typ.__name__}, got {type(value).__name__} {value!r}")
        out[key] = value
    return out


def parse_config(argv):
    """--config=FILE first, then --key=value overrides on top"""
    cfg = Config()
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    pairs = []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"expected --key=value, got '{arg}'")
        key, value = arg[2:].split("=", 1)
        pairs.append((key, value))
    for key, value in pairs:
        if key == "config":
            for k, v in read_config_file(value).items():
                setattr(cfg, k, v)
    for key, value in pairs:
        if key != "config":
            _check_key(key, "command line")
            setattr(cfg, key, _convert(key, value, types[key]))
    return cfg


# -----------------------------------------------------------------------------
# data: prepare.py's shards, memory-mapped


class PairData:
    """all pairs of one split; pair i -> (prompt, chosen, rejected) int64 arrays"""

    def __init__(self, data_dir, split, block_size, truncate=False, chosen_only=False):
        self.chosen_only = chosen_only  # sft never looks at the rejected responses: don't compute them
        self.shards = [load_pairs(p) for p in list_shards(data_dir, split)]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.lengths = np.concatenate([s.lengths for s in self.shards]).astype(np.int64)  # (N, 3)
        self.block_size, self.truncate = block_size, truncate
        seq_len = self.lengths[:, 0] + np.maximum(self.lengths[:, 1], self.lengths[:, 2])  # (N,) longer sequence of each pair
        longest = int(seq_len.max()) if len(seq_len) else 0
        self.n_cut = int((seq_len > block_size).sum())
        if self.n_cut and not truncate:
            raise ValueError(
                f"{data_dir} ({split}): {self.n_cut} pairs are longer than block_size={block_size} "
                f"(longest prompt+response: {longest} tokens). Set --truncate=true to cut them, raise --block_size "
                f"(GPT-2 has 1024 positions), or re-run prepare.py with --max_length={block_size}")
        if self.n_cut:
            self.lengths = np.array([[len(x) for x in self._cut(*self._raw(i))] for i in range(len(self))], dtype=np.int64)
        if chosen_only:
            self.lengths[:, 2] = 0
        self.mean_pair_len = float(self.lengths.sum(1).mean()) if len(self.lengths) else 0.0  # sizes packed rows
        self.data_dir, self.split = data_dir, split

    def __len__(self):
        return int(self.starts[-1])

    def _raw(self, i):
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[s][i - int(self.starts[s])]

    def _cut(self, p, c, r):
        # prepare.py's rule: the prompt keeps its last block_size // 2 tokens, then responses lose their end
        return truncate(p, c, r, self.block_size, self.block_size // 2)[:3]

    def __getitem__(self, i):
        p, c, r = self._raw(i)
        if self.n_cut:
            p, c, r = self._cut(p, c, r)
        if self.chosen_only:
            r = r[:0]
        return p.astype(np.int64), c.astype(np.int64), r.astype(np.int64)

    def fingerprint(self):
        """identifies the data for the reference cache: every token and length, and the block size"""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.tokens)  # the memmap, read once (about 1 s per 200M tokens)
        h.update(self.lengths.tobytes() + str(self.block_size).encode())
        return h.hexdigest()[:16]


def epoch_order(n, seed, epoch):
    """the pair order of one epoch: a fixed function of (seed, epoch), so a resumed run sees the same pairs"""
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_pairs(n, seed, step, global_batch, rank, world):
    """the dataset indices this rank trains on at optimizer step `step`"""
    start = step * global_batch
    epoch, offset = divmod(start, n)
    order = epoch_order(n, seed, epoch)
    idx = order[offset: offset + global_batch]
    while len(idx) < global_batch:  # the step runs over an epoch boundary
        epoch += 1
        idx = np.concatenate([idx, epoch_order(n, seed, epoch)[: global_batch - len(idx)]])
    per = global_batch // world
    return idx[rank * per: (rank + 1) * per]


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
    K = len(ids)
    idx = np.full((2 * K, row_len), EOT, dtype=np.int64)
    src, tgt, seq = [], [], []
    n_tokens = ctx_sum = 0
    for k, i in enumerate(ids):
        p, c, r = data[i]
        for j, resp in enumerate((c, r)):
            row = 2 * k + j
            s = np.concatenate([p, resp])
            idx[row, : len(s)] = s
            # token t of the response (at position len(p)+t) is predicted from position len(p)+t-1
            src.append(row * row_len + len(p) - 1 + np.arange(len(resp)))
            tgt.append(resp)
            seq.append(np.full(len(resp), row))
            n_tokens += len(s)
            ctx_sum += len(s) * (len(s) + 1) // 2
    return Batch(torch.from_numpy(idx), None, None, None, torch.from_numpy(np.concatenate(src)),
                 torch.from_numpy(np.concatenate(tgt)), torch.from_numpy(np.concatenate(seq)),
                 np.asarray(ids), n_tokens, ctx_sum)


def plan_packed(need, row_len):
    """first-fit decreasing: longest pair first, each into the first row with room for it.
    `need` (K,) tokens per pair; returns the rows, each a list of (k, offset) with k the pair's index in `need`"""
    rows, used = [], []
    for k in np.argsort(-np.asarray(need), kind="stable"):
        j = next((j for j, u in enumerate(used) if u + need[k] <= row_len), None)
        if j is None:
            rows.append([])
            used.append(0)
            j = len(rows) - 1
        rows[j].append((int(k), used[j]))
        used[j] += int(need[k])
    return rows


def packed_batch(data, ids, plan, rows, row_len):
    """prefix sharing: each pair is [prompt | chosen | rejected] in one row; rejected attends to the prompt but not to
    chosen, and its positions continue from the prompt's end (see attention_mask). plan: rows of (j, offset), j an
    index into ids; `rows` >= len(plan), the rest is padding"""
    idx = np.full((rows, row_len), EOT, dtype=np.int64)
    pos = np.zeros((rows, row_len), dtype=np.int64)
    doc = np.full((rows, row_len), -1, dtype=np.int64)
    branch = np.zeros((rows, row_len), dtype=np.int64)
    src, tgt, seq, pair_ids = [], [], [], []
    n_tokens = ctx_sum = 0
    placed = [(j, row, o) for row, items in enumerate(plan) for j, o in items]
    for k, (j, row, o) in enumerate(placed):
        p, c, r = data[ids[j]]
        P, C, R = len(p), len(c), len(r)
        idx[row, o: o + P + C + R] = np.concatenate([p, c, r])
        pos[row, o: o + P + C + R] = np.concatenate([np.arange(P + C), np.arange(P, P + R)])
        doc[row, o: o + P + C + R] = k
        branch[row, o + P: o + P + C] = 1
        branch[row, o + P + C: o + P + C + R] = 2
        base = row * row_len + o
        # chosen token t is predicted from the position before it; the first of both responses from the prompt's end
        src += [base + P - 1 + np.arange(C), base + np.r_[P - 1, P + C + np.arange(R - 1)][:R]]
        tgt += [c, r]
        seq += [np.full(C, 2 * k), np.full(R, 2 * k + 1)]
        pair_ids.append(ids[j])
        n_tokens += P + C + R
        ctx_sum += (P + C) * (P + C + 1) // 2 + R * (2 * P + R + 1) // 2
    t = torch.from_numpy
    return Batch(t(idx), t(pos), t(doc), t(branch), t(np.concatenate(src)), t(np.concatenate(tgt)),
                 t(np.concatenate(seq)), np.asarray(pair_ids), n_tokens, ctx_sum)


def micro_batches(data, ids, cfg, pack_len, multiple=64):
    """split one rank's pairs for a step into micro-batches. pack_shape static: every packed micro-batch is
    (pack_rows, pack_len), so torch.compile sees one shape; step: rows as long as the step's longest pair and as many
    as the same token budget allows (less padding and less masked-out attention, for eager runs)"""
    if cfg.layout == "plain":
        return [plain_batch(data, ids[i: i + cfg.batch_size], pack_len) for i in range(0, len(ids), cfg.batch_size)]
    need = data.lengths[ids].sum(1)  # (K,) tokens of each pair: prompt + chosen + rejected
    if not len(need):
        return []
    rows, row_len = cfg.pack_rows or pack_rows(data, cfg.batch_size, pack_len), pack_len
    step = cfg.pack_shape == "step"
    if step:
        row_len = min(pack_len, round_up(need.max(), multiple))
        rows = max(1, rows * pack_len // row_len)
    plan = plan_packed(need, row_len)
    groups = [plan[i: i + rows] for i in range(0, len(plan), rows)]
    return [packed_batch(data, ids, g, len(g) if step else rows, row_len) for g in groups]


def pack_rows(data, batch_size, pack_len):
    """rows per packed micro-batch: enough for about batch_size pairs of the data's mean length"""
    return max(1, math.ceil(batch_size * data.mean_pair_len / pack_len))


def layout_len(data, layout, multiple=64):
    """row length: the longest sequence (plain) or pair (packed) in the data, rounded up (FlexAttention works in
    blocks of 128, so on CUDA rows are a multiple of 128)"""
    L = data.lengths
    longest = (L[:, 0] + np.maximum(L[:, 1], L[:, 2])) if layout == "plain" else L.sum(1)
    return round_up(longest.max(), multiple)


def round_up(n, multiple):
    return int(-(-n // multiple) * multiple)


# -----------------------------------------------------------------------------
# sequence log-probs


def attention_mask(b, device):
    """(R, 1, T, T) bool, True = may attend: same pair, causal, and never chosen <-> rejected.
    padding (doc -1) attends causally to other padding, so no row is empty (no NaN from softmax)"""
    doc, br = b.doc.to(device), b.branch.to(device)
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    same = doc[:, :, None] == doc[:, None, :]
    branch_ok = (br[:, None, :] == 0) | (br[:, :, None] == br[:, None, :])
    return (same & branch_ok & causal)[:, None]


def flex_block_mask(b, device):
    """the same mask as a FlexAttention BlockMask (CUDA): only the blocks that hold allowed pairs are computed"""
    from torch.nn.attention.flex_attention import create_block_mask
    doc, br = b.doc.to(device), b.branch.to(device)

    def mask_mod(bi, h, q, k):
        return (doc[bi, q] == doc[bi, k]) & (k <= q) & ((br[bi, k] == 0) | (br[bi, k] == br[bi, q]))

    R, T = doc.shape
    return create_block_mask(mask_mod, R, None, T, T, device=device)


class SequenceLogps(nn.Module):
    """the trainable forward: tokens -> summed log-prob of each response. one module, so DDP sees one forward"""

    def __init__(self, gpt, compile=False, chunk=4096):
        super().__init__()
        self.gpt, self.chunk = gpt, chunk
        self.hidden = torch.compile(gpt.hidden) if compile else gpt.hidden

    def forward(self, idx, pos, mask, src, tgt, seq, n_seq):
        h = self.hidden(idx, pos=pos, attn_mask=mask)  # (R, T, C)
        h = h.flatten(0, 1)[src]  # (N, C) only the positions that predict response tokens
        logp = self.gpt.token_logprobs(h, tgt, chunk_size=self.chunk)  # (N,) float32
        sums = torch.zeros(n_seq, dtype=torch.float32, device=idx.device).index_add(0, seq, logp)
        return sums[0::2], sums[1::2]  # (K,) chosen, (K,) rejected


def batch_logps(module, b, device, use_flex):
    """summed response log-probs (K,) chosen and rejected, plus response lengths, for one micro-batch"""
    mask = None
    if b.doc is not None:
        mask = flex_block_mask(b, device) if use_flex else attention_mask(b, device)
    pos = b.pos.to(device) if b.pos is not None else None
    seq = b.seq.to(device)
    chosen, rejected = module(b.idx.to(device), pos, mask, b.src.to(device), b.tgt.to(device), seq, 2 * len(b.pair_ids))
    n = torch.bincount(seq, minlength=2 * len(b.pair_ids)).float()
    return chosen, rejected, n[0::2], n[1::2]


# -----------------------------------------------------------------------------
# the DPO loss family: preference losses: one function, one short branch per loss type.
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
    if lengths is None:
        raise ValueError(f"dpo_loss: {why} needs {what} (number of response tokens per sequence, shape (B,)) "
                         f"to average log-probs per token; pass {what}=... (e.g. the response mask summed over T)")
    lengths = torch.as_tensor(lengths, dtype=like.dtype, device=like.device)
    if lengths.shape != like.shape:
        raise ValueError(f"dpo_loss: {what} has shape {tuple(lengths.shape)}, expected {tuple(like.shape)} "
                         f"(one token count per pair)")
    return lengths.clamp(min=1)  # an empty response would divide by zero

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
    if reference_free or reference_chosen_logps is None:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    else:
        rc, rr = reference_chosen_logps, reference_rejected_logps
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

# -----------------------------------------------------------------------------
# reference log-probs


def weights_hash(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def compute_reference(ref_model, data, cfg, pack_len, device, ctx, rank=0, world=1, use_flex=False):
    """(N,) chosen and (N,) rejected reference log-probs for every pair of `data`; ranks split the work"""
    module = SequenceLogps(ref_model, chunk=cfg.logprob_chunk).eval()
    out = torch.zeros(2, len(data), dtype=torch.float32, device=device)
    ids = np.arange(rank, len(data), world)
    t0 = last = time.time()
    for i in range(0, len(ids), 16 * cfg.batch_size):
        for b in micro_batches(data, ids[i: i + 16 * cfg.batch_size], cfg, pack_len, row_multiple(use_flex)):
            with ctx:
                c, r, _, _ = batch_logps(module, b, device, use_flex)
            j = torch.from_numpy(b.pair_ids).to(device)
            out[0, j], out[1, j] = c.float(), r.float()
        if rank == 0 and time.time() - last > 5:
            last, done = time.time(), min(i + 16 * cfg.batch_size, len(ids))
            print(f"reference log-probs {data.split}: {done}/{len(ids)} pairs, "
                  f"eta {(time.time() - t0) / done * (len(ids) - done):.0f}s", flush=True)
    if world > 1:
        torch.distributed.all_reduce(out)  # each pair was computed by exactly one rank, zeros elsewhere
    return out[0].cpu(), out[1].cpu()


def cached_reference(ref_model, data, cfg, pack_len, device, ctx, rank, world, use_flex):
    """reference log-probs stored beside the shards, keyed by the reference weights and the data"""
    key = f"{weights_hash(ref_model)}_{data.fingerprint()}"
    path = os.path.join(data.data_dir, f"ref_logps_{data.split}_{key}.pt")
    # rank 0 decides and shares what it has: other nodes may not see its filesystem
    found = torch.tensor([rank == 0 and os.path.exists(path)], dtype=torch.float32, device=device)
    if world > 1:
        torch.distributed.broadcast(found, 0)
    if found.item():
        both = torch.zeros(2, len(data), dtype=torch.float32, device=device)
        if rank == 0:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            both[0], both[1] = saved["chosen"], saved["rejected"]
        if world > 1:
            torch.distributed.broadcast(both, 0)
        return both[0].cpu(), both[1].cpu()
    chosen, rejected = compute_reference(ref_model, data, cfg, pack_len, device, ctx, rank, world, use_flex)
    if rank == 0:
        tmp = path + f".tmp{os.getpid()}"
        torch.save({"chosen": chosen, "rejected": rejected}, tmp)
        os.replace(tmp, path)
    return chosen, rejected


# -----------------------------------------------------------------------------
# models: the policy, its reference, checkpoints


def load_model(source, cfg):
    """scratch, a GPT-2 name, a Hugging Face folder, or one of our checkpoints (a ckpt.pt or the folder holding it)"""
    if source == "scratch":
        torch.manual_seed(cfg.seed)  # the same seed gives the same init, so a resumed run can rebuild its reference
        return GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    if source.startswith("gpt2") and not os.path.exists(source):
        return GPT.from_pretrained(source, dropout=cfg.dropout)
    if os.path.isfile(os.path.join(source, "config.json")):
        return GPT.from_pretrained(source, dropout=cfg.dropout)
    path = checkpoint_path(source)
    if path is None:
        raise FileNotFoundError(f"init_from={source}: expected scratch, gpt2[-medium|-large|-xl], a Hugging Face "
                                f"folder with config.json, or a checkpoint file / folder with ckpt.pt; found none")
    return model_from_checkpoint(torch.load(path, map_location="cpu", weights_only=True), cfg)


def checkpoint_path(source):
    """our checkpoint file for a ckpt.pt path or the folder holding it; None if there is none"""
    path = os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source
    return path if os.path.isfile(path) else None


def model_from_checkpoint(ck, cfg):
    model = GPT(GPTConfig(**{**ck["model_config"], "dropout": cfg.dropout}))
    model.load_state_dict(ck["model"])
    return model


def save_checkpoint(out_dir, raw_model, optimizer, cfg, iter_num, ref_from):
    """write, then rename: a crash mid-save leaves the previous checkpoint intact"""
    state = {
        "model": raw_model.state_dict(),  # the raw model, never the compiled or DDP wrapper: no prefixes on load
        "model_config": asdict(raw_model.config),
        "optimizer": optimizer.state_dict(),
        "config": asdict(cfg),
        "iter_num": iter_num,
        "ref_from": ref_from,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path = os.path.join(out_dir, "ckpt.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def get_lr(it, cfg):
    """linear warmup, then cosine decay to min_lr"""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@functools.lru_cache
def peak_flops(device):
    """bf16 dense peak of known GPUs; on CPU the measured float32 matmul rate (what MFU is reported against)"""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
                           ("4090", 165e12)):
            if key in name:
                return flops
        return 312e12
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(8):  # the best of several: the machine's rate, not its noise
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 ** 3 / best


def step_flops(model, b):
    """training FLOPs of one micro-batch: 6 per parameter per token for the blocks, the lm_head on response tokens
    only (that is all we compute), and attention over the keys each token actually sees"""
    c = model.config
    head = 6 * c.n_embd * c.vocab_size * len(b.tgt)
    return 6 * model.num_params(non_embedding=True) * b.n_tokens + head + 12 * c.n_layer * c.n_embd * b.ctx_sum


# -----------------------------------------------------------------------------
# training


def setup_device(cfg):
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; nccl on GPUs, gloo on CPU"""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ddp = "RANK" in os.environ and world > 1
    if ddp:
        if want.startswith("cuda"):
            want = f"cuda:{local_rank}"
            torch.cuda.set_device(want)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if want.startswith("cuda") else "gloo")
    return rank, world, ddp, torch.device(want)


def numerics(cfg, device):
    """dtype name, autocast context, whether hidden() is compiled, whether attention is FlexAttention"""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    compile_ = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
    use_flex = device.type == "cuda" and cfg.layout == "packed"
    return dtype, ctx, compile_, use_flex


def row_multiple(use_flex):
    return 128 if use_flex else 64  # FlexAttention works in blocks of 128


def batch_layout(cfg, train_data, val_data, compile_, use_flex):
    """row length, and cfg with pack_rows and pack_shape filled in: one token budget per micro-batch for train, val
    and the reference pass, and fixed shapes when compiled or on CUDA"""
    multiple = row_multiple(use_flex)
    pack_len = cfg.pack_len or max(layout_len(d, cfg.layout, multiple) for d in (train_data, val_data) if d is not None)
    if cfg.layout == "packed" and pack_len < layout_len(train_data, "packed"):
        raise ValueError(f"pack_len={pack_len} is shorter than the longest pair ({layout_len(train_data, 'packed')} tokens)")
    shape = cfg.pack_shape if cfg.pack_shape != "auto" else ("static" if compile_ or use_flex else "step")
    return dataclasses.replace(cfg, pack_rows=cfg.pack_rows or pack_rows(train_data, cfg.batch_size, pack_len),
                               pack_shape=shape), pack_len


class Metrics:
    """sums over pairs, all-reduced across ranks, then averaged"""
    KEYS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")

    def __init__(self, device):
        self.t = torch.zeros(len(self.KEYS) + 1, dtype=torch.float64, device=device)

    def add(self, losses, cr, rr, pc, pr):
        with torch.no_grad():
            vals = [losses.sum(), (cr > rr).float().sum(), (cr - rr).sum(), cr.sum(), rr.sum(), pc.sum(), pr.sum()]
            self.t[:-1] += torch.stack([v.double() for v in vals])
            self.t[-1] += len(losses)

    def result(self, ddp):
        if ddp:
            torch.distributed.all_reduce(self.t)
        n = max(self.t[-1].item(), 1)
        return {k: v / n for k, v in zip(self.KEYS, self.t[:-1].tolist())}


def loss_kwargs(cfg):
    return dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, gamma=cfg.gamma,
                sft_weight=cfg.sft_weight)


def needs_reference(cfg):
    return cfg.loss_type not in REFERENCE_FREE_LOSSES


def pair_reference(ref, b, device, ctx, use_flex):
    """reference log-probs of a micro-batch's pairs: looked up in the cache, or the frozen model run now"""
    if ref is None:
        return None, None
    if isinstance(ref, tuple):
        j = torch.from_numpy(b.pair_ids)
        return ref[0][j].to(device), ref[1][j].to(device)
    with torch.no_grad(), ctx:
        c, r, _, _ = batch_logps(ref, b, device, use_flex)
    return c.float(), r.float()


@torch.no_grad()
def evaluate(module, data, ref, cfg, pack_len, device, ctx, rank, world, ddp, use_flex):
    module.eval()
    n = len(data) if cfg.eval_pairs <= 0 else min(cfg.eval_pairs, len(data))
    m = Metrics(device)
    ids = np.arange(rank, n, world)
    for b in micro_batches(data, ids, cfg, pack_len, row_multiple(use_flex)):
        with ctx:
            pc, pr, nc, nr = batch_logps(module, b, device, use_flex)
        rc, rr = pair_reference(ref, b, device, ctx, use_flex)
        losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, chosen_lengths=nc, rejected_lengths=nr, **loss_kwargs(cfg))
        m.add(losses, cr, rr_, pc, pr)
    module.train()
    return m.result(ddp)


def train(cfg):
    """run one training job; returns the list of per-step metric dicts (rank 0's view, all-reduced)"""
    rank, world, ddp, device = setup_device(cfg)
    master = rank == 0
    if cfg.global_batch_size % world:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} must be divisible by the {world} ranks")
    if cfg.layout not in ("packed", "plain") or cfg.reference not in ("cached", "model") \
            or cfg.pack_shape not in ("auto", "static", "step"):
        raise ValueError(f"layout must be packed|plain, reference cached|model and pack_shape auto|static|step, "
                         f"got {cfg.layout}, {cfg.reference}, {cfg.pack_shape}")
    if cfg.loss_type not in LOSS_TYPES:  # before any long reference pass
        raise ValueError(f"unknown loss_type {cfg.loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    dtype, ctx, compile_, use_flex = numerics(cfg, device)
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)

    list_shards(cfg.data_dir, "train")  # no data: say so now, not after loading (or downloading) the weights
    # the policy, and where its reference comes from (the weights it started from)
    ck = None
    if cfg.init_from == "resume":
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"init_from=resume: no checkpoint at {path}")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        model = model_from_checkpoint(ck, cfg)
        ref_from = ck["ref_from"]
    else:
        model = load_model(cfg.init_from, cfg)
        ref_from = cfg.init_from
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.to(device)
    block = model.config.block_size

    sft = cfg.loss_type == "sft" and cfg.sft_weight == 0
    train_data = PairData(cfg.data_dir, "train", block, cfg.truncate, chosen_only=sft)
    val_data = PairData(cfg.data_dir, "val", block, cfg.truncate, sft) if _has_split(cfg.data_dir, "val") else None
    cfg, pack_len = batch_layout(cfg, train_data, val_data, compile_, use_flex)

    ref = None
    if needs_reference(cfg):
        ref_model = model if ck is None else load_model(ref_from, cfg).to(device)
        if cfg.reference == "cached":
            ref = {d.split: cached_reference(ref_model, d, cfg, pack_len, device, ctx, rank, world, use_flex)
                   for d in (train_data, val_data) if d is not None}
        else:
            frozen = copy.deepcopy(ref_model).eval().requires_grad_(False)
            frozen.gradient_checkpointing = False
            ref = SequenceLogps(frozen, compile=compile_, chunk=cfg.logprob_chunk)
        del ref_model
        model.train()  # the cached pass put the (shared) policy in eval mode
    ref_train = ref["train"] if isinstance(ref, dict) else ref
    ref_val = ref.get("val") if isinstance(ref, dict) else ref

    decay = [p for p in model.parameters() if p.dim() >= 2]  # matmul weights and embeddings decay, biases and norms don't
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)  # cpu too: 5x faster here
    start = 0
    if ck is not None:
        optimizer.load_state_dict(ck["optimizer"])
        start = ck["iter_num"]
        torch.set_rng_state(ck["rng_cpu"])
        if ck["rng_cuda"] and device.type == "cuda":
            torch.cuda.set_rng_state_all(ck["rng_cuda"])
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout differs per rank

    module = SequenceLogps(model, compile=compile_, chunk=cfg.logprob_chunk)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # no buffer broadcast: with packing, ranks may run different numbers of forwards per step
        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    peak = peak_flops(device)
    wandb = None
    if cfg.wandb_log and master:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    log_file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if master else None

    def log(rec):
        if master:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            if wandb:
                wandb.log(rec, step=rec["iter"])

    if master:
        rows = f"{cfg.pack_shape} {cfg.pack_rows} x {pack_len}" if cfg.layout == "packed" else f"rows of {pack_len}"
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_data)} train pairs, "
              f"{len(val_data) if val_data else 0} val pairs, {world} rank(s) on {device}, {dtype}, "
              f"layout {cfg.layout} ({rows} tokens), compile {compile_}", flush=True)
    history, step_time = [], 0.0
    for it in range(start, cfg.max_iters + 1):
        resumed_here = ck is not None and it == start  # evaluated just before that checkpoint was saved
        if val_data is not None and cfg.eval_interval and (it % cfg.eval_interval == 0 or it == cfg.max_iters) \
                and not resumed_here:
            ev = evaluate(module, val_data, ref_val, cfg, pack_len, device, ctx, rank, world, ddp, use_flex)
            if master:
                shown = ("loss", "chosen_logp") if val_data.chosen_only else ev
                print(f"eval {it}: " + ", ".join(f"{k} {ev[k]:.4f}" for k in shown), flush=True)
            log({"iter": it, **{f"val/{k}": v for k, v in ev.items()}})
        if it == cfg.max_iters:
            break
        lr = get_lr(it, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        t0 = time.time()
        ids = step_pairs(len(train_data), cfg.seed, it, cfg.global_batch_size, rank, world)
        mbs = micro_batches(train_data, ids, cfg, pack_len, row_multiple(use_flex))
        m = Metrics(device)
        work = torch.zeros(3, dtype=torch.float64, device=device)  # tokens, flops
        for i, b in enumerate(mbs):
            # ddp: sync gradients only on the last micro-step; the earlier ones just accumulate locally
            sync = contextlib.nullcontext() if not ddp or i == len(mbs) - 1 else module.no_sync()
            with sync:
                with ctx:
                    pc, pr, nc, nr = batch_logps(module, b, device, use_flex)
                rc, rr = pair_reference(ref_train, b, device, ctx, use_flex)
                losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, chosen_lengths=nc, rejected_lengths=nr, **loss_kwargs(cfg))
                # each pair weighs 1/global_batch; ddp averages over ranks, hence the factor world
                (losses.sum() * world / cfg.global_batch_size).backward()
            m.add(losses, cr, rr_, pc, pr)
            work += torch.tensor([b.n_tokens, step_flops(model, b), 0], dtype=torch.float64, device=device)
        stats = m.result(ddp)
        if ddp:
            torch.distributed.all_reduce(work)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"step {it}: the loss is {stats['loss']}; stopping. the last good checkpoint "
                                     f"is {os.path.join(cfg.out_dir, 'ckpt.pt')}. try a lower learning_rate or beta")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not torch.isfinite(norm):
            raise FloatingPointError(f"step {it}: the gradient norm is {norm.item()}; stopping. the last good "
                                     f"checkpoint is {os.path.join(cfg.out_dir, 'ckpt.pt')}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        step_time += dt
        rec = {"iter": it, "lr": lr, **stats, "grad_norm": norm.item(), "ms": 1000 * dt,
               "pairs_per_s": cfg.global_batch_size / dt, "tokens_per_s": work[0].item() / dt,
               "mfu": work[1].item() / dt / (peak * world)}
        history.append(rec)
        log(rec)
        if master and it % cfg.log_interval == 0:
            eta = step_time / (it - start + 1) * (cfg.max_iters - it - 1)  # training steps only (not evals)
            pref = "" if train_data.chosen_only else f", acc {stats['accuracy']:.2f}, margin {stats['margin']:.3f}"
            print(f"iter {it}: loss {stats['loss']:.4f}{pref}, lr {lr:.2e}, {1000 * dt:.0f}ms, {rec['pairs_per_s']:.1f} pairs/s, mfu {100 * rec['mfu']:.1f}%, "
                  f"eta {eta:.0f}s", flush=True)
        if master and cfg.save_checkpoint and cfg.eval_interval and (it + 1) % cfg.eval_interval == 0:
            save_checkpoint(cfg.out_dir, model, optimizer, cfg, it + 1, ref_from)
    if master and cfg.save_checkpoint:
        save_checkpoint(cfg.out_dir, model, optimizer, cfg, cfg.max_iters, ref_from)
    if master and cfg.export_hf:
        model.save_pretrained(os.path.join(cfg.out_dir, "hf"))
    if log_file:
        log_file.close()
    return history


def _has_split(data_dir, split):
    try:
        return bool(list_shards(data_dir, split))
    except (FileNotFoundError, ValueError):
        return False


# -----------------------------------------------------------------------------
# sampling: the policy and its reference side by side


def load_pair_of_models(cfg, device):
    """the policy from init_from and the reference it was trained against (recorded in its checkpoint)"""
    path, ref_from = checkpoint_path(cfg.init_from), None
    if path is not None:  # read the checkpoint once: the policy and where its reference came from
        ck = torch.load(path, map_location="cpu", weights_only=True)
        policy, ref_from = model_from_checkpoint(ck, cfg), ck.get("ref_from")
    else:
        policy = load_model(cfg.init_from, cfg)
    policy = policy.to(device).eval()
    reference = load_model(ref_from, cfg).to(device).eval() if ref_from else None
    return policy, reference, ref_from


def sample(cfg):
    enc = gpt2_encoding()
    *_, device = setup_device(cfg)
    policy, reference, ref_from = load_pair_of_models(cfg, device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    for prompt in (cfg.prompts.replace("\\n", "\n").split("|") if cfg.prompts else ["Review of the pizza:"]):
        idx = torch.tensor([enc.encode_ordinary(prompt)], device=device)
        print(f"=== {prompt!r}")
        for name, m in (("policy", policy), (f"reference ({ref_from})", reference)):
            if m is None:
                continue
            out = m.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None, generator=g)
            print(f"--- {name}: {enc.decode([t for t in out[0, idx.shape[1]:].tolist() if t != EOT])!r}")


@torch.no_grad()
def response_logps(model, prompt, responses):
    """summed log-prob of each response (a list of token lists) after one prompt; plain layout, one row each"""
    rows = [prompt + r for r in responses]
    T = max(len(r) for r in rows)
    idx = torch.tensor([r + [EOT] * (T - len(r)) for r in rows])
    logp = F.log_softmax(model(idx.to(next(model.parameters()).device)).float(), -1).cpu()
    P = len(prompt)
    return [sum(logp[i, P - 1 + t, r[t]].item() for t in range(len(r))) for i, r in enumerate(responses)]


def compare(cfg):
    """the toy task's before/after table on held-out prompts: ground-truth reward of the reference's (SFT) and the
    policy's (DPO) generations, a KL estimate between them, and preference accuracy on the held-out pairs"""
    from prepare import toy_reward
    enc = gpt2_encoding()
    *_, device = setup_device(cfg)
    policy, reference, ref_from = load_pair_of_models(cfg, device)
    if reference is None:
        raise ValueError(f"{cfg.init_from} records no reference model to compare against")
    val = PairData(cfg.data_dir, "val", policy.config.block_size, truncate=True)
    prompts = list(dict.fromkeys(tuple(val[i][0].tolist()) for i in range(len(val))))  # unique, in order
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    res = {name: {"greedy": [], "sampled": []} for name in ("reference", "policy")}
    kl = []
    for p in prompts:
        idx = torch.tensor([list(p)], device=device)
        for name, m in (("reference", reference), ("policy", policy)):
            greedy = m.generate(idx, cfg.max_new_tokens, temperature=0.0)
            res[name]["greedy"].append(toy_reward(enc.decode(_response(greedy[0], len(p)))))
            samples = m.generate(idx.repeat(cfg.num_samples, 1), cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_k=cfg.top_k or None, generator=g)
            toks = [_response(s, len(p), keep_eot=True) for s in samples]
            res[name]["sampled"] += [toy_reward(enc.decode([t for t in s if t != EOT])) for s in toks]
            if name == "policy":  # KL(policy || reference) ~ mean over policy samples of log pi - log pi_ref
                lp, lr = response_logps(policy, list(p), toks), response_logps(reference, list(p), toks)
                kl += [a - b for a, b in zip(lp, lr)]
    # held-out preference accuracy: by likelihood (each model alone), and by DPO's implicit reward (policy vs reference)
    pairs = [(val[i][0].tolist(), [val[i][1].tolist(), val[i][2].tolist()]) for i in range(min(len(val), 400))]
    margins = {name: np.array([np.subtract(*response_logps(m, p, cr)) for p, cr in pairs])
               for name, m in (("reference", reference), ("policy", policy))}
    for name in res:
        res[name]["acc"] = float(np.mean(margins[name] > 0))
    implicit_acc = float(np.mean(margins["policy"] - margins["reference"] > 0))
    mean = lambda xs: float(np.mean(xs))
    sem = lambda xs: float(np.std(xs) / math.sqrt(len(xs)))
    rows = [("reward, greedy", *(f"{mean(res[n]['greedy']):+.3f}" for n in res)),
            (f"reward, sampled (T={cfg.temperature})", *(f"{mean(res[n]['sampled']):+.3f} ± {sem(res[n]['sampled']):.3f}" for n in res)),
            ("log p(chosen) > log p(rejected)", *(f"{res[n]['acc']:.3f}" for n in res)),
            ("implicit reward accuracy", "", f"{implicit_acc:.3f}"),
            ("KL(policy || reference), nats", "", f"{mean(kl):.2f}")]
    print(f"\nheld-out prompts: {len(prompts)}, {cfg.num_samples} samples each; reference = {ref_from}, policy = {cfg.init_from}")
    print(f"{'':34s} {'reference (SFT)':>18s} {'policy (DPO)':>18s}")
    for r in rows:
        print(f"{r[0]:34s} {r[1]:>18s} {r[2]:>18s}")
    summary = {n: {k: (mean(v) if isinstance(v, list) else v) for k, v in d.items()} for n, d in res.items()}
    return summary | {"kl": mean(kl), "implicit_acc": implicit_acc}


def _response(row, prompt_len, keep_eot=False):
    """the generated tokens after the prompt, up to and excluding (or including) the first end token"""
    out = []
    for t in row[prompt_len:].tolist():
        if t == EOT:
            if keep_eot:
                out.append(t)
            break
        out.append(t)
    return out


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")  # the demo works from any folder


def demo():
    """the whole toy pipeline in one command: prepare, SFT, DPO against the SFT model, the before/after table.
    data and checkpoints go to data/toy and out/ under the current folder"""
    import prepare
    times, t0 = {}, time.time()
    if not _has_split("data/toy", "train"):
        prepare.main([])
    times["prepare"] = time.time() - t0
    for name in ("toy_sft", "toy_dpo"):
        print(f"\n=== {name}", flush=True)
        t = time.time()
        train(parse_config([f"--config={os.path.join(CONFIG_DIR, name)}.py"]))
        times[name[4:]] = time.time() - t
    t = time.time()
    compare(parse_config([f"--config={os.path.join(CONFIG_DIR, 'toy_dpo')}.py", "--init_from=out/toy_dpo"]))
    times["compare"] = time.time() - t
    print(f"\ntotal {time.time() - t0:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + ")")


def main(argv):
    cfg = parse_config(argv)
    if cfg.mode == "train":
        train(cfg)
    elif cfg.mode == "sample":
        sample(cfg)
    elif cfg.mode == "compare":
        compare(cfg)
    elif cfg.mode == "demo":
        demo()
    else:
        raise ValueError(f"mode must be train, sample, compare or demo, got {cfg.mode}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, PrepareError, FloatingPointError) as e:  # bad input, missing files, no network, diverged
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
