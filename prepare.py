"""
prepare.py: turn preference datasets into token shards that dpo.py memory-maps.

    python prepare.py                                   # toy task -> data/toy/ (offline, a few seconds)
    python prepare.py --dataset=hh                      # Anthropic HH-RLHF harmless-base -> data/hh/
    python prepare.py --input=pairs.jsonl.gz --format=auto --max_length=512
    python prepare.py --bench=1 --input=../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
    python prepare.py --help                            # all options

Input formats (--format=auto picks one from the first row):
  hh             {"chosen": transcript, "rejected": transcript}; the prompt is chosen up to and including
                 its last "\\n\\nAssistant:". If rejected does not start with that prompt, --hh_mismatch=recover
                 uses the longest prefix ending at an "\\n\\nAssistant:" that both share (skip if none).
  standard       {"prompt": str, "chosen": str, "rejected": str} (names set by --*_key); joined as-is.
  implicit       {"chosen": str, "rejected": str}; prompt = their common prefix, cut back to the end of its
                 last "\\n\\nAssistant:" if it has one, else to the last whitespace before they differ, so the
                 responses start with whitespace (GPT-2 tokens carry their leading space).
  conversational chosen/rejected (and optional prompt, a message list or a string = one user message) are
                 lists of {"role": user|assistant|system, "content": str}. Rendered like HH: each message is
                 "\\n\\n{Human|Assistant|System}: {content}", the prompt (messages shared by both, including the
                 given prompt) ends with "\\n\\nAssistant:", a response is " " + its first (assistant) message's
                 content followed by any later messages rendered the same way.

Tokens: GPT-2 BPE (tiktoken). Prompt and responses are encoded separately (so the prompt tokens are the
same in chosen and rejected), special-looking text like "<|endoftext|>" is encoded as plain text, and each
response ends with <|endoftext|> (50256). Truncation: if prompt + longer response > max_length, the prompt
keeps its last max_prompt_length tokens; then responses are cut at the end (losing their end token).

Toy task (--dataset=toy, the default): "Review of the{item}:"-style prompts, responses of 6-10 single-token
words ending in " .", drawn with a per-response mood; chosen is the sample with the higher toy_reward
(#positive - #negative words) / #words. Val prompts use 10 held-out items never seen in train.

Output folder (default data/<name>): train_000000.bin ..., val_000000.bin ..., meta.json. Shard layout:
  int32[256] header [MAGIC, VERSION, num_pairs, num_tokens, 0...]
  int32[num_pairs, 3] lengths (prompt, chosen, rejected)
  uint16[num_tokens] tokens, per pair: prompt, chosen, rejected
The validation split is by prompt (a hash of its text; toy: by held-out items), so no prompt is in both.
Every row (non-blank line) is written or skipped with a reason (meta.json "skipped", with the first line
numbers; for a .json array the "line" is the item number; .json arrays are loaded whole, jsonl streams).
Skip reasons: malformed_json, wrong_type, missing_field, empty_text, identical, no_assistant_turn, prompt_mismatch, no_shared_prompt, empty_after_truncation,
identical_after_truncation. Input that is not the claimed format at all stops the run and writes nothing.
"""

import collections
import difflib
import gzip
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tiktoken

MAGIC, VERSION, HEADER_INTS = 20241127, 1, 256
EOT = 50256  # <|endoftext|> in GPT-2 BPE
HUMAN, ASSIST = "\n\nHuman:", "\n\nAssistant:"
ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}
FORMATS = ("hh", "standard", "implicit", "conversational")
HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SPLITS = ("train", "val")

# -----------------------------------------------------------------------------
# options: python prepare.py --key=value ...

OPTIONS = {  # name: (default, help); the default's type is the option's type
    "dataset": ("toy", "toy (synthetic sentiment task, offline) | hh (download Anthropic HH-RLHF)"),
    "input": ("", "local .jsonl / .jsonl.gz / .json (array) file(s), comma separated; overrides --dataset"),
    "format": ("auto", "auto | " + " | ".join(FORMATS)),
    "prompt_key": ("prompt", "field name of the prompt"),
    "chosen_key": ("chosen", "field name of the preferred response"),
    "rejected_key": ("rejected", "field name of the dispreferred response"),
    "hh_mismatch": ("recover", "recover | skip: hh rows whose rejected does not start with chosen's prompt"),
    "hh_subsets": ("harmless-base", "comma separated, of: " + ", ".join(HH_SUBSETS)),
    "hh_split": ("train", "train | test | both: which HH files to download"),
    "hh_base_url": (HH_URL, "where the HH files live (file:// works)"),
    "download_dir": ("data/downloads/hh-rlhf", "cache for downloaded files"),
    "out_dir": ("", "output folder (default data/<dataset or input file name>)"),
    "max_length": (512, "max tokens of prompt + response"),
    "max_prompt_length": (256, "prompt keeps its last this many tokens when a pair is too long"),
    "val_fraction": (0.05, "fraction of prompts held out for val (toy: fixed held-out items)"),
    "shard_pairs": (100_000, "max pairs per shard file"),
    "toy_pairs": (6000, "number of toy pairs"),
    "seed": (1337, "toy data seed"),
    "num_workers": (0, "tokenizer processes (0 = one per core, 1 = in this process)"),
    "batch_rows": (256, "rows per tokenizer batch"),
    "bench": (0, "1: time the full prepare against bare tiktoken encoding of the same texts"),
}


