"""
The shard format prepare.py writes and the trainer memory-maps: a 256-int32 header (magic, version,
pairs N, tokens), then the (N, 3) int32 lengths of each pair's prompt, chosen and rejected, then
every pair's tokens end to end as uint16 (GPT-2's ids fit). Files: {split}_000000.bin, ...
"""
import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20241127, 1, 256


class ShardError(ValueError):
    pass

class Pairs:
    """One memory-mapped shard: pairs[i] -> (prompt, chosen, rejected) uint16 views into .tokens."""

    def __init__(self, path):
        path = self.path = str(path)
        def check(ok, msg):
            if ok:
                return
            try:
                cmd = json.loads((Path(path).parent / "meta.json").read_text())["command"]
            except (OSError, ValueError, KeyError):
                folder = Path(path).parent
                cmd = f"python prepare.py --out_dir={folder} (with the --dataset/--input you used)"
            raise ShardError(f"{path}: {msg}; regenerate it with: {cmd}")
        size, head = os.path.getsize(path), HEADER_INTS * 4  # head: the header's bytes
        check(size >= head, f"{size} bytes is too small for the {head}-byte header (truncated file?)")
        magic, version, n, ntok = (int(x) for x in np.fromfile(path, dtype=np.int32, count=4))
        check(magic == MAGIC, f"bad magic {magic} (expected {MAGIC}): not a prepare.py shard")
        check(version == VERSION, f"version {version}, this reader expects {VERSION}")
        expected = head + n * 12 + ntok * 2
        check(n >= 0 and ntok >= 0 and size == expected, f"file is {size} bytes but its header "
              f"({n} pairs, {ntok} tokens) says {expected} (truncated or corrupted)")
        L = np.fromfile(path, dtype=np.int32, count=3 * n, offset=head).reshape(n, 3)
        L = self.lengths = L.astype(np.int64)  # (N, 3) prompt, chosen, rejected
        lengths_ok = (L >= 0).all() and (L[:, 1:] > 0).all()
        check(lengths_ok, "has a negative length or an empty response (corrupted)")
        # an empty prompt would have its first response token predicted from the previous pair's
        empty = (L[:, 0] == 0).sum()
        check(not empty, f"{empty} pairs have an empty prompt (prepare.py never writes one)")
        check(L.sum() == ntok, f"lengths sum to {L.sum()} tokens, the header says {ntok} (corrupted)")
        self.offsets = np.cumsum(L.sum(axis=1)) - L.sum(axis=1)  # (N,) each pair's start in .tokens
        self.tokens = np.zeros(0, dtype=np.uint16)
        if ntok:
            self.tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=head + n * 12)

    @functools.cached_property
    def max_token(self):
        """The largest token id (-1 if none), read when first asked (the trainer checks it)"""
        return int(self.tokens.max()) if len(self.tokens) else -1

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):  # (an index out of range raises IndexError here)
        o, (p, c, r) = int(self.offsets[i]), self.lengths[i]
        tokens = self.tokens[o:o + p + c + r]
        return tokens[:p], tokens[p:p + c], tokens[p + c:]

load_pairs = Pairs

def list_shards(data_dir, split, required=True):
    paths = sorted(str(p) for p in Path(data_dir).glob(f"{split}_{'[0-9]' * 6}.bin"))
    if not paths and required:
        raise FileNotFoundError(f"no {split} shards ({split}_*.bin) in {data_dir}; create them with: "
                                f"python prepare.py --out_dir={data_dir} (toy), or add --dataset=hh / "
                                f"--input=FILE")
    return paths


# -----------------------------------------------------------------------------
# writing shards (prepare.py's side)

class ShardWriter:
    """Shards of one split: tokens stream to a side file, lengths (of one shard) stay in memory"""

    def __init__(self, folder, split, shard_pairs):
        self.folder, self.split, self.shard_pairs = folder, split, shard_pairs
        self.shards = []  # [{file, pairs, tokens}]
        self.side = folder / f".{split}.tokens.tmp"
        self._start()

    def _start(self):
        self.lengths, self.pairs, self.ntok = [], 0, 0
        self.tokfile = open(self.side, "wb")

    def add(self, lengths, tokens):  # (k, 3) int32, (sum of lengths,) uint16
        while len(lengths):
            k = min(len(lengths), self.shard_pairs - self.pairs)  # up to the end of this shard
            ntok = int(lengths[:k].sum())
            self.lengths.append(lengths[:k])
            tokens[:ntok].tofile(self.tokfile)
            self.pairs += k
            self.ntok += ntok
            lengths, tokens = lengths[k:], tokens[ntok:]
            if self.pairs == self.shard_pairs:
                self.close()
                self._start()

    def close(self):  # -> [{file, pairs, tokens}] of the shards written so far
        self.tokfile.close()
        if self.pairs:
            name = f"{self.split}_{len(self.shards):06d}.bin"
            header = np.zeros(HEADER_INTS, dtype=np.int32)
            header[:4] = (MAGIC, VERSION, self.pairs, self.ntok)
            with open(self.folder / name, "wb") as f, open(self.side, "rb") as t:
                header.tofile(f)
                np.concatenate(self.lengths).astype(np.int32).tofile(f)
                shutil.copyfileobj(t, f, 1 << 20)
            self.shards.append({"file": name, "pairs": self.pairs, "tokens": self.ntok})
        self.side.unlink()
        return self.shards
