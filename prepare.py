"""
prepare.py: turn preference datasets into token shards that dpo.py memory-maps. The input formats, tokens and
truncation, the train/val split, skipped rows and the shard layout: README.md, "Data format".

    python prepare.py                                   # toy task -> data/toy/ (offline, a few seconds)
    python prepare.py --dataset=hh                      # Anthropic HH-RLHF harmless-base -> data/hh/
    python prepare.py --input=pairs.jsonl.gz --format=auto --max_length=512
    python prepare.py --help                            # all options (its speed: python bench.py --prepare=1)
"""

import concurrent.futures
import contextlib
import difflib
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import tiktoken

from shards import MAGIC, VERSION, ShardWriter
from toy import TOY_SPLIT, TOY_VAL_ITEMS, make_toy_pairs

EOT = 50256  # <|endoftext|> in GPT-2 BPE
HUMAN, ASSIST = "\n\nHuman:", "\n\nAssistant:"
ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}
FORMATS = ("hh", "standard", "implicit", "conversational")
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
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
}

class PrepareError(Exception):
    """Bad options or input: the message says what and where."""

def parse_args(argv):
    cfg = SimpleNamespace(**{k: d for k, (d, _) in OPTIONS.items()})
    for arg in argv:
        if arg in ("-h", "--help"):
            options = [f"  {f'--{k}={d}':<32} {h}" for k, (d, h) in OPTIONS.items()]
            print(__doc__ + "\noptions:\n" + "\n".join(options))
            sys.exit(0)
        key, eq, val = arg[2:].partition("=")
        if not arg.startswith("--") or key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise PrepareError(f"unknown option {arg!r}{hint}; valid keys: " + ", ".join(OPTIONS))
        default = OPTIONS[key][0]
        if not eq and not isinstance(default, int):  # a bare --flag means 1
            raise PrepareError(f"--{key} needs a value: --{key}=...")
        try:
            setattr(cfg, key, type(default)(val) if eq else 1)
        except ValueError:
            raise PrepareError(f"--{key} expects {type(default).__name__}, got {val!r}") from None
    return cfg

def validate(cfg):
    if cfg.format not in ("auto",) + FORMATS:
        raise PrepareError(f"--format must be auto or one of {FORMATS}, got {cfg.format!r}")
    if cfg.hh_mismatch not in ("recover", "skip"):
        raise PrepareError("--hh_mismatch must be recover or skip")
    if cfg.hh_split not in ("train", "test", "both"):
        raise PrepareError("--hh_split must be train, test or both")
    if not cfg.input and cfg.dataset not in ("toy", "hh"):
        raise PrepareError(f"--dataset must be toy or hh (or give --input), got {cfg.dataset!r}")
    if not 1 <= cfg.max_prompt_length <= cfg.max_length:
        raise PrepareError("need 1 <= --max_prompt_length <= --max_length")
    if not 0 <= cfg.val_fraction < 1:
        raise PrepareError("--val_fraction must be in [0, 1)")
    if min(cfg.shard_pairs, cfg.batch_rows, cfg.toy_pairs) < 1:
        raise PrepareError("--shard_pairs, --batch_rows, --toy_pairs must be >= 1")
    if cfg.shard_pairs * 2 * cfg.max_length >= 2**31:
        raise PrepareError("a shard's token count must fit int32: lower --shard_pairs")

# -----------------------------------------------------------------------------
# input: files -> rows (read lazily) -> (prompt, chosen, rejected, note); a bad row raises Skip

class Skip(Exception):
    """A bad row: skipped, and counted under its reason."""

def need(ok, reason):
    if not ok:
        raise Skip(reason)

def _json_array(f, path):  # a .json file: one array, parsed whole (not streamed)
    try:
        rows = json.load(f)
    except ValueError as e:
        raise PrepareError(f"{path}:{getattr(e, 'lineno', '?')}: not a valid JSON array ({e}); "
                           "a file of one JSON object per line should be named .jsonl") from None
    if not isinstance(rows, list):
        raise PrepareError(f"{path}:1: expected a JSON array of objects, got {type(rows).__name__}")
    return rows

