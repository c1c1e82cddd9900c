"""
The data side of dpo.py: prepare.py's pairs -> the micro-batches the model runs on.

plain layout: one padded row per sequence (prompt+chosen, prompt+rejected), as Hugging Face and TRL.
packed layout: each pair once, [prompt | chosen | rejected], pairs end to end in rows. Position
ids and the attention mask give each response exactly what it would see in the plain layout:

    token   p p p c c r r r | p p c r r r r | E E    two pairs in a row of 17, then padding (EOT)
    doc     0 0 0 0 0 0 0 0 | 1 1 1 1 1 1 1 | - -    which pair (-1: padding)
    branch  0 0 0 1 1 2 2 2 | 0 0 1 2 2 2 2 | 0 0    a response sees its prompt, never the other
    pos     0 1 2 3 4 3 4 5 | 0 1 2 2 3 4 5 | 0 0    response, and goes on from the prompt's end

A micro-batch lists, for every response token, the flat position that predicts it (src), the token
(tgt) and its sequence (seq: 2k for pair k's chosen, 2k+1 for its rejected): the log-prob of each
response is then one gather and one sum.
"""
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from prepare import EOT, truncate as cut_pair
from shards import list_shards, load_pairs

PROMPT, CHOSEN, REJECTED = 0, 1, 2

# -----------------------------------------------------------------------------
# pairs: prepare.py's shards, memory-mapped