class PrepareError(Exception):
    """Bad options or input: the message says what and where."""


def parse_args(argv):
    cfg = SimpleNamespace(**{k: d for k, (d, _) in OPTIONS.items()})
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\noptions:")
            for k, (d, h) in OPTIONS.items():
                print(f"  {f'--{k}={d}':<32} {h}")
            sys.exit(0)
        key, eq, val = arg[2:].partition("=")
        if not arg.startswith("--") or key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise PrepareError(f"unknown option {arg!r}{hint}; valid keys: " + ", ".join(OPTIONS))
        default = OPTIONS[key][0]
        if not eq and not isinstance(default, int):
            raise PrepareError(f"--{key} needs a value: --{key}=...")
        try:
            setattr(cfg, key, type(default)(val) if eq else 1)
        except ValueError:
            raise PrepareError(f"--{key} expects {type(default).__name__}, got {val!r}") from None
    return cfg


def command_for(cfg):
    """The command line that reproduces cfg (stored in meta.json and used in error hints)."""
    args = [f"--{k}={getattr(cfg, k)}" for k, (d, _) in OPTIONS.items() if k != "bench" and getattr(cfg, k) != d]
    return " ".join(["python prepare.py"] + args)


def validate(cfg):
    def need(ok, msg):
        if not ok:
            raise PrepareError(msg)
    need(cfg.format in ("auto",) + FORMATS, f"--format must be auto or one of {FORMATS}, got {cfg.format!r}")
    need(cfg.hh_mismatch in ("recover", "skip"), "--hh_mismatch must be recover or skip")
    need(cfg.hh_split in ("train", "test", "both"), "--hh_split must be train, test or both")
    need(cfg.input or cfg.dataset in ("toy", "hh"), f"--dataset must be toy or hh (or give --input), got {cfg.dataset!r}")
    need(1 <= cfg.max_prompt_length <= cfg.max_length, "need 1 <= --max_prompt_length <= --max_length")
    need(0 <= cfg.val_fraction < 1, "--val_fraction must be in [0, 1)")
    need(min(cfg.shard_pairs, cfg.batch_rows, cfg.toy_pairs) >= 1, "--shard_pairs, --batch_rows, --toy_pairs must be >= 1")
    need(cfg.shard_pairs * 2 * cfg.max_length < 2**31, "a shard's token count must fit int32: lower --shard_pairs")

# -----------------------------------------------------------------------------
# toy task: a controlled-sentiment task with a known ground-truth reward (like the DPO paper's IMDb task).
# every word below is a single GPT-2 token (with its leading space), so sequences stay short.

TOY_ITEMS = [" " + w for w in (
    "movie book phone car hotel restaurant game song album laptop camera shoe chair table coffee pizza "
    "burger show film park beach museum bike watch bag jacket shirt lamp bed room bar cafe sandwich salad "
    "soup cake bread wine beer tea guitar piano concert class course teacher doctor app website service "
    "store shop product tool knife pen desk house apartment city").split()]
TOY_VAL_ITEMS = TOY_ITEMS[5::6]  # 10 items whose prompts only ever appear in val
TOY_TEMPLATES = ("Review of the{item}:", "My review of the{item}:", "Thoughts on the{item}:")
TOY_POSITIVE = [" " + w for w in "good great nice excellent amazing wonderful perfect fantastic lovely best happy fun".split()]
TOY_NEGATIVE = [" " + w for w in "bad terrible awful poor horrible worst boring ugly sad broken annoying useless".split()]
TOY_NEUTRAL = [" " + w for w in "the was and very it is a this really quite so but my I think for of with just".split()]
_POS, _NEG = {w.strip() for w in TOY_POSITIVE}, {w.strip() for w in TOY_NEGATIVE}
_TOY_SPLIT = {t.format(item=i): "val" if i in TOY_VAL_ITEMS else "train" for t in TOY_TEMPLATES for i in TOY_ITEMS}


def toy_reward(text):
    """Ground-truth reward: (#positive - #negative words) / #words, in [-1, 1]. Text after <|endoftext|> is ignored."""
    words = re.findall(r"[a-z']+", text.split("<|endoftext|>")[0].lower())
    return (sum(w in _POS for w in words) - sum(w in _NEG for w in words)) / max(len(words), 1)