def iter_rows(paths, state):
    """Yield (where, row), row: a JSON Lines line's bytes (the workers parse it) or an object.
    state: how far it read. Not the claimed format at all (not JSON, broken gzip, empty) is fatal"""
    for path in paths:
        gz = path.endswith(".gz")
        state.raw = raw = open(path, "rb")  # its position is the progress (compressed bytes read)
        f = gzip.GzipFile(fileobj=raw) if gz else raw
        n = rows = 0
        try:
            if path.removesuffix(".gz").endswith(".json"):
                f = _json_array(f, path)
            for n, row in enumerate(f, 1):
                if isinstance(row, bytes) and not row.strip():
                    continue
                if isinstance(row, bytes) and not rows:  # the first row tells if it is JSON Lines
                    try:
                        row = json.loads(row)
                    except ValueError as e:
                        raise PrepareError(f"{path}:{n}: not valid JSON ({e}); expected JSON Lines "
                                           "(one object per line), .jsonl.gz or a .json array") from None
                rows += 1
                yield (n if len(paths) == 1 else f"{Path(path).name}:{n}"), row
        except (EOFError, OSError, zlib.error) as e:  # truncated or corrupt gzip stream
            raise PrepareError(f"{path}: broken {'gzip ' if gz else ''}file after line {n}: {e}; "
                               "re-download or re-create it") from None
        finally:
            raw.close()
        if not rows:
            raise PrepareError(f"{path}:1: empty file (no rows); expected one JSON object per line")
        state.done_bytes += os.path.getsize(path)

def _text(row, key):
    need(key in row, "missing_field")
    need(isinstance(row[key], str), "wrong_type")
    return row[key]

def _checked(prompt, chosen, rejected, note=None):
    need(prompt.strip() and chosen.strip() and rejected.strip(), "empty_text")
    need(chosen != rejected, "identical")
    return prompt, chosen, rejected, note

def extract_standard(row, o):
    return _checked(_text(row, o.prompt_key), _text(row, o.chosen_key), _text(row, o.rejected_key))

def extract_hh(row, o):
    chosen, rejected = _text(row, o.chosen_key), _text(row, o.rejected_key)
    need(chosen.strip() and rejected.strip(), "empty_text")
    k, note = chosen.rfind(ASSIST), None
    need(k >= 0, "no_assistant_turn")
    while not rejected.startswith(chosen[:k + len(ASSIST)]):  # they part before chosen's last turn
        k, note = chosen.rfind(ASSIST, 0, k), "prompt_mismatch_recovered"
        need(o.hh_mismatch == "recover" and k >= 0, "prompt_mismatch")
    n = k + len(ASSIST)
    return _checked(chosen[:n], chosen[n:], rejected[n:], note)

def extract_implicit(row, o):
    chosen, rejected = _text(row, o.chosen_key), _text(row, o.rejected_key)
    need(chosen != rejected, "identical")
    common = os.path.commonprefix([chosen, rejected])
    n, shorter = len(common), min(len(chosen), len(rejected))
    if ASSIST in common:
        n = common.rfind(ASSIST) + len(ASSIST)
    else:  # back up to whitespace that starts both responses
        while n > 0 and not (n < shorter and chosen[n].isspace() and rejected[n].isspace()):
            n -= 1
    need(n > 0, "no_shared_prompt")
    return _checked(chosen[:n], chosen[n:], rejected[n:])

def _messages(value, is_prompt=False):  # -> [(role, content)]
    if is_prompt and isinstance(value, str):  # a bare prompt string is one user message
        value = [{"role": "user", "content": value}]
    need(isinstance(value, list), "wrong_type")
    for m in value:
        need(isinstance(m, dict) and m.get("role") in ROLES, "wrong_type")
        need(isinstance(m.get("content"), str), "wrong_type")
    return [(m["role"], m["content"]) for m in value]

def _render(messages):  # HH's layout: "\n\nHuman: ...\n\nAssistant: ..."
    return "".join(f"\n\n{ROLES[role]}: {content}" for role, content in messages)