class PairData:
    """all pairs of one split; pair i -> (prompt, chosen, rejected) int64 arrays"""

    def __init__(self, data_dir, split, block_size, truncate=False, chosen_only=False,
                 vocab_size=None):
        self.data_dir = data_dir
        self.split = split
        self.block_size = block_size
        self.shards = [load_pairs(p) for p in list_shards(data_dir, split)]
        for s in self.shards:
            if vocab_size and s.max_token >= vocab_size:
                raise ValueError(f"{s.path}: token id {s.max_token} >= the model's vocabulary "
                                 f"({vocab_size}); was it prepared with another tokenizer?")
        sizes = [len(s) for s in self.shards]
        self.shard_of = np.repeat(np.arange(len(self.shards)), sizes)  # (N,)
        stored = np.concatenate([s.lengths for s in self.shards]).astype(np.int64)  # (N, 3)
        seq_len = stored[:, 0] + stored[:, 1:].max(1)  # (N,) the longer sequence of each pair
        self.n_cut = int((seq_len > block_size).sum())
        if self.n_cut and not truncate:
            raise ValueError(
                f"{data_dir} ({split}): {self.n_cut} pairs are longer than block_size={block_size} "
                f"(longest prompt+response: {seq_len.max()} tokens). Set --truncate=true to cut "
                f"them, raise --block_size (GPT-2 has 1024 positions), or re-run prepare.py with "
                f"--max_length={block_size}")
        self.lengths = self.cut_lengths() if self.n_cut else stored.copy()  # as the trainer sees them
        if chosen_only:  # sft never looks at the rejected responses: don't compute them
            self.lengths[:, REJECTED] = 0
        # where each pair's prompt, chosen and rejected tokens start (a cut prompt keeps its end)
        start = np.concatenate([s.offsets for s in self.shards])  # (N,)
        chosen = start + stored[:, 0]
        prompt = chosen - self.lengths[:, 0]
        rejected = chosen + stored[:, 1]
        self.seg = np.stack([prompt, chosen, rejected], 1)  # (N, 3) offsets in each pair's shard

    def cut_lengths(self):
        """prepare.py's rule: the prompt keeps its last block_size // 2 tokens, then responses
        lose their end"""
        lengths = []
        for shard in self.shards:
            for j in range(len(shard)):
                p, c, r, _cut = cut_pair(*shard[j], self.block_size, self.block_size // 2)
                lengths.append([len(p), len(c), len(r)])
        return np.array(lengths)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        """pair i as the trainer sees it (cut by --truncate): (prompt, chosen, rejected) int64"""
        tokens = self.shards[self.shard_of[i]].tokens
        return tuple(tokens[a: a + n].astype(np.int64) for a, n in zip(self.seg[i], self.lengths[i]))

    def tokens(self, pairs, kinds):
        """segments end to end, kinds[s] (PROMPT, CHOSEN or REJECTED) of pair pairs[s] -> their
        tokens (n,) int64, and for each token its segment (n,) and its place in it (n,)"""
        seg, within = spans(self.lengths[pairs, kinds])
        at = self.seg[pairs, kinds][seg] + within  # (n,) offsets in each token's shard
        if len(self.shards) == 1:
            return self.shards[0].tokens[at].astype(np.int64), seg, within
        out = np.empty(len(at), dtype=np.int64)
        shard = self.shard_of[pairs][seg]  # (n,)
        for s, sh in enumerate(self.shards):  # a loop over shards, not pairs
            out[shard == s] = sh.tokens[at[shard == s]]
        return out, seg, within

def step_pairs(n, seed, step, global_batch, rank, world):
    """the dataset indices this rank trains on at optimizer step `step`: a fixed function of
    (seed, step), so a resumed run sees the same pairs. each epoch is a fresh permutation"""
    def order(epoch):
        return np.random.default_rng([seed, epoch]).permutation(n)
    epoch, offset = divmod(step * global_batch, n)
    idx = order(epoch)[offset: offset + global_batch]
    while len(idx) < global_batch:  # the step runs over an epoch boundary
        epoch += 1
        idx = np.concatenate([idx, order(epoch)[: global_batch - len(idx)]])
    per = global_batch // world
    return idx[rank * per: (rank + 1) * per]


# -----------------------------------------------------------------------------
# one micro-batch, in either layout

@dataclass
class Batch:
    idx: torch.Tensor  # (R, T) input tokens
    pos: torch.Tensor | None  # (R, T) position ids (packed) or None (plain: 0..T-1)
    doc: torch.Tensor | None  # (R, T) which pair a token belongs to, -1 for padding (packed)
    branch: torch.Tensor | None  # (R, T) PROMPT, CHOSEN or REJECTED (packed)
    src: torch.Tensor  # (N,) flat index into (R*T) of the position that predicts each response token
    tgt: torch.Tensor  # (N,) the response tokens
    seq: torch.Tensor  # (N,) 2k for pair k's chosen, 2k+1 for its rejected
    tail: torch.Tensor  # (N,) bool: past the pair's shorter response (LD-DPO weighs it ld_alpha)
    last: torch.Tensor  # (2K,) flat index of each response's last token (a reward model reads it)
    lengths: torch.Tensor  # (2, K) float: response tokens of each pair's chosen and rejected
    pair_ids: np.ndarray  # (K,) dataset indices of the pairs in this micro-batch
    n_tokens: int  # real (non-padding) tokens the model runs on
    n_resp: int  # real response tokens (the lm_head's work)
    ctx_sum: int  # sum over real tokens of how many keys each attends to (attention FLOPs)
    n_seq: int  # sequence slots of the sums: 2K, or more for fixed shapes (padding goes there)

def spans(lengths):
    """segments of these lengths end to end -> for each element its segment and place in it:
    lengths [2, 3] -> segment [0, 0, 1, 1, 1], place [0, 1, 0, 1, 2]"""
    seg = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return seg, np.arange(len(seg)) - starts[seg]

class Laid(NamedTuple):
    idx: np.ndarray  # (rows, row_len) the grid of tokens, EOT where nothing was written
    at: np.ndarray  # (n,) each written token's flat offset in the grid
    seg: np.ndarray  # (n,) its segment
    within: np.ndarray  # (n,) its place in the segment
    resp: np.ndarray  # (N,) which of the n are response tokens
    src: np.ndarray  # (N,) for each response token, the flat offset that predicts it
    tail: np.ndarray  # (N,) bool: past the shorter response of its pair
    last: np.ndarray  # (2K,) each response's last token (an empty one: the prompt's last)

def lay_out(data, pairs, kinds, dst, pred, rows, row_len):
    """segments (kinds[s] of pair pairs[s]) written at flat offsets dst[s] of a (rows, row_len)
    grid. a response's first token is predicted from position pred[s], the others from the
    token before"""
    tok, seg, within = data.tokens(pairs, kinds)
    at = dst[seg] + within
    idx = np.full(rows * row_len, EOT, dtype=np.int64)
    idx[at] = tok
    resp = np.flatnonzero(kinds[seg] != PROMPT)
    src = np.where(within[resp] == 0, pred[seg[resp]], at[resp] - 1)
    shorter = data.lengths[pairs, 1:].min(1)  # (S,) the shorter response of each segment's pair
    tail = within[resp] >= shorter[seg[resp]]
    n = data.lengths[pairs, kinds]  # (S,) tokens of each segment
    is_resp = kinds != PROMPT
    last = np.where(n > 0, dst + n - 1, pred)[is_resp]  # responses in sequence order 2k, 2k+1
    return Laid(idx.reshape(rows, row_len), at, seg, within, resp, src, tail, last)

def to_batch(laid, ids, seq, L, n_tokens, ctx_sum, **packed):
    """the numpy arrays of a laid-out micro-batch -> a Batch of tensors"""
    t = torch.from_numpy
    tgt = laid.idx.ravel()[laid.at[laid.resp]]
    packed = {k: t(v.reshape(laid.idx.shape)) for k, v in packed.items()}
    return Batch(idx=t(laid.idx), pos=packed.get("pos"), doc=packed.get("doc"),
                 branch=packed.get("branch"), src=t(laid.src), tgt=t(tgt), seq=t(seq),
                 tail=t(laid.tail), last=t(laid.last), lengths=t(L[:, 1:].T.astype(np.float32)), pair_ids=ids,
                 n_tokens=n_tokens, n_resp=len(tgt), ctx_sum=ctx_sum, n_seq=2 * len(ids))

def plain_batch(data, ids, row_len):
    """one padded row per sequence: rows 2k (prompt+chosen) and 2k+1 (prompt+rejected)"""
    K = len(ids)
    L = data.lengths[ids]  # (K, 3)
    P = L[:, [0]]  # (K, 1)
    rows = 2 * np.arange(K)[:, None] + [0, 0, 1, 1]  # (K, 4): prompt, chosen | prompt, rejected
    dst = (rows * row_len + P * [0, 1, 0, 1]).ravel()
    pred = (rows * row_len + P - 1).ravel()
    kinds = np.tile([PROMPT, CHOSEN, PROMPT, REJECTED], K)
    laid = lay_out(data, np.repeat(ids, 4), kinds, dst, pred, 2 * K, row_len)
    seq = rows.ravel()[laid.seg[laid.resp]]  # a response's sequence is its row
    seq_len = P + L[:, 1:]  # (K, 2)
    ctx_sum = int((seq_len * (seq_len + 1) // 2).sum())
    return to_batch(laid, np.asarray(ids), seq, L, int(seq_len.sum()), ctx_sum)

def plan_packed(need, row_len):
    """first-fit decreasing: longest pair first, each into the first row with room for it.
    need (K,) tokens per pair -> row (K,) and offset (K,) of each pair (python ints: fast here)"""
    sizes = [int(n) for n in need]
    row = np.zeros(len(sizes), dtype=np.int64)
    offset = np.zeros(len(sizes), dtype=np.int64)
    free = []  # room left in each row
    for k in np.argsort(-np.asarray(need), kind="stable").tolist():
        j = next((j for j, f in enumerate(free) if f >= sizes[k]), len(free))  # or a new row
        if j == len(free):
            free.append(row_len)
        row[k] = j
        offset[k] = row_len - free[j]
        free[j] -= sizes[k]
    return row, offset

def packed_batch(data, pair, row, offset, rows, row_len):
    """pair (K,) dataset indices, numbered in this order, each at (row, offset) of a (rows, row_len)
    grid; rows past the last used one are padding. a pair of P=3, C=2, R=3 at offset o:

        token    p0 p1 p2 c0 c1 r0 r1 r2
        pos       0  1  2  3  4  3  4  5
        predicts       c0 c1  .  r1 r2  .     r0 is predicted from p2: src = o + [P-1, P+C, P+C+1]
    """
    K = len(pair)
    L = data.lengths[pair]  # (K, 3)
    P, C, R = L.T
    base = row * row_len + offset  # (K,) flat offset of each pair
    dst = (base[:, None] + np.stack([0 * P, P, P + C], 1)).ravel()  # (3K,) each segment's start
    first_pos = np.stack([0 * P, P, P], 1).ravel()  # (3K,) the position id of its first token
    pred = np.repeat(base + P - 1, 3)  # both responses start from the prompt's last token
    kinds = np.tile([PROMPT, CHOSEN, REJECTED], K)
    laid = lay_out(data, np.repeat(pair, 3), kinds, dst, pred, rows, row_len)
    pos = np.zeros(rows * row_len, dtype=np.int64)
    doc = np.full(rows * row_len, -1, dtype=np.int64)
    branch = np.zeros(rows * row_len, dtype=np.int64)
    pos[laid.at] = first_pos[laid.seg] + laid.within
    doc[laid.at] = laid.seg // 3
    branch[laid.at] = kinds[laid.seg]
    resp_seg = laid.seg[laid.resp]
    seq = resp_seg - resp_seg // 3 - 1  # segments 3k+1, 3k+2 -> sequences 2k, 2k+1
    ctx_sum = (P + C) * (P + C + 1) // 2 + R * (2 * P + R + 1) // 2  # (K,) keys seen, summed
    return to_batch(laid, pair, seq, L, int(L.sum()), int(ctx_sum.sum()), pos=pos, doc=doc,
                    branch=branch)


# -----------------------------------------------------------------------------
# a step's pairs -> micro-batches of one shape

@dataclass
class Shape:
    """how a rank's pairs become micro-batches: decided once (make_shape) for every split"""
    layout: str  # packed | plain
    row_len: int  # tokens per row
    rows: int  # packed: rows per micro-batch (token budget rows * row_len); plain: pairs
    fixed: bool  # every micro-batch the same tensor shapes: one graph for torch.compile
    multiple: int = 64  # row lengths are multiples of this (FlexAttention's blocks are 128)
    n_pred: int = 0  # fixed: response tokens per micro-batch, padded up to this, never more

def round_up(n, multiple):
    return int(-(-n // multiple) * multiple)

def make_shape(cfg, datasets, fixed, multiple=64):
    """rows as long as the longest pair (packed) or sequence (plain) of all splits; the first
    dataset (train) sizes the token budget: about batch_size pairs of its mean length, and 1.25
    times their mean response tokens"""
    L = np.concatenate([d.lengths for d in datasets])  # (N, 3)
    if cfg.layout == "packed":
        longest, what = int(L.sum(1).max()), "pair"
    else:
        longest, what = int((L[:, 0] + L[:, 1:].max(1)).max()), "sequence"
    if cfg.pack_len and cfg.pack_len < longest:
        raise ValueError(f"pack_len={cfg.pack_len} is shorter than the longest {what} "
                         f"({longest} tokens)")
    row_len = cfg.pack_len or round_up(longest, multiple)
    train = datasets[0].lengths
    mean_pair = train.sum(1).mean()
    if cfg.layout == "plain":
        rows = pairs = cfg.batch_size
        most = L[:, 1:].sum(1).max()  # the most response tokens of any pair
    else:
        # fixed: a tenth more room, or first fit often spills one more, nearly empty micro-batch
        room = 1.1 if fixed else 1
        rows = cfg.pack_rows or max(1, math.ceil(room * cfg.batch_size * mean_pair / row_len))
        pairs = rows * row_len / mean_pair
        most = row_len  # a whole row
    n_pred = 0
    if fixed:
        n_pred = round_up(max(1.25 * pairs * train[:, 1:].sum(1).mean(), most), 64)
    return Shape(cfg.layout, row_len, rows, fixed, multiple, n_pred)

def groups(sizes, most, cap):
    """consecutive items (pairs or rows) in groups of at most `most` items and `cap` in size
    -> each item's group"""
    out = np.zeros(len(sizes), dtype=np.int64)
    g, n, total = 0, 0, 0
    for i, size in enumerate(sizes.tolist()):
        if n == most or total + size > cap:
            g, n, total = g + 1, 0, 0
        out[i] = g
        n += 1
        total += size
    return out

def _grow(t, fill, n):
    return torch.cat([t, torch.full((n, *t.shape[1:]), fill, dtype=t.dtype)])

def padded(b, shape, n_seq):
    """fixed shapes: response tokens padded to n_pred (token 0, predicted from position 0, summed
    into the spare last slot), plain rows to 2 * rows: every micro-batch the same shapes"""
    extra = shape.n_pred - len(b.tgt)
    idx = b.idx if b.pos is not None else _grow(b.idx, EOT, 2 * shape.rows - len(b.idx))
    return replace(b, idx=idx, src=_grow(b.src, 0, extra), tgt=_grow(b.tgt, 0, extra),
                   seq=_grow(b.seq, n_seq - 1, extra), tail=_grow(b.tail, False, extra),
                   last=_grow(b.last, 0, n_seq - len(b.last)), n_seq=n_seq)

def micro_batches(data, ids, shape):
    """one rank's pairs for a step -> micro-batches. fixed: every one (rows, row_len) with n_pred
    response tokens; else rows as long as this step's longest pair, as many as the budget allows"""
    if not len(ids):
        return []
    resp = data.lengths[ids, 1:].sum(1)  # (K,) response tokens of each pair
    cap = shape.n_pred or float("inf")
    if shape.layout == "plain":
        group = groups(resp, shape.rows, cap)
        parts = np.split(ids, np.flatnonzero(np.diff(group)) + 1)
        mbs = [plain_batch(data, k, shape.row_len) for k in parts]
    else:
        need = data.lengths[ids].sum(1)  # (K,) tokens of each pair: prompt + chosen + rejected
        rows, row_len = shape.rows, shape.row_len
        if not shape.fixed:  # rows as long as this step's longest pair, in the same token budget
            row_len = min(row_len, round_up(need.max(), shape.multiple))
            rows = max(1, shape.rows * shape.row_len // row_len)
        row, offset = plan_packed(need, row_len)  # (K,), (K,)
        row_group = groups(np.bincount(row, weights=resp), rows, cap)  # each row's micro-batch
        order = np.lexsort((offset, row))  # pairs numbered row by row, left to right
        mbs = []
        for k in np.split(order, np.flatnonzero(np.diff(row_group[row[order]])) + 1):
            local_row = row[k] - row[k[0]]  # no row is empty: a micro-batch starts at its first
            n_rows = rows if shape.fixed else local_row.max() + 1
            mbs.append(packed_batch(data, ids[k], local_row, offset[k], n_rows, row_len))
    if shape.fixed:
        return [padded(b, shape, 2 * len(ids) + 1) for b in mbs]
    return mbs

def to_device(t, device):
    """pinned, non-blocking on CUDA: a pageable copy would wait for all queued GPU work"""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

def on_device(b, device):
    tensors = {k: to_device(v, device) for k, v in vars(b).items() if isinstance(v, torch.Tensor)}
    return replace(b, **tensors)