def _toy_response(rng, item):
    mood = rng.random()  # per-response mood: P(positive word) = 0.45 * mood, P(negative) = 0.45 * (1 - mood)
    n = rng.randint(6, 10)
    words = [item] if rng.random() < 0.5 else []  # often starts with the item
    while len(words) < n:
        u = rng.random()
        words.append(rng.choice(TOY_POSITIVE) if u < 0.45 * mood else rng.choice(TOY_NEGATIVE) if u < 0.45
                     else rng.choice(TOY_NEUTRAL + [item]))
    return "".join(words) + " ."


def make_toy_pairs(n, seed):
    """n toy pairs {prompt, chosen, rejected}: two samples of the base generator, chosen = higher toy_reward."""
    rng, pairs = random.Random(seed), []
    for _ in range(n):
        item = rng.choice(TOY_ITEMS)
        prompt = rng.choice(TOY_TEMPLATES).format(item=item)
        a, b = _toy_response(rng, item), _toy_response(rng, item)
        while toy_reward(a) == toy_reward(b):  # ties carry no preference: resample
            b = _toy_response(rng, item)
        if toy_reward(a) < toy_reward(b):
            a, b = b, a
        pairs.append({"prompt": prompt, "chosen": a, "rejected": b})
    return pairs


def toy_prompts(split, seed=0):
    """All toy prompts of a split ("train" or "val"), in a seed-shuffled order (for evaluation)."""
    prompts = sorted(p for p, s in _TOY_SPLIT.items() if s == split)
    random.Random(seed).shuffle(prompts)
    return prompts

# -----------------------------------------------------------------------------
# reading shards (the trainer's side)


class ShardError(ValueError):
    pass


def _regen_hint(folder):
    try:
        cmd = json.loads((Path(folder) / "meta.json").read_text())["command"]
    except (OSError, ValueError, KeyError):
        cmd = f"python prepare.py --out_dir={folder} (with the --dataset/--input you used)"
    return f"regenerate it with: {cmd}"


class Pairs:
    """One memory-mapped shard: pairs[i] -> (prompt, chosen, rejected) uint16 views into .tokens."""

    def __init__(self, path):
        path = self.path = str(path)
        def fail(msg):
            raise ShardError(f"{path}: {msg}; {_regen_hint(Path(path).parent)}")
        size = os.path.getsize(path)
        if size < HEADER_INTS * 4:
            fail(f"{size} bytes is too small for the {HEADER_INTS * 4}-byte header (truncated file?)")
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
        magic, version, n, ntok = (int(x) for x in header[:4])
        if magic != MAGIC:
            fail(f"bad magic {magic} (expected {MAGIC}): not a prepare.py shard")
        if version != VERSION:
            fail(f"version {version}, this reader expects {VERSION}")
        expected = HEADER_INTS * 4 + n * 12 + ntok * 2
        if n < 0 or ntok < 0 or size != expected:
            fail(f"file is {size} bytes but its header ({n} pairs, {ntok} tokens) says {expected} (truncated or corrupted)")
        self.lengths = np.fromfile(path, dtype=np.int32, count=3 * n, offset=HEADER_INTS * 4).reshape(n, 3).astype(np.int64)
        if (self.lengths < 0).any() or (self.lengths[:, 1:] < 1).any():
            fail("has a negative length or an empty response (corrupted)")
        if self.lengths.sum() != ntok:
            fail(f"lengths sum to {self.lengths.sum()} tokens, the header says {ntok} (corrupted)")
        ends = np.cumsum(self.lengths.sum(axis=1))
        self.offsets = ends - self.lengths.sum(axis=1)  # (N,) start of each pair in .tokens
        self.tokens = (np.memmap(path, dtype=np.uint16, mode="r", offset=expected - 2 * ntok, shape=(ntok,))
                       if ntok else np.zeros(0, dtype=np.uint16))

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} out of range for {len(self)} pairs in {self.path}")
        o, (p, c, r) = int(self.offsets[i]), self.lengths[i]
        return self.tokens[o:o + p], self.tokens[o + p:o + p + c], self.tokens[o + p + c:o + p + c + r]


def load_pairs(path):
    return Pairs(path)