def extract_conversational(row, o):
    need(o.chosen_key in row and o.rejected_key in row, "missing_field")
    chosen, rejected = _messages(row[o.chosen_key]), _messages(row[o.rejected_key])
    if o.prompt_key in row:  # the prompt may or may not be repeated inside chosen/rejected
        prompt = _messages(row[o.prompt_key], is_prompt=True)
        if chosen[:len(prompt)] != prompt:
            chosen = prompt + chosen
        if rejected[:len(prompt)] != prompt:
            rejected = prompt + rejected
    need(chosen and rejected, "empty_text")
    need(chosen != rejected, "identical")
    k = len(os.path.commonprefix([chosen, rejected]))  # the messages both share are the prompt
    need(k > 0, "no_shared_prompt")
    need(k < len(chosen) and k < len(rejected), "empty_text")
    need(chosen[k][0] == "assistant" and rejected[k][0] == "assistant", "prompt_mismatch")
    # a response: its first reply's text (after "Assistant:"), then any later turns
    chosen_text = " " + chosen[k][1] + _render(chosen[k + 1:])
    rejected_text = " " + rejected[k][1] + _render(rejected[k + 1:])
    return _checked(_render(chosen[:k]) + ASSIST, chosen_text, rejected_text)

EXTRACT = {"hh": extract_hh, "standard": extract_standard, "implicit": extract_implicit,
           "conversational": extract_conversational}

def detect_format(row, o, where):
    if isinstance(row, dict):
        chosen, rejected = row.get(o.chosen_key), row.get(o.rejected_key)
        if isinstance(chosen, list) and isinstance(rejected, list):
            return "conversational"
        if isinstance(chosen, str) and isinstance(rejected, str):
            if isinstance(row.get(o.prompt_key), str):
                return "standard"
            return "hh" if HUMAN in chosen and ASSIST in chosen else "implicit"
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise PrepareError(f"{where}: unknown format (row has {keys}); expected chosen/rejected strings or "
                       "message lists: pass --format and --prompt_key/--chosen_key/--rejected_key")

# -----------------------------------------------------------------------------
# tokenizing (batches of rows, in worker processes or inline) and writing shards

def gpt2_encoding():
    """tiktoken's GPT-2 BPE; its first use downloads two small files, which can fail offline"""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests / urllib errors, depending on the tiktoken version
        raise PrepareError(
            f"could not load tiktoken's GPT-2 tokenizer ({type(e).__name__}: {str(e)[:200]}). "
            "Its first use downloads vocab.bpe and encoder.json from "
            "openaipublic.blob.core.windows.net into tiktoken's cache folder ($TIKTOKEN_CACHE_DIR, "
            "default data-gym-cache in the temp folder), which names each file by the SHA-1 of its "
            "URL, so copying vocab.bpe into a folder is not enough. Fill one on a machine online "
            "with: TIKTOKEN_CACHE_DIR=DIR python -c "
            "\"import tiktoken; tiktoken.get_encoding('gpt2')\", then copy DIR here and set "
            "TIKTOKEN_CACHE_DIR to it") from None

def truncate(p, c, r, max_length, max_prompt_length):
    """Cut token lists: the prompt loses its start (if the pair is too long), responses their end"""
    cut_p = len(p) + max(len(c), len(r)) > max_length and len(p) > max_prompt_length
    p = p[-max_prompt_length:] if cut_p else p
    room = max(max_length - len(p), 0)
    return p, c[:room], r[:room], (cut_p, len(c) > room, len(r) > room)

class Tokenized(NamedTuple):  # process_batch's result for one batch of rows
    rows: int
    skips: list  # [(where, reason)]
    notes: list  # [(where, note)]
    arrays: dict  # split -> (lengths (k, 3) int32, tokens uint16)
    cuts: np.ndarray  # (4,) pairs truncated, prompts cut, chosen cut, rejected cut

def process_batch(batch, o):
    """[(where, row)] -> Tokenized"""
    enc = gpt2_encoding()
    lengths, tokens = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    skips, notes, cuts = [], [], np.zeros(4, dtype=np.int64)
    late = []  # rows skipped after tokenizing, listed after the others
    for where, row in batch:
        try:
            if isinstance(row, bytes):
                try:
                    row = json.loads(row)
                except ValueError:
                    raise Skip("malformed_json") from None
            need(isinstance(row, dict), "wrong_type")
            prompt, chosen, rejected, note = EXTRACT[o.format](row, o)
        except Skip as e:
            skips.append((where, e.args[0]))
            continue
        if note:
            notes.append((where, note))
        if o.split_mode == "toy" and prompt in TOY_SPLIT:
            split = TOY_SPLIT[prompt]
        else:  # by a hash of the prompt, so no prompt is in both splits
            h = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
            split = "val" if int.from_bytes(h, "little") / 2**64 < o.val_fraction else "train"
        # encode_ordinary: "<|endoftext|>" inside a text is plain text, not EOT
        p = enc.encode_ordinary(prompt)
        c = enc.encode_ordinary(chosen)
        r = enc.encode_ordinary(rejected)
        p, c, r, cut = truncate(p, c + [EOT], r + [EOT], o.max_length, o.max_prompt_length)
        if not (p and c and r):  # (p is never empty: its text is not blank)
            late.append((where, "empty_after_truncation"))
        elif c == r:
            late.append((where, "identical_after_truncation"))
        else:
            lengths[split].append((len(p), len(c), len(r)))
            tokens[split].extend(p + c + r)
            cuts += (any(cut), *cut)
    arrays = {}
    for s in SPLITS:
        arrays[s] = (np.array(lengths[s], np.int32).reshape(-1, 3), np.array(tokens[s], np.uint16))
    return Tokenized(len(batch), skips + late, notes, arrays, cuts)

def _cores():  # the cores this process may use
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

def _batches(rows, size):  # lists of size rows (the last one shorter)
    while batch := list(itertools.islice(rows, size)):
        yield batch

def _start_worker(parent):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and SIGTERM and ends the pool
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_without, args=(parent,), daemon=True).start()

def _exit_without(parent):  # the workers of a parent killed by SIGKILL would wait for work forever
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)

def tokenized_batches(rows, opts):
    """process_batch's results in input order, computed here (1 worker) or in a pool of processes"""
    workers = opts.num_workers or _cores()
    batches = _batches(rows, opts.batch_rows)
    gpt2_encoding()  # loaded here once (a clear error offline); forked workers inherit it
    if workers == 1:
        for batch in batches:
            yield process_batch(batch, opts)
        return
    # not a multiprocessing.Pool: it could hang on a worker killed while it sends a result
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else None)
    with concurrent.futures.ProcessPoolExecutor(workers, ctx, _start_worker, (os.getpid(),)) as ex:
        pending = []  # at most 2 batches per worker in flight, so memory stays flat
        try:
            for batch in batches:
                pending.append(ex.submit(process_batch, batch, opts))
                if len(pending) >= 2 * workers:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise PrepareError("a tokenizer process died (out of memory?); try fewer --num_workers") from None

# -----------------------------------------------------------------------------
# the whole run