def list_shards(data_dir, split):
    paths = sorted(str(p) for p in Path(data_dir).glob(f"{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
    if not paths:
        raise FileNotFoundError(f"no {split} shards ({split}_*.bin) in {data_dir}; create them with: "
                                f"python prepare.py --out_dir={data_dir} (toy), or add --dataset=hh / --input=FILE")
    return paths

# -----------------------------------------------------------------------------
# rows -> (prompt, chosen, rejected) text, one function per format. Bad rows raise Skip(reason).


class Skip(Exception):
    def __init__(self, reason):
        self.reason = reason


def _text(row, key):
    if key not in row:
        raise Skip("missing_field")
    if not isinstance(row[key], str):
        raise Skip("wrong_type")
    return row[key]


def _checked(prompt, chosen, rejected, note=None):
    if not (prompt.strip() and chosen.strip() and rejected.strip()):
        raise Skip("empty_text")
    if chosen == rejected:
        raise Skip("identical")
    return prompt, chosen, rejected, note


def extract_standard(row, o):
    return _checked(_text(row, o.prompt_key), _text(row, o.chosen_key), _text(row, o.rejected_key))


def extract_hh(row, o):
    chosen, rejected = _text(row, o.chosen_key), _text(row, o.rejected_key)
    if not chosen.strip() or not rejected.strip():
        raise Skip("empty_text")
    k, note = chosen.rfind(ASSIST), None
    if k < 0:
        raise Skip("no_assistant_turn")
    while not rejected.startswith(chosen[:k + len(ASSIST)]):
        # rejected diverges before chosen's last turn: fall back to an earlier turn both share
        k, note = chosen.rfind(ASSIST, 0, k), "prompt_mismatch_recovered"
        if o.hh_mismatch == "skip" or k < 0:
            raise Skip("prompt_mismatch")
    n = k + len(ASSIST)
    return _checked(chosen[:n], chosen[n:], rejected[n:], note)


def extract_implicit(row, o):
    chosen, rejected = _text(row, o.chosen_key), _text(row, o.rejected_key)
    if chosen == rejected:
        raise Skip("identical")
    common = os.path.commonprefix([chosen, rejected])
    n = common.rfind(ASSIST)
    if n >= 0:
        n += len(ASSIST)
    else:  # back up to whitespace that starts both responses
        n = len(common)
        while n > 0 and not (n < min(len(chosen), len(rejected)) and chosen[n].isspace() and rejected[n].isspace()):
            n -= 1
    if n == 0:
        raise Skip("no_shared_prompt")
    return _checked(chosen[:n], chosen[n:], rejected[n:])


def _messages(value, is_prompt=False):
    if is_prompt and isinstance(value, str):  # a bare prompt string is one user message
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value):
        raise Skip("wrong_type")
    return [(m["role"], m["content"]) for m in value]


def _render(messages):
    return "".join(f"\n\n{ROLES[role]}: {content}" for role, content in messages)


def extract_conversational(row, o):
    if o.chosen_key not in row or o.rejected_key not in row:
        raise Skip("missing_field")
    chosen, rejected = _messages(row[o.chosen_key]), _messages(row[o.rejected_key])
    if o.prompt_key in row:  # the prompt may or may not be repeated inside chosen/rejected
        prompt = _messages(row[o.prompt_key], is_prompt=True)
        chosen = chosen if chosen[:len(prompt)] == prompt else prompt + chosen
        rejected = rejected if rejected[:len(prompt)] == prompt else prompt + rejected
    if not chosen or not rejected:
        raise Skip("empty_text")
    if chosen == rejected:
        raise Skip("identical")
    k = 0  # the messages both share are the prompt
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise Skip("no_shared_prompt")
    if k == len(chosen) or k == len(rejected):
        raise Skip("empty_text")
    if chosen[k][0] != "assistant" or rejected[k][0] != "assistant":
        raise Skip("prompt_mismatch")  # they diverge at a non-assistant message: no common prompt
    response = lambda ms: " " + ms[0][1] + _render(ms[1:])
    return _checked(_render(chosen[:k]) + ASSIST, response(chosen[k:]), response(rejected[k:]))


EXTRACT = {"hh": extract_hh, "standard": extract_standard, "implicit": extract_implicit,
           "conversational": extract_conversational}


def detect_format(row, o):
    if not isinstance(row, dict):
        return None
    chosen, rejected = row.get(o.chosen_key), row.get(o.rejected_key)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "conversational"
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(row.get(o.prompt_key), str):
            return "standard"
        return "hh" if HUMAN in chosen and ASSIST in chosen else "implicit"
    return None

# -----------------------------------------------------------------------------
# worker: parse, tokenize and truncate one batch of rows (in a pool process, or inline)

_W = SimpleNamespace()  # per-process state set by _init_worker


def gpt2_encoding():
    """tiktoken's GPT-2 BPE; its first use downloads two small files, which can fail offline"""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests / urllib errors, depending on the tiktoken version
        raise PrepareError(f"could not load tiktoken's GPT-2 tokenizer ({type(e).__name__}: {str(e)[:200]}). Its "
                           "first use downloads vocab.bpe and encoder.json from openaipublic.blob.core.windows.net; "
                           "check the network, or point TIKTOKEN_CACHE_DIR at a folder that already has them") from None


def _init_worker(opts):
    _W.__dict__.update(opts.__dict__)
    _W.enc = gpt2_encoding()


def split_of(prompt, o):
    if o.split_mode == "toy" and prompt in _TOY_SPLIT:
        return _TOY_SPLIT[prompt]
    h = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little")
    return "val" if h / 2**64 < o.val_fraction else "train"


def truncate(p, c, r, max_length, max_prompt_length):
    """Cut token lists: the prompt loses its start (only if the pair is too long), then responses their end."""
    cut_p = len(p) + max(len(c), len(r)) > max_length and len(p) > max_prompt_length
    if cut_p:
        p = p[-max_prompt_length:]
    room = max(max_length - len(p), 0)
    return p, c[:room], r[:room], (cut_p, len(c) > room, len(r) > room)


def process_batch(batch):
    o, texts, kept, skips, notes = _W, [], [], [], []
    for where, row in batch:
        try:
            if isinstance(row, bytes):
                try:
                    row = json.loads(row)
                except ValueError:
                    raise Skip("malformed_json") from None
            if not isinstance(row, dict):
                raise Skip("wrong_type")
            prompt, chosen, rejected, note = EXTRACT[o.format](row, o)
        except Skip as e:
            skips.append((where, e.reason))
            continue
        if note:
            notes.append((where, note))
        kept.append((where, split_of(prompt, o)))
        texts += (prompt, chosen, rejected)
    ids = [o.enc.encode_ordinary(t) for t in texts]  # ordinary: "<|endoftext|>" in text is plain text
    out = {s: ([], [], []) for s in SPLITS}  # split -> (lengths, tokens, cut flags)
    for i, (where, split) in enumerate(kept):
        p, c, r = ids[3 * i], ids[3 * i + 1] + [EOT], ids[3 * i + 2] + [EOT]
        p, c, r, cut = truncate(p, c, r, o.max_length, o.max_prompt_length)
        if not c or not r:
            skips.append((where, "empty_after_truncation"))
        elif c == r:
            skips.append((where, "identical_after_truncation"))
        else:
            lengths, tokens, cuts = out[split]
            lengths.append((len(p), len(c), len(r)))
            tokens += p + c + r
            cuts.append(cut)
    arrays = {s: (np.array(l, dtype=np.int32).reshape(-1, 3),  # (k, 3) lengths
                  np.fromiter(t, np.uint16, len(t)),  # (sum of lengths,) tokens
                  np.array(c, dtype=bool).reshape(-1, 3))  # (k, 3) was prompt / chosen / rejected cut
              for s, (l, t, c) in out.items()}
    return len(batch), skips, notes, arrays

# -----------------------------------------------------------------------------
# reading input files lazily, with fatal errors for input that is not the claimed format


def iter_rows(paths, state):
    """Yield (where, row): row is a jsonl line's raw bytes (parsed later, in the workers) or a parsed object."""
    state.done_bytes = 0
    for path in paths:
        where = (lambda n: n) if len(paths) == 1 else (lambda n, name=Path(path).name: f"{name}:{n}")
        gz, raw = path.endswith(".gz"), open(path, "rb")
        state.raw, n, rows = raw, 0, 0
        try:
            f = gzip.GzipFile(fileobj=raw) if gz else raw
            if path.removesuffix(".gz").endswith(".json"):  # a JSON array is parsed whole (not streamed)
                try:
                    items = json.load(f)
                except ValueError as e:
                    raise PrepareError(f"{path}:{getattr(e, 'lineno', '?')}: not a valid JSON array ({e}); "
                                       "a file of one JSON object per line should be named .jsonl") from None
                if not isinstance(items, list):
                    raise PrepareError(f"{path}:1: expected a JSON array of objects, got {type(items).__name__}")
                for n, item in enumerate(items, 1):
                    rows += 1
                    yield where(n), item
            else:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if not rows:  # the first row must be JSON, else this is not a jsonl file at all
                        try:
                            line = json.loads(line)
                        except ValueError as e:
                            raise PrepareError(f"{path}:{n}: not valid JSON ({e}); expected JSON Lines "
                                               "(one object per line), .jsonl.gz or a .json array") from None
                    rows += 1
                    yield where(n), line
        except (EOFError, OSError, zlib.error) as e:  # truncated or corrupt gzip stream
            raise PrepareError(f"{path}: broken {'gzip ' if gz else ''}file after line {n}: {e}; "
                               "re-download or re-create it") from None
        finally:
            raw.close()
        if not rows:
            raise PrepareError(f"{path}:1: empty file (no rows); expected one JSON object per line")
        state.done_bytes += os.path.getsize(path)


def batched(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch

# -----------------------------------------------------------------------------
# writing shards: tokens stream to a side file, lengths stay in memory (bounded by shard_pairs)


class ShardWriter:
    def __init__(self, folder, split, shard_pairs):
        self.folder, self.split, self.shard_pairs = Path(folder), split, shard_pairs
        self.shards = []  # [{file, pairs, tokens}]
        self._start()

    def _start(self):
        self.lengths, self.pairs, self.ntok = [], 0, 0
        self.tokfile = open(self.folder / f".{self.split}.tokens.tmp", "wb")

    def add(self, lengths, tokens):  # (k, 3) int32, (sum of lengths,) uint16
        ends = np.cumsum(lengths.sum(axis=1))
        i = 0
        while i < len(lengths):
            j = min(len(lengths), i + self.shard_pairs - self.pairs)
            lo, hi = (ends[i - 1] if i else 0), ends[j - 1]
            self.lengths.append(lengths[i:j])
            tokens[lo:hi].tofile(self.tokfile)
            self.pairs, self.ntok, i = self.pairs + j - i, self.ntok + int(hi - lo), j
            if self.pairs == self.shard_pairs:
                self._finish()
                self._start()

    def _finish(self):
        self.tokfile.close()
        tmp = Path(self.tokfile.name)
        if self.pairs:
            name = f"{self.split}_{len(self.shards):06d}.bin"
            header = np.zeros(HEADER_INTS, dtype=np.int32)
            header[:4] = MAGIC, VERSION, self.pairs, self.ntok
            with open(self.folder / name, "wb") as f, open(tmp, "rb") as t:
                header.tofile(f)
                np.concatenate(self.lengths).astype(np.int32).tofile(f)
                shutil.copyfileobj(t, f, 1 << 20)
            self.shards.append({"file": name, "pairs": self.pairs, "tokens": self.ntok})
        tmp.unlink()

    def close(self):
        self._finish()
        return self.shards

# -----------------------------------------------------------------------------
# the whole run


class Tally:
    """Counts per reason with the first few source lines of each."""

    def __init__(self):
        self.d = {}

    def add(self, where, reason):
        e = self.d.setdefault(reason, {"count": 0, "first_lines": []})
        e["count"] += 1
        if len(e["first_lines"]) < 5:
            e["first_lines"].append(where)


def download(url, dest, log):
    dest = Path(dest)
    if dest.exists():
        log(f"using {dest} (delete it to download again)")
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, t0, done = dest.with_name(dest.name + ".partial"), time.time(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                rate = done / max(time.time() - t0, 1e-9) / 1e6
                print(f"\rdownloading {url}: {done / 1e6:.1f}" + (f"/{total / 1e6:.1f}" if total else "")
                      + f" MB ({rate:.1f} MB/s)", end="", file=sys.stderr)
        print(file=sys.stderr)
        if total and done != total:  # a connection that closed early must not leave a "complete" file behind
            raise OSError(f"incomplete, got {done} of {total} bytes")
        os.replace(tmp, dest)
    except OSError as e:  # URLError is an OSError
        tmp.unlink(missing_ok=True)
        raise PrepareError(f"could not download {url}: {e} (set --hh_base_url, or pass a local file with --input)") from None
    return str(dest)


def _sources(cfg, log):
    """-> (name, input paths or None for toy, default out_dir)"""
    if cfg.input:
        paths = cfg.input.split(",")
        for p in paths:
            if not os.path.isfile(p):
                raise PrepareError(f"{p}: no such file (--input)")
        return Path(paths[0]).name.split(".")[0], paths
    if cfg.dataset == "toy":
        return "toy", None
    subsets = cfg.hh_subsets.split(",")
    for s in subsets:
        if s not in HH_SUBSETS:
            raise PrepareError(f"unknown HH subset {s!r}; choose from {', '.join(HH_SUBSETS)}")
    splits = ["train", "test"] if cfg.hh_split == "both" else [cfg.hh_split]
    return "hh", [download(f"{cfg.hh_base_url}/{s}/{sp}.jsonl.gz", Path(cfg.download_dir) / s / f"{sp}.jsonl.gz", log)
                  for s in subsets for sp in splits]


def _ours(name):  # also dpo.py's reference log-prob caches: they belong to the data being replaced
    return name == "meta.json" or re.fullmatch(r"(train|val)_\d{6}\.bin|ref_logps_\w+\.pt(\.tmp\d+)?", name)


def _fresh_dir(out_dir, tag):  # a hidden sibling of out_dir (same filesystem, so renames are atomic)
    d = out_dir.parent / f".{out_dir.name}.{tag}-{os.getpid()}-{time.time_ns()}"
    d.mkdir()
    return d


def _swap_in(stage, out_dir):
    """Replace out_dir by stage as a whole: the old output is either all there or all replaced."""
    old = _fresh_dir(out_dir, "old")
    try:
        if out_dir.exists():
            os.replace(out_dir, old / "x")
        os.replace(stage, out_dir)
    except OSError:
        if (old / "x").exists():
            os.replace(old / "x", out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _cores():  # the cores this process may run on
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenized_batches(rows, opts):
    """Yield process_batch results in input order, computed here (1 worker) or in a process pool."""
    workers = opts.num_workers or _cores()
    gpt2_encoding()  # load once here (a clear error offline); forked workers inherit tiktoken's cache
    if workers == 1:
        _init_worker(opts)
        yield from map(process_batch, batched(rows, opts.batch_rows))
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(opts,)) as pool:
        pending = collections.deque()  # at most 2 batches per worker in flight, so memory stays flat
        for batch in batched(rows, opts.batch_rows):
            pending.append(pool.apply_async(process_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Progress:
    """Rows/s, percent of input bytes and ETA on stderr, only for runs longer than a second."""

    def __init__(self, paths, state):
        self.total, self.state = sum(map(os.path.getsize, paths or [])), state
        self.t0, self.last, self.shown = time.time(), 0, False

    def update(self, nrows):
        now = time.time()
        if self.total and now - self.t0 > 1 and now - self.last > 1:
            st = self.state
            pos = st.done_bytes + (0 if st.raw.closed else st.raw.tell())  # compressed bytes read so far
            el, end = now - self.t0, "\r" if sys.stderr.isatty() else "\n"
            print(f"prepare: {nrows:,} rows, {nrows / el:,.0f} rows/s, {100 * pos / self.total:.0f}%, "
                  f"eta {el * (self.total - pos) / max(pos, 1):.0f}s ", end=end, file=sys.stderr)
            self.last, self.shown = now, True

    def close(self):
        if self.shown and sys.stderr.isatty():
            print(file=sys.stderr)


def prepare(cfg, log=print):
    """Run the whole pipeline for the options in cfg; returns the meta dict (also written to meta.json).
    log prints the summary (log=None: silent, no progress either)."""
    validate(cfg)
    t0 = time.time()
    name, paths = _sources(cfg, log or (lambda *a: None))
    out_dir = Path(cfg.out_dir or f"data/{name}")
    if out_dir.exists() and [f for f in os.listdir(out_dir) if not _ours(f)]:
        raise PrepareError(f"{out_dir} holds files prepare.py did not write; refusing to replace it "
                           "(pick another --out_dir)")
    opts = SimpleNamespace(**vars(cfg), split_mode="toy" if paths is None else "hash")
    state = SimpleNamespace(raw=None, done_bytes=0)
    if paths is None:  # toy rows are already dicts in the standard format
        opts.format, opts.prompt_key, opts.chosen_key, opts.rejected_key = "standard", "prompt", "chosen", "rejected"
        rows = iter(enumerate(make_toy_pairs(cfg.toy_pairs, cfg.seed), 1))
    else:
        rows = iter_rows(paths, state)
    first = next(rows)  # iter_rows raises on an empty file
    if opts.format == "auto":
        opts.format = detect_format(first[1], opts)
        if opts.format is None:
            keys = sorted(first[1]) if isinstance(first[1], dict) else type(first[1]).__name__
            raise PrepareError(f"{paths[0]}:{first[0]}: unknown format (row has {keys}); expected chosen/rejected "
                               "strings or message lists: pass --format and --prompt_key/--chosen_key/--rejected_key")
    rows = (r for it in ([first], rows) for r in it)

    made = [d for d in [out_dir.parent, *out_dir.parent.parents] if not d.exists()]  # removed again on failure
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = _fresh_dir(out_dir, "tmp")
    try:
        writers = {s: ShardWriter(stage, s, cfg.shard_pairs) for s in SPLITS}
        skipped, notes, trunc, nrows = Tally(), Tally(), collections.Counter(), 0
        progress = Progress(paths if log else None, state)
        for n, skips, nts, arrays in tokenized_batches(rows, opts):
            nrows += n
            for where, reason in skips:
                skipped.add(where, reason)
            for where, note in nts:
                notes.add(where, note)
            for s, (lengths, tokens, cuts) in arrays.items():
                writers[s].add(lengths, tokens)
                trunc.update(prompts=int(cuts[:, 0].sum()), chosen=int(cuts[:, 1].sum()),
                             rejected=int(cuts[:, 2].sum()), pairs=int(cuts.any(axis=1).sum()))
            progress.update(nrows)
        progress.close()
        bad = skipped.d.get("malformed_json", {"count": 0})
        if bad["count"] > nrows / 2:
            raise PrepareError(f"{paths[0]}: {bad['count']} of {nrows} lines are not valid JSON (first at line "
                               f"{bad['first_lines'][0]}): is this really a JSON Lines file?")
        shards = {s: w.close() for s, w in writers.items()}
        pairs = {s: sum(x["pairs"] for x in v) for s, v in shards.items()}
        if not pairs["train"]:
            raise PrepareError(f"{','.join(paths or ['toy'])}: no train pairs left from {nrows} rows "
                               f"(skipped: {json.dumps(skipped.d)})")
        meta = {
            "tokenizer": "gpt2", "eot_token": EOT, "magic": MAGIC, "version": VERSION,
            "dataset": name, "source": paths or "toy", "format": opts.format, "command": command_for(cfg),
            "options": vars(cfg), "rows_read": nrows, "pairs": pairs,
            "tokens": {s: sum(x["tokens"] for x in v) for s, v in shards.items()}, "shards": shards,
            "skipped": skipped.d, "notes": notes.d,
            "truncated": {k: trunc[k] for k in ("pairs", "prompts", "chosen", "rejected")},
            "seconds": round(time.time() - t0, 3),
        }
        if paths is None:
            meta["toy_val_items"] = TOY_VAL_ITEMS
        (stage / "meta.json").write_text(json.dumps(meta, indent=1))
        _swap_in(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for d in made:
            if not os.listdir(d):
                os.rmdir(d)
        raise
    if log:
        log(summary(meta, out_dir))
    return meta


def summary(meta, out_dir):
    sk = meta["skipped"]
    lines = [f"prepare: {out_dir} ({meta['format']}, gpt2 tokens) in {meta['seconds']:.1f}s",
             f"  rows read   {meta['rows_read']:,}",
             f"  written     train {meta['pairs'].get('train', 0):,} pairs ({meta['tokens']['train']:,} tokens), "
             f"val {meta['pairs'].get('val', 0):,} pairs ({meta['tokens']['val']:,} tokens)",
             f"  skipped     {sum(v['count'] for v in sk.values()):,}"]
    lines += [f"    {r:<28} {v['count']:>7,}  (lines {', '.join(map(str, v['first_lines']))}"
              f"{', ...' if v['count'] > len(v['first_lines']) else ''})" for r, v in sk.items()]
    lines += [f"  note: {r} {v['count']:,} (lines {', '.join(map(str, v['first_lines']))})"
              for r, v in meta["notes"].items()]
    t = meta["truncated"]
    lines.append(f"  truncated   {t.get('pairs', 0):,} pairs (prompts {t.get('prompts', 0):,}, chosen {t.get('chosen', 0):,}, "
                 f"rejected {t.get('rejected', 0):,})")
    if not meta["pairs"].get("val"):
        lines.append("  warning: no val pairs (raise --val_fraction?)")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# benchmark: the full prepare vs. bare tiktoken encoding of exactly the texts it tokenizes


def bench(cfg):
    name, paths = _sources(cfg, print)
    opts = SimpleNamespace(**vars(cfg))
    if paths is None:
        opts.format, rows = "standard", list(enumerate(make_toy_pairs(cfg.toy_pairs, cfg.seed), 1))
    else:
        rows = list(iter_rows(paths, SimpleNamespace()))
    opts.format = opts.format if opts.format != "auto" else detect_format(rows[0][1], opts)
    texts = []  # exactly the strings prepare tokenizes
    for _, row in rows:
        try:
            row = json.loads(row) if isinstance(row, bytes) else row
            if isinstance(row, dict):
                texts += EXTRACT[opts.format](row, opts)[:3]
        except (Skip, ValueError):
            pass
    enc, cores, n = gpt2_encoding(), _cores(), len(texts) // 3
    with tempfile.TemporaryDirectory() as tmp:
        run = lambda workers: prepare(SimpleNamespace(**{**vars(cfg), "bench": 0, "num_workers": workers,
                                                         "out_dir": os.path.join(tmp, "out")}), log=None)
        cases = {f"full prepare, {cores} worker processes": lambda: run(cores),
                 "full prepare, 1 process": lambda: run(1),
                 f"bare enc.encode_ordinary_batch(num_threads={cores})": lambda: enc.encode_ordinary_batch(texts, num_threads=cores),
                 "bare enc.encode_ordinary loop, 1 thread": lambda: [enc.encode_ordinary(t) for t in texts]}
        times, cpu = collections.defaultdict(list), collections.defaultdict(list)
        for _ in range(3):  # round robin, so a change in machine load hits every case alike
            for k, fn in cases.items():
                t, c = time.perf_counter(), sum(os.times()[:4])  # cpu: this process and its finished workers
                fn()
                times[k].append(time.perf_counter() - t)
                cpu[k].append(sum(os.times()[:4]) - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"bench: {len(rows):,} rows -> {n:,} pairs, {sum(map(len, texts)) / 1e6:.1f} MB of text, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f} (median of 3)")
    for k, t in med.items():
        print(f"  {k:<48} {t:7.3f}s {n / t:9,.0f} pairs/s   cpu {statistics.median(cpu[k]):.2f}s")
    t_prep, (t_batch, t_loop) = med[next(iter(med))], list(med.values())[2:]
    print(f"  ratio full prepare / bare encode: {t_prep / t_batch:.2f}x (batch call), {t_prep / t_loop:.2f}x (loop)")
    return med


def main(argv):
    try:
        cfg = parse_args(argv)
        if cfg.bench:
            validate(cfg)
            bench(cfg)
        else:
            prepare(cfg)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