def download(url, dest, log=print):
    """Fetch url to dest unless it exists -> str(dest); a failure leaves nothing (OSError: why)"""
    dest = Path(dest)
    if dest.exists():
        if log:
            log(f"using {dest} (delete it to download again)")
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.partial")  # ranks may download at once
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total, done, t0, shown = int(r.headers.get("Content-Length") or 0), 0, time.time(), 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if time.time() - shown > 0.5 or done == total:  # progress on stderr, twice a second
                    shown = time.time()
                    size = f"{done / 1e6:.1f} MB"
                    if total:
                        size = f"{done / 1e6:.1f} / {total / 1e6:.1f} MB {100 * done / total:5.1f}%"
                    speed = done / 1e6 / max(shown - t0, 1e-9)
                    print(f"\rdownloading {url}: {size} {speed:.1f} MB/s", end="", file=sys.stderr,
                          flush=True)
        print(file=sys.stderr)
        if total and done != total:  # a connection that closed early leaves no "complete" file
            raise OSError(f"incomplete, got {done} of {total} bytes")
        os.replace(tmp, dest)
    except OSError as e:  # URLError, HTTPError, timeouts, disk full
        raise OSError(f"could not download {url}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return str(dest)

def _sources(cfg, log):  # -> (name, input paths or None for toy)
    if cfg.input:
        paths = cfg.input.split(",")
        for p in paths:
            if not os.path.isfile(p):
                raise PrepareError(f"{p}: no such file (--input)")
        return Path(paths[0]).name.split(".")[0], paths
    if cfg.dataset == "toy":
        return "toy", None
    splits = ["train", "test"] if cfg.hh_split == "both" else [cfg.hh_split]
    for s in cfg.hh_subsets.split(","):
        if s not in HH_SUBSETS:
            raise PrepareError(f"unknown HH subset {s!r}; choose from {', '.join(HH_SUBSETS)}")
    files = [f"{s}/{split}.jsonl.gz" for s in cfg.hh_subsets.split(",") for split in splits]
    try:
        paths = [download(f"{cfg.hh_base_url}/{f}", Path(cfg.download_dir) / f, log) for f in files]
    except OSError as e:
        raise PrepareError(f"{e} (set --hh_base_url, or pass a local file with --input)") from None
    return "hh", paths

@contextlib.contextmanager
def staged(out_dir, t0):
    """Yield a hidden sibling folder (same filesystem) to write in; one rename makes it out_dir.
    An error, Ctrl-C or SIGTERM removes it, and the previous output stays."""
    for d in out_dir.parent.glob(".*.tmp-*-*"):  # staging of a run killed by SIGKILL goes too
        try:
            os.kill(int(d.name.split("-")[-2]), 0)  # signal 0 only checks that the process exists
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (PermissionError, ValueError):  # another user's running process, or not ours
            pass
    made = [d for d in [out_dir.parent, *out_dir.parent.parents] if not d.exists()]  # go on failure
    stage = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{t0}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{t0}"
    try:
        stage.mkdir(parents=True)
        yield stage
        if out_dir.exists():
            os.replace(out_dir, old)  # the previous output steps aside only for the swap
        os.replace(stage, out_dir)
    except BaseException as e:
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        if isinstance(e, OSError):  # disk full, read-only folder, ...
            raise PrepareError(f"could not write {out_dir}: {e.strerror or e}; the previous "
                               "output, if any, is unchanged") from None
        raise
    finally:  # nothing else is left
        for d in (stage, old):
            shutil.rmtree(d, ignore_errors=True)
        for d in made:  # deepest first; only a failed run leaves them empty
            if d.exists() and not os.listdir(d):
                d.rmdir()

def _count(tally, items):  # per reason: how many, and the first 5 source lines
    for where, reason in items:
        entry = tally.setdefault(reason, {"count": 0, "first_lines": []})
        entry["count"] += 1
        if len(entry["first_lines"]) < 5:
            entry["first_lines"].append(where)

def prepare(cfg, log=print):
    """The whole run -> the meta dict (also in meta.json); log prints the summary (None: silent)"""
    validate(cfg)
    t0 = time.time()
    name, paths = _sources(cfg, log)
    out_dir = Path(cfg.out_dir or f"data/{name}")
    # out_dir may hold only what prepare.py and dpo.py (its reference caches) write there
    ours = re.compile(r"meta\.json|(train|val)_\d{6}\.bin|ref_logps_\w+\.pt(\.tmp\d+)?")
    if out_dir.exists() and not all(ours.fullmatch(f) for f in os.listdir(out_dir)):
        raise PrepareError(f"{out_dir} holds files prepare.py did not write; refusing to replace "
                           "it (pick another --out_dir)")
    opts = SimpleNamespace(**vars(cfg), split_mode="toy" if paths is None else "hash")
    state = SimpleNamespace(raw=None, done_bytes=0)  # how far iter_rows has read
    if paths is None:  # toy rows are dicts in the standard format
        opts.format, opts.prompt_key = "standard", "prompt"
        opts.chosen_key, opts.rejected_key = "chosen", "rejected"
        rows = iter(enumerate(make_toy_pairs(cfg.toy_pairs, cfg.seed), 1))
    else:
        rows = iter_rows(paths, state)
    first = next(rows)  # iter_rows raises on an empty file
    if opts.format == "auto":
        opts.format = detect_format(first[1], opts, f"{paths[0]}:{first[0]}")
    with staged(out_dir, t0) as stage:
        writers = {s: ShardWriter(stage, s, cfg.shard_pairs) for s in SPLITS}
        skipped, notes, truncated, nrows = {}, {}, np.zeros(4, dtype=np.int64), 0
        total = sum(map(os.path.getsize, paths)) if log and paths else 0  # 0: no progress line
        shown = t0
        for batch in tokenized_batches(itertools.chain([first], rows), opts):
            nrows += batch.rows
            truncated += batch.cuts
            _count(skipped, batch.skips)
            _count(notes, batch.notes)
            for s, (lengths, tokens) in batch.arrays.items():
                writers[s].add(lengths, tokens)
            if total and time.time() - shown > 1:  # on runs over a second
                shown = time.time()
                read = state.done_bytes + (0 if state.raw.closed else state.raw.tell())
                eta = (shown - t0) * (total - read) / max(read, 1)
                end = "\r" if sys.stderr.isatty() else "\n"
                print(f"prepare: {nrows:,} rows, {nrows / (shown - t0):,.0f} rows/s, "
                      f"{100 * read / total:.0f}%, eta {eta:.0f}s ", end=end, file=sys.stderr)
        if shown > t0 and sys.stderr.isatty():
            print(file=sys.stderr)
        bad = skipped.get("malformed_json", {"count": 0})
        if bad["count"] > nrows / 2:
            raise PrepareError(f"{paths[0]}: {bad['count']} of {nrows} lines are not valid "
                               f"JSON (first at line {bad['first_lines'][0]}): is this really a "
                               "JSON Lines file?")
        shards = {s: w.close() for s, w in writers.items()}
        pairs = {s: sum(x["pairs"] for x in shards[s]) for s in SPLITS}
        if not pairs["train"]:
            raise PrepareError(f"{','.join(paths or ['toy'])}: no train pairs left from {nrows} "
                               f"rows (skipped: {json.dumps(skipped)})")
        changed = [f"--{k}={getattr(cfg, k)}" for k, (d, _) in OPTIONS.items() if getattr(cfg, k) != d]
        meta = {"tokenizer": "gpt2", "eot_token": EOT, "magic": MAGIC, "version": VERSION,
                "dataset": name, "source": paths or "toy", "format": opts.format,
                "command": " ".join(["python prepare.py"] + changed), "options": vars(cfg),
                "rows_read": nrows, "pairs": pairs,
                "tokens": {s: sum(x["tokens"] for x in shards[s]) for s in SPLITS},
                "shards": shards, "skipped": skipped, "notes": notes,
                "truncated": dict(zip(("pairs", "prompts", "chosen", "rejected"), map(int, truncated))),
                "seconds": round(time.time() - t0, 3)}
        if paths is None:
            meta["toy_val_items"] = TOY_VAL_ITEMS
        (stage / "meta.json").write_text(json.dumps(meta, indent=1))
    if log:
        log(summary(meta, out_dir))
    return meta

def _first_lines(tally_entry):  # "3, 7, 9, ..." (the ... when there are more)
    more = ", ..." if tally_entry["count"] > len(tally_entry["first_lines"]) else ""
    return ", ".join(map(str, tally_entry["first_lines"])) + more

def summary(meta, out_dir):
    skipped, t, p, n = meta["skipped"], meta["truncated"], meta["pairs"], meta["tokens"]
    lines = [f"prepare: {out_dir} ({meta['format']}, gpt2 tokens) in {meta['seconds']:.1f}s",
             f"  rows read   {meta['rows_read']:,}",
             f"  written     train {p['train']:,} pairs ({n['train']:,} tokens), "
             f"val {p['val']:,} pairs ({n['val']:,} tokens)",
             f"  skipped     {sum(v['count'] for v in skipped.values()):,}"]
    for reason, v in skipped.items():
        lines.append(f"    {reason:<28} {v['count']:>7,}  (lines {_first_lines(v)})")
    for note, v in meta["notes"].items():
        lines.append(f"  note: {note} {v['count']:,} (lines {_first_lines(v)})")
    lines.append(f"  truncated   {t['pairs']:,} pairs (prompts {t['prompts']:,}, "
                 f"chosen {t['chosen']:,}, rejected {t['rejected']:,})")
    if not p["val"]:
        lines.append("  warning: no val pairs (raise --val_fraction?)")
    return "\n".join(lines)

def main(argv):
    try:
        prepare(parse_args(argv))
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("prepare.py: interrupted; nothing was written (the previous output, if any, "
              "is unchanged)", file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill or a scheduler: as Ctrl-C
    main(sys.argv[1:])
