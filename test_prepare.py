"""
prepare.py: formats, tokens, truncation, split, skip accounting, fatal inputs, the output folder,
shard reader, toy task. References are independent of prepare.py: literal expected strings,
tiktoken's own encode(), a naive byte-level parse of the shard layout, and a separate
re-implementation of the HH prompt rule.
"""
import collections
import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import prepare as P
import shards
import toy
from testlib import EOT, HH_FILE, HH_MISSING, ROOT, cli


ENC = tiktoken.get_encoding("gpt2")
ASSIST = "\n\nAssistant:"


def enc(text):  # the reference encoding: plain text, special-looking strings included
    return ENC.encode(text, disallowed_special=())


def ref_pair(prompt, chosen, rejected):
    return enc(prompt), enc(chosen) + [EOT], enc(rejected) + [EOT]


def write_rows(path, rows):
    """rows: dicts (json-dumped) or raw strings (written as-is), one per line; .gz compresses, .json = array."""
    path = Path(path)
    if path.name.endswith(".json"):
        path.write_text(json.dumps(rows))
        return path
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def run(tmp_path, rows, *args, name="in.jsonl", out="out"):
    path = rows if isinstance(rows, Path) else write_rows(tmp_path / name, rows)
    cfg = P.parse_args([f"--input={path}", f"--out_dir={tmp_path / out}", "--val_fraction=0",
                        *args])
    return P.prepare(cfg, log=None), tmp_path / out


def read_split(out, split="train"):
    pairs = []
    for path in shards.list_shards(out, split):
        shard = shards.load_pairs(path)
        pairs += [tuple(x.tolist() for x in shard[i]) for i in range(len(shard))]
    return pairs


def read_all(out):
    return [p for s in ("train", "val") if list(Path(out).glob(f"{s}_*.bin")) for p in read_split(out, s)]


# -----------------------------------------------------------------------------
# formats: decoded tokens equal the source prompt and responses (+ end token)


HH_ROWS = [
    {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
     "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."},
    {"chosen": "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: d!",
     "rejected": "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: e?"},
]


HH_EXPECTED = [
    ("\n\nHuman: Hi there\n\nAssistant:", " Hello! How can I help?", " Go away."),
    ("\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant:", " d!", " e?"),
]


def test_hh_format(tmp_path):
    meta, out = run(tmp_path, HH_ROWS)
    assert meta["format"] == "hh"  # auto-detected
    pairs = read_split(out)
    assert pairs == [ref_pair(*e) for e in HH_EXPECTED]
    for (p, c, r), (ep, ec, er) in zip(pairs, HH_EXPECTED):
        assert (ENC.decode(p), ENC.decode(c), ENC.decode(r)) == (ep, ec + "<|endoftext|>",
                                                                 er + "<|endoftext|>")


def test_standard_format_custom_keys(tmp_path):
    rows = [{"q": "Question: 2+2?", "good": " Four.", "bad": " Five.", "extra": 1},
            {"q": "Name a color:", "good": " blue", "bad": " seven"}]
    for fmt in ("auto", "standard"):
        meta, out = run(tmp_path, rows, "--prompt_key=q", "--chosen_key=good", "--rejected_key=bad",
                        f"--format={fmt}")
        assert meta["format"] == "standard"
        assert read_split(out) == [ref_pair("Question: 2+2?", " Four.", " Five."),
                                   ref_pair("Name a color:", " blue", " seven")]


def test_implicit_format(tmp_path):
    rows = [{"chosen": "The capital of France is Paris.",
             "rejected": "The capital of France is Rome."},
            {"chosen": "\n\nHuman: hi\n\nAssistant: I like it",
             "rejected": "\n\nHuman: hi\n\nAssistant: I hate it"},
            {"chosen": "Answer: yes", "rejected": "Answer: yes, but no"}]
    meta, out = run(tmp_path, rows, "--format=implicit")
    assert read_split(out) == [ref_pair("The capital of France is", " Paris.", " Rome."),  # cut at whitespace
                               ref_pair("\n\nHuman: hi\n\nAssistant:", " I like it", " I hate it"),  # turn boundary
                               ref_pair("Answer:", " yes", " yes, but no")]
    meta, out = run(tmp_path, rows[:1])
    assert meta["format"] == "implicit"  # auto: no prompt field, no HH transcript


def test_conversational_format(tmp_path):
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    rows = [{"chosen": [u("What is 2+2?"), a("4")], "rejected": [u("What is 2+2?"), a("5")]},
            {"prompt": [{"role": "system", "content": "Be nice."}, u("Hi")],
             "chosen": [a("Hello!")], "rejected": [a("What?")]},
            {"prompt": "Tell a joke", "chosen": [u("Tell a joke"), a("Knock knock")],
             "rejected": [u("Tell a joke"), a("No.")]},
            {"chosen": [u("q"), a("a1"), u("more?"), a("a2")], "rejected": [u("q"), a("b1")]}]
    meta, out = run(tmp_path, rows)
    assert meta["format"] == "conversational"
    expected = [("\n\nHuman: What is 2+2?\n\nAssistant:", " 4", " 5"),
                ("\n\nSystem: Be nice.\n\nHuman: Hi\n\nAssistant:", " Hello!", " What?"),
                ("\n\nHuman: Tell a joke\n\nAssistant:", " Knock knock", " No."),
                ("\n\nHuman: q\n\nAssistant:", " a1\n\nHuman: more?\n\nAssistant: a2", " b1")]
    assert read_split(out) == [ref_pair(*e) for e in expected]
    # the template is HH's: the same pair as an HH transcript gives the same tokens
    _, out2 = run(tmp_path, [{"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4",
                              "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"}], out="out2")
    assert read_split(out2)[0] == read_split(out)[0]


@pytest.mark.parametrize("name", ["in.json", "in.jsonl.gz", "in.json.gz"])
def test_json_array_and_gzip_inputs(tmp_path, name):
    path = tmp_path / name
    if name == "in.json.gz":
        with gzip.open(path, "wt") as f:
            json.dump(HH_ROWS, f)
    else:
        write_rows(path, HH_ROWS)
    meta, out = run(tmp_path, path)
    assert meta["rows_read"] == 2 and meta["pairs"]["train"] == 2
    assert read_split(out) == [ref_pair(*e) for e in HH_EXPECTED]


def test_endoftext_in_text_is_plain_text(tmp_path):
    rows = [{"prompt": "a <|endoftext|> b:", "chosen": " x<|endoftext|>y",
             "rejected": " <|endoftext|>"}]
    _, out = run(tmp_path, rows)
    (p, c, r), = read_split(out)
    assert (p, c, r) == ref_pair("a <|endoftext|> b:", " x<|endoftext|>y", " <|endoftext|>")
    assert EOT not in p and EOT not in c[:-1] and EOT not in r[:-1] and c[-1] == r[-1] == EOT
    assert ENC.decode(c[:-1]) == " x<|endoftext|>y"


# -----------------------------------------------------------------------------
# truncation


def words(n, tag):  # text of n distinct words
    return "".join(f" {tag}{i}" for i in range(n))


def test_truncation_rules(tmp_path):
    long_prompt, mid_prompt = "Q:" + words(60, "p"), "Q:" + words(12, "m")
    rows = [{"prompt": long_prompt, "chosen": " yes", "rejected": words(40, "r")},  # prompt and rejected cut
            {"prompt": mid_prompt, "chosen": " ok", "rejected": " no"},  # fits: nothing cut
            {"prompt": mid_prompt, "chosen": words(20, "c"), "rejected": " no"}]  # too long: only the prompt is cut
    meta, out = run(tmp_path, rows, "--max_length=64", "--max_prompt_length=16")
    got = read_split(out)
    P0, C0, R0 = ref_pair(*rows[0].values())
    assert len(P0) > 16 and len(R0) > 48
    # prompt keeps its end; rejected loses its end (and its EOT)
    assert got[0] == (P0[-16:], C0, R0[:48])
    assert got[0][2][-1] != EOT
    assert got[1] == ref_pair(*rows[1].values())
    P2, C2, R2 = ref_pair(*rows[2].values())
    assert len(P2) + len(C2) > 64 and len(P2) > 16 and 16 + len(C2) <= 64
    assert got[2] == (P2[-16:], C2, R2)
    assert meta["truncated"] == {"prompts": 2, "chosen": 0, "rejected": 1, "pairs": 2}
    assert all(len(p) + max(len(c), len(r)) <= 64 for p, c, r in got)


def test_truncation_skips(tmp_path):
    rows = [{"prompt": "Q:", "chosen": " fine", "rejected": " bad"},
            {"prompt": "Q:" + words(30, "p"), "chosen": " a", "rejected": " b"},  # prompt fills max_length: no room
            {"prompt": "Q:", "chosen": words(40, "s") + " A", "rejected": words(40, "s") + " B"}]  # same after cut
    meta, out = run(tmp_path, rows, "--max_length=16", "--max_prompt_length=16")
    assert meta["skipped"]["empty_after_truncation"] == {"count": 1, "first_lines": [2]}
    assert meta["skipped"]["identical_after_truncation"] == {"count": 1, "first_lines": [3]}
    assert read_split(out) == [ref_pair("Q:", " fine", " bad")]


# -----------------------------------------------------------------------------
# split by prompt, determinism, sharding


def test_split_by_prompt_and_determinism(tmp_path):
    rows = [{"prompt": f"Prompt number {i}:", "chosen": f" good {j}", "rejected": f" bad {j}"}
            for i in range(120) for j in range(3)]
    path = write_rows(tmp_path / "in.jsonl", rows)
    outs = []
    for k, args in enumerate([["--num_workers=1"], ["--num_workers=2", "--batch_rows=7"],
                              ["--num_workers=1"]]):
        cfg = P.parse_args([f"--input={path}", f"--out_dir={tmp_path / f'o{k}'}",
                            "--val_fraction=0.3", *args])
        P.prepare(cfg, log=None)
        outs.append(tmp_path / f"o{k}")
    prompts = {s: {ENC.decode(p) for p, _, _ in read_split(outs[0], s)} for s in ("train", "val")}
    assert prompts["train"] and prompts["val"] and not prompts["train"] & prompts["val"]
    assert 0.1 < len(prompts["val"]) / 120 < 0.5
    assert len(read_split(outs[0], "train")) + len(read_split(outs[0], "val")) == 360
    for o in outs[1:]:  # byte-identical across runs and worker counts
        for f in ("train_000000.bin", "val_000000.bin"):
            assert (o / f).read_bytes() == (outs[0] / f).read_bytes()


def test_shards_bounded_and_ordered(tmp_path):
    rows = [{"prompt": f"P{i}:", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(20)]
    meta, out = run(tmp_path, rows, "--shard_pairs=7", "--batch_rows=3", "--num_workers=1")
    paths = shards.list_shards(out, "train")
    assert [Path(p).name for p in paths] == ["train_000000.bin", "train_000001.bin",
                                             "train_000002.bin"]
    assert [len(shards.load_pairs(p)) for p in paths] == [7, 7, 6]
    assert [s["pairs"] for s in meta["shards"]["train"]] == [7, 7, 6]
    assert read_split(out) == [ref_pair(*r.values()) for r in rows]
    # a rerun with fewer shards replaces the whole folder: no stale shard is left behind
    run(tmp_path, rows, "--shard_pairs=100")
    assert sorted(f.name for f in out.iterdir()) == ["meta.json", "train_000000.bin"]


# -----------------------------------------------------------------------------
# every row accounted for: bad rows are skipped with a reason and line number


def test_bad_rows_counted(tmp_path, capsys):
    good = HH_ROWS[0]
    lines = [good,                                                                             # 1
             '{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y", "rejected": ',                   # 2 malformed json
             {"chosen": "\n\nHuman: x\n\nAssistant: y"},                                        # 3 missing field
             {"chosen": 5, "rejected": "\n\nHuman: x\n\nAssistant: y"},                         # 4 wrong type
             "",                                                                                # 5 blank: not a row
             {"chosen": "\n\nHuman: x\n\nAssistant: ", "rejected": "\n\nHuman: x\n\nAssistant: y"},  # 6 empty
             {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: y"},  # 7 identical
             "[1, 2]",                                                                          # 8 not an object
             {"chosen": "no turns here", "rejected": "none here"},                              # 9 no assistant
             {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: b"},  # 10 mismatch
             {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",             # 11 recoverable
              "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: X\n\nAssistant: e"},
             HH_ROWS[1]]                                                                        # 12
    path = write_rows(tmp_path / "in.jsonl", lines)
    cfg = P.parse_args([f"--input={path}", f"--out_dir={tmp_path / 'out'}", "--val_fraction=0"])
    meta = P.prepare(cfg)  # prints the summary
    expected_skips = {"malformed_json": [2], "missing_field": [3], "wrong_type": [4, 8],
                      "empty_text": [6], "identical": [7], "no_assistant_turn": [9],
                      "prompt_mismatch": [10]}
    assert meta["skipped"] == {k: {"count": len(v), "first_lines": v} for k, v in expected_skips.items()}
    assert meta["notes"] == {"prompt_mismatch_recovered": {"count": 1, "first_lines": [11]}}
    assert meta["rows_read"] == 11 and meta["pairs"] == {"train": 3, "val": 0}
    assert read_split(tmp_path / "out") == [
        ref_pair(*HH_EXPECTED[0]),
        ref_pair("\n\nHuman: a\n\nAssistant:", " b\n\nHuman: c\n\nAssistant: d",
                 " b\n\nHuman: X\n\nAssistant: e"),
        ref_pair(*HH_EXPECTED[1])]
    printed = capsys.readouterr().out
    assert "rows read" in printed and "malformed_json" in printed and "prompt_mismatch" in printed
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"]["wrong_type"]["first_lines"] == [4, 8]
    # --hh_mismatch=skip: the recoverable row is skipped too
    meta, _ = run(tmp_path, path, "--hh_mismatch=skip", out="out2")
    assert meta["skipped"]["prompt_mismatch"] == {"count": 2, "first_lines": [10, 11]} and meta["notes"] == {}


@pytest.mark.parametrize("fmt,row,reason", [
    ("standard", {"prompt": ["x"], "chosen": " a", "rejected": " b"}, "wrong_type"),
    ("standard", {"prompt": "  ", "chosen": " a", "rejected": " b"}, "empty_text"),
    ("implicit", {"chosen": "abc", "rejected": "xyz"}, "no_shared_prompt"),
    ("conversational", {"chosen": [{"role": "robot", "content": "x"}], "rejected": []},
     "wrong_type"),
    ("conversational", {"chosen": "text", "rejected": [{"role": "user", "content": "x"}]},
     "wrong_type"),
    ("conversational", {"chosen": [{"role": "user", "content": "a"},
                                   {"role": "user", "content": "b"}],
                        "rejected": [{"role": "user", "content": "a"},
                                     {"role": "user", "content": "c"}]}, "prompt_mismatch"),
    ("conversational", {"chosen": [{"role": "assistant", "content": "a"}],
                        "rejected": [{"role": "assistant", "content": "b"}]}, "no_shared_prompt"),
])
def test_bad_rows_per_format(tmp_path, fmt, row, reason):
    good = {"standard": {"prompt": "Q:", "chosen": " a", "rejected": " b"},
            "implicit": {"chosen": "Q: a", "rejected": "Q: b"},
            "conversational": {"chosen": [{"role": "user", "content": "Q"},
                                          {"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "user", "content": "Q"},
                                            {"role": "assistant", "content": "b"}]}}[fmt]
    meta, _ = run(tmp_path, [good, row], f"--format={fmt}")
    assert meta["skipped"] == {reason: {"count": 1, "first_lines": [2]}} and meta["pairs"]["train"] == 1


# -----------------------------------------------------------------------------
# input that is not the claimed format: a clear error naming file and line, nothing written


def _gzip_truncated(path):
    write_rows(path, HH_ROWS * 400)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


FATAL = [  # (file name, writer, error regex after the file name)
    ("notjson.jsonl", lambda p: p.write_text("hello world\n" + json.dumps(HH_ROWS[0]) + "\n"), r":1: not valid JSON"),
    ("late.jsonl", lambda p: p.write_text("\n\nthis is prose\n"), r":3: not valid JSON"),
    ("trunc.jsonl.gz", _gzip_truncated, r": broken gzip file after line \d+"),
    ("notgzip.jsonl.gz", lambda p: p.write_text(json.dumps(HH_ROWS[0])), r": broken gzip file after line 0"),
    ("empty.jsonl", lambda p: p.write_text(""), r":1: empty file"),
    ("blank.jsonl", lambda p: p.write_text("\n  \n"), r":1: empty file"),
    ("empty.json", lambda p: p.write_text("[]"), r":1: empty file"),
    ("unknown.jsonl", lambda p: write_rows(p, [{"foo": 1}, HH_ROWS[0]]), r":1: unknown format"),
    ("obj.json", lambda p: p.write_text('{"a": 1}'), r":1: expected a JSON array"),
    ("bad.json", lambda p: p.write_text('[\n{"chosen": }]'), r":2: not a valid JSON array"),
    ("mostly.jsonl", lambda p: write_rows(p, [HH_ROWS[0]] + ["garbage"] * 5), r": 5 of 6 lines are not valid JSON"),
    ("allskipped.jsonl", lambda p: write_rows(p, [{"chosen": "x", "rejected": "x"}] * 3), r": .*no train pairs"),
]


@pytest.mark.parametrize("name,make,pattern", FATAL, ids=[f[0] for f in FATAL])
def test_fatal_inputs_write_nothing(tmp_path, name, make, pattern):
    path = tmp_path / name
    make(path)
    out = tmp_path / "out"
    cfg = P.parse_args([f"--input={path}", f"--out_dir={out}"])
    with pytest.raises(P.PrepareError, match=re.escape(str(path)) + pattern):
        P.prepare(cfg, log=None)
    assert not out.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == [name]  # no staging folders left behind


def test_offline_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(P.tiktoken, "get_encoding", offline)
    out = tmp_path / "out"
    with pytest.raises(P.PrepareError, match="TIKTOKEN_CACHE_DIR"):
        P.prepare(P.parse_args([f"--out_dir={out}", "--num_workers=1"]), log=None)
    assert not out.exists()


def test_offline_tokenizer_message_is_accurate(tmp_path):
    # tiktoken's cache names each file by the SHA-1 of its URL, so a folder holding vocab.bpe and
    # encoder.json under their own names is no cache: the one-line error says so and how to fill
    # one, and following it works offline
    import hashlib
    urls = [f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{f}"
            for f in ("vocab.bpe", "encoder.json")]
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent"))
    files = [cache / hashlib.sha1(u.encode()).hexdigest() for u in urls]
    if not all(f.is_file() for f in files):
        pytest.skip("no filled tiktoken cache (TIKTOKEN_CACHE_DIR) to copy")
    plain, copied = tmp_path / "plain", tmp_path / "copied"
    plain.mkdir()
    for f, u in zip(files, urls):
        shutil.copy(f, plain / u.rsplit("/", 1)[1])
    shutil.copytree(cache, copied)
    # every download goes to a closed local port: offline, whatever this machine has
    no_net = "http://127.0.0.1:9"
    env = {**os.environ,
           **{k: no_net for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")},
           "NO_PROXY": "", "no_proxy": ""}
    cmd = [sys.executable, str(ROOT / "prepare.py"), "--toy_pairs=60"]
    r = subprocess.run(cmd + [f"--out_dir={tmp_path / 'a'}"],
                       env={**env, "TIKTOKEN_CACHE_DIR": str(plain)}, capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("prepare.py: error: could not load tiktoken's GPT-2 tokenizer")
    assert "SHA-1 of its URL" in r.stderr and "TIKTOKEN_CACHE_DIR=DIR" in r.stderr and "copy DIR" in r.stderr
    assert not (tmp_path / "a").exists()
    r = subprocess.run(cmd + [f"--out_dir={tmp_path / 'b'}"],
                       env={**env, "TIKTOKEN_CACHE_DIR": str(copied)}, capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and (tmp_path / "b" / "train_000000.bin").is_file(), r.stderr


def test_options_errors():
    with pytest.raises(P.PrepareError,
                       match=r"did you mean --max_length\?.*valid keys: .*max_prompt_length"):
        P.parse_args(["--max_lenght=3"])
    with pytest.raises(P.PrepareError, match="expects int"):
        P.parse_args(["--max_length=big"])
    cfg = P.parse_args(["--max_length=1_024", "--val_fraction=0.1", "--format=hh"])
    assert (cfg.max_length, cfg.val_fraction, cfg.format) == (1024, 0.1, "hh")
    for bad in (["--max_prompt_length=600"], ["--format=xml"], ["--dataset=imdb"]):
        with pytest.raises(P.PrepareError):
            P.validate(P.parse_args(bad))


# -----------------------------------------------------------------------------
# the output folder: replaced whole by a finished run, kept as it was by a failed one


def test_failed_run_keeps_previous_output(tmp_path):
    _, out = run(tmp_path, HH_ROWS)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    bad = tmp_path / "bad.jsonl.gz"
    _gzip_truncated(bad)
    with pytest.raises(P.PrepareError):
        run(tmp_path, bad)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.jsonl.gz", "in.jsonl", "out"]
    (out / "notes.txt").write_text("mine")  # a folder with foreign files is never replaced
    with pytest.raises(P.PrepareError, match="refusing"):
        run(tmp_path, HH_ROWS)
    assert (out / "notes.txt").read_text() == "mine"


def test_prepare_replaces_its_output_with_dpo_reference_caches(tmp_path):
    # dpo.py stores reference log-probs beside the shards; re-preparing replaces them with the data,
    # anything else in the folder makes prepare refuse
    out = tmp_path / "toy"
    args = ["--dataset=toy", "--toy_pairs=50", f"--out_dir={out}", "--num_workers=1"]
    P.prepare(P.parse_args(args), log=None)
    (out / "ref_logps_train_0123abcd_4567ef89.pt").write_bytes(b"stale")
    P.prepare(P.parse_args(args), log=None)
    assert not (out / "ref_logps_train_0123abcd_4567ef89.pt").exists() and (out / "train_000000.bin").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(P.PrepareError, match="did not write"):
        P.prepare(P.parse_args(args), log=None)


def test_unwritable_output_is_one_line_and_keeps_previous_output(tmp_path, monkeypatch, capsys):
    # disk full while writing, a read-only folder at the final rename (once; then the old output
    # goes back), and, when not root (root ignores permissions), a real read-only parent folder: one
    # "error:" line naming the output folder, the previous output byte for byte, nothing else left
    import errno
    _, out = run(tmp_path, HH_ROWS)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    real_open, real_replace = open, os.replace
    def full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)
    def read_only_once(src, dst):
        if Path(dst) == out and not failed:
            failed.append(dst)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src), str(dst))
        return real_replace(src, dst)
    faults = [("open", full_disk, os.strerror(errno.ENOSPC)),
              ("replace", read_only_once, os.strerror(errno.EROFS))]
    if os.geteuid() != 0:
        faults.append(("chmod", None, os.strerror(errno.EACCES)))
    for name, fake, reason in faults:
        failed = []
        with monkeypatch.context() as m:
            if name == "open":
                m.setattr(P, "open", fake, raising=False)  # the files prepare.py opens itself
                m.setattr(shards, "open", fake, raising=False)  # and the shard writer
            elif name == "replace":
                m.setattr(os, "replace", fake)
            else:
                tmp_path.chmod(0o555)
            try:
                with pytest.raises(SystemExit) as e:
                    P.main([f"--input={tmp_path / 'in.jsonl'}", f"--out_dir={out}",
                            "--num_workers=1"])
            finally:
                tmp_path.chmod(0o755)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1, (name, err)
        assert err.startswith(f"prepare.py: error: could not write {out}: {reason}"), (name, err)
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before, name
        assert sorted(f.name for f in tmp_path.iterdir()) == ["in.jsonl", "out"], name


def stop_prepare_while_it_tokenizes(tmp_path, sig, targets):
    # prepare.py with 6 workers and big batches (more results in flight) on input that keeps them
    # busy far longer than the test waits (a 10,000-row file read 12 times); sig goes to each of
    # targets ("group": a Ctrl-C or a scheduler, "parent": kill PID) once the workers' results are
    # being written (into a hidden sibling of out)
    import signal
    import time
    _, out = run(tmp_path, HH_ROWS)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    big = tmp_path / "big.jsonl"
    text = " ".join(f"word{i % 97} and more" for i in range(60))
    big.write_text("".join(json.dumps({"prompt": f"Question {i}: {text}",
                                       "chosen": f" yes {i} {text}",
                                       "rejected": f" no {text}"}) + "\n" for i in range(10000)))
    cmd = [sys.executable, str(ROOT / "prepare.py"), "--input=" + ",".join([str(big)] * 12),
           f"--out_dir={out}",
           "--num_workers=6", "--batch_rows=500"]
    rng = random.Random(0)
    for attempt, target in enumerate(targets):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < 30 and not any(
                f.is_file() and f.stat().st_size for d in tmp_path.glob(".out*") for f in d.glob(".*")):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        ended = p.poll() is not None
        assert not ended, f"try {attempt}: prepare.py ended before {sig.name}: {p.communicate()}"
        if target == "group":
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        try:
            _, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            pytest.fail(f"try {attempt}: prepare.py still running 10 s after {sig.name}")
        assert p.returncode == 130 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("prepare.py: interrupted; nothing was written"), err
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before
        assert sorted(f.name for f in tmp_path.iterdir()) == ["big.jsonl", "in.jsonl", "out"]


def test_ctrl_c_while_tokenizing_exits_at_once_and_keeps_previous_output(tmp_path):
    # Ctrl-C reaches the whole foreground process group; a worker killed while sending its result
    # left the parent waiting for the rest of the message forever (about 3 tries in 10). Here: 4
    # tries, SIGINT to the group while the workers tokenize -> exit within seconds, one line
    import signal
    stop_prepare_while_it_tokenizes(tmp_path, signal.SIGINT, ["group"] * 4)


def test_sigterm_while_tokenizing_cleans_up_like_ctrl_c(tmp_path):
    # SIGTERM (kill PID, or a scheduler to the whole group) left the hidden staging folder
    # data/.NAME.tmp-PID-... until the next run; now it ends like Ctrl-C: one line, exit status 130,
    # nothing staged left, the previous output untouched (SIGKILL cannot be caught: the next run
    # removes its staging, tested below)
    import signal
    stop_prepare_while_it_tokenizes(tmp_path, signal.SIGTERM, ["parent", "group"])


def test_sigkill_while_tokenizing_leaves_no_worker_behind(tmp_path):
    # SIGKILL cannot be caught: its workers waited for work forever; now they exit within seconds
    # (the staging folder goes at the next run:
    # test_prepare_removes_the_staging_folder_of_a_run_killed_by_sigkill)
    import signal
    import time
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i} " + "word " * 50, "chosen": " yes",
                                       "rejected": " no"})
                           + "\n" for i in range(20000)))
    p = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), f"--input={src}", "--num_workers=3",
                          f"--out_dir={tmp_path / 'out'}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # its workers: the processes of its group
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 30 and not any(
            f.stat().st_size for f in tmp_path.glob(".out.tmp-*/.*.tokens.tmp")):
        time.sleep(0.01)
    assert p.poll() is None, "prepare.py ended before SIGKILL was sent"
    p.kill()
    p.wait()
    for _ in range(100):
        ps = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True)
        rows = [line.split() for line in ps.stdout.splitlines()]
        left = [r for r in rows if r[0] == str(p.pid) and not r[1].startswith("Z")]
        if not left:
            break
        time.sleep(0.1)
    else:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"{len(left)} workers still running 10 s after prepare.py was killed")


def test_prepare_removes_the_staging_folder_of_a_run_killed_by_sigkill(tmp_path):
    # killed as soon as its staging folder exists, long before its 50,000 rows are tokenized
    src, data = tmp_path / "pairs.jsonl", tmp_path / "data"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": " yes", "rejected": " no"})
                           + "\n" for i in range(50000)))
    p = subprocess.Popen([sys.executable, "prepare.py", f"--input={src}", "--num_workers=1",
                          f"--out_dir={data / 'mine'}"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            stage = list(data.glob(".mine.tmp-*"))
            if stage or p.poll() is not None:
                break
            subprocess.run(["sleep", "0.02"])
        p.kill()
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -9 and stage and stage[0].name.startswith(f".mine.tmp-{p.pid}-") and stage[0].exists()
    alive = data / f".other.tmp-{os.getpid()}-1.5"  # another prepare.py still running: left alone
    alive.mkdir()
    r = cli("prepare.py", "--toy_pairs=60", "--num_workers=1", f"--out_dir={data / 'toy'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(data)) == [alive.name, "toy"]


# -----------------------------------------------------------------------------
# shard reader


def naive_read(path):
    """Reference parse of the documented layout, straight from the bytes."""
    raw = Path(path).read_bytes()
    header = np.frombuffer(raw[:1024], dtype=np.int32)
    n, ntok = int(header[2]), int(header[3])
    lengths = np.frombuffer(raw[1024:1024 + 12 * n], dtype=np.int32).reshape(n, 3)
    tokens = np.frombuffer(raw[1024 + 12 * n:], dtype=np.uint16)
    assert len(tokens) == ntok
    pairs, pos = [], 0
    for p, c, r in lengths:
        pairs.append((tokens[pos:pos + p].tolist(), tokens[pos + p:pos + p + c].tolist(),
                      tokens[pos + p + c:pos + p + c + r].tolist()))
        pos += p + c + r
    return header, pairs


def test_reader_matches_layout(tmp_path):
    rows = [{"prompt": f"Prompt {i}:", "chosen": " yes" * (i % 5 + 1),
             "rejected": " no" * (i % 3 + 1)} for i in range(30)]
    _, out = run(tmp_path, rows)
    path = shards.list_shards(out, "train")[0]
    header, ref = naive_read(path)
    assert header[0] == 20241127 and header[1] == 1 and header[2] == 30 and not header[4:].any()
    pairs = shards.load_pairs(path)
    assert len(pairs) == 30 and pairs.lengths.shape == (30, 3) and pairs.offsets.shape == (30,)
    assert [tuple(x.tolist() for x in pairs[i]) for i in range(30)] == ref == [ref_pair(*r.values()) for r in rows]
    assert int(pairs.offsets[3]) == int(pairs.lengths[:3].sum())
    p, c, r = pairs[-1]
    assert p.dtype == np.uint16 and np.shares_memory(c, pairs.tokens)  # views into the memmap
    assert isinstance(pairs.tokens, np.memmap)
    with pytest.raises(IndexError):
        pairs[30]


def _corrupt(src, dst, edit):
    raw = bytearray(Path(src).read_bytes())
    edit(raw)
    Path(dst).write_bytes(bytes(raw))
    return dst


def _set_int(raw, i, value):
    raw[4 * i:4 * i + 4] = np.int32(value).tobytes()


@pytest.mark.parametrize("edit,pattern", [
    (lambda b: _set_int(b, 0, 12345), r"bad magic 12345"),
    (lambda b: _set_int(b, 1, 2), r"version 2"),
    (lambda b: b.__delitem__(slice(-2, None)), r"truncated or corrupted"),
    (lambda b: b.__delitem__(slice(500, None)), r"too small"),
    (lambda b: _set_int(b, 2, 99), r"header \(99 pairs"),
    (lambda b: _set_int(b, 256, int.from_bytes(b[1024:1028], "little") + 1), r"lengths sum to"),  # a length changed
    (lambda b: (_set_int(b, 256, int.from_bytes(b[1024:1028], "little") + int.from_bytes(b[1028:1032], "little")),
                _set_int(b, 257, 0)), r"empty response"),  # same sum, but chosen has no tokens
], ids=["magic", "version", "truncated", "tiny", "pair_count", "length_sum", "empty_response"])
def test_reader_errors(tmp_path, edit, pattern):
    _, out = run(tmp_path, HH_ROWS)
    bad = _corrupt(out / "train_000000.bin", out / "train_000001.bin", edit)
    with pytest.raises(ValueError, match=pattern) as e:
        shards.load_pairs(bad)
    assert str(bad) in str(e.value) and "python prepare.py" in str(e.value)


def test_list_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + r".*python prepare.py"):
        shards.list_shards(tmp_path, "train")


def hand_shard(path, lengths, tokens):  # the documented layout, by hand
    header = np.zeros(256, dtype=np.int32)
    header[:4] = 20241127, 1, len(lengths), len(tokens)
    Path(path).write_bytes(header.tobytes() + np.array(lengths, dtype=np.int32).tobytes()
                           + np.array(tokens, dtype=np.uint16).tobytes())
    return path


def test_no_pair_with_an_empty_prompt_is_written_or_read(tmp_path):
    # a pair with no prompt token would have its first response token predicted from the previous
    # pair's tokens
    rows = [{"prompt": "", "chosen": " a", "rejected": " b"},
            {"prompt": " \n ", "chosen": " a", "rejected": " b"},
            {"prompt": "Q:", "chosen": " a", "rejected": " b"}]
    # the prompt is cut to 1 token
    meta, out = run(tmp_path, rows, "--max_length=2", "--max_prompt_length=1")
    assert meta["skipped"] == {"empty_text": {"count": 2, "first_lines": [1, 2]}}
    p, c, r = ref_pair(*rows[2].values())
    assert read_split(out) == [(p[-1:], c[:1], r[:1])]
    good = hand_shard(tmp_path / "good.bin", [[2, 1, 1], [1, 2, 1]], [7, 8, 9, 10, 11, 12, 13, 14])
    assert ([tuple(x.tolist() for x in shards.load_pairs(good)[i]) for i in range(2)]
            == naive_read(good)[1])
    bad = hand_shard(tmp_path / "train_000000.bin", [[2, 1, 1], [0, 3, 1]],
                     [7, 8, 9, 10, 11, 12, 13, 14])
    empty_prompt = re.escape(str(bad)) + r": 1 pairs have an empty prompt.*python prepare.py"
    with pytest.raises(shards.ShardError, match=empty_prompt):
        shards.load_pairs(bad)


def test_max_token(tmp_path):
    # the trainer checks token ids against its vocabulary once per shard, naming it: the largest id,
    # read once
    path = hand_shard(tmp_path / "s.bin", [[1, 1, 1], [2, 1, 1]], [3, 50300, 5, 6, 7, 50256, 9])
    assert (shards.load_pairs(path).max_token
            == max(t for pair in naive_read(path)[1] for x in pair for t in x) == 50300)
    assert shards.load_pairs(hand_shard(tmp_path / "e.bin", [], [])).max_token == -1
    _, out = run(tmp_path, HH_ROWS)
    assert (shards.load_pairs(out / "train_000000.bin").max_token
            == max(t for pair in read_split(out) for x in pair for t in x))


# -----------------------------------------------------------------------------
# real data: every row of HH harmless-base test is accounted for and round-trips


def test_real_hh_file(tmp_path):
    if not HH_FILE.exists():
        pytest.skip(HH_MISSING)
    out = tmp_path / "hh"
    meta = P.prepare(P.parse_args([f"--input={HH_FILE}", f"--out_dir={out}"]))
    rows = [json.loads(line) for line in gzip.open(HH_FILE)]
    assert len(rows) == meta["rows_read"] == 2312
    nskip = sum(v["count"] for v in meta["skipped"].values())
    assert meta["pairs"]["train"] + meta["pairs"]["val"] + nskip == 2312
    print(f"\nHH harmless-base test: read {len(rows)}, written {meta['pairs']}, skipped {nskip} "
          f"{ {k: v['count'] for k, v in meta['skipped'].items()} }, truncated {meta['truncated']}")
    # independent reference: the longest prefix of chosen that ends with "\n\nAssistant:" and starts
    # rejected
    expected, truncated, empty, mismatched = collections.Counter(), 0, 0, 0
    for row in rows:
        c, r = row["chosen"], row["rejected"]
        ends = [m.end() for m in re.finditer(re.escape(ASSIST), c)]
        k = max(e for e in ends if r.startswith(c[:e]))
        mismatched += k != ends[-1]
        if not c[k:].strip() or not r[k:].strip():
            empty += 1
            continue
        p, ch, rj = ref_pair(c[:k], c[k:], r[k:])
        if len(p) + max(len(ch), len(rj)) > 512:
            truncated += 1
        else:
            expected[(c[:k], c[k:] + "<|endoftext|>", r[k:] + "<|endoftext|>")] += 1
    assert mismatched == 4 == meta["notes"]["prompt_mismatch_recovered"]["count"]
    assert empty == nskip == meta["skipped"]["empty_text"]["count"]
    written = collections.Counter(tuple(ENC.decode(x) for x in pair) for pair in read_all(out))
    assert sum(written.values()) == 2312 - empty
    assert not expected - written  # every untruncated pair decodes back to exactly its source text
    assert sum((written - expected).values()) == truncated == meta["truncated"]["pairs"]
    for p, c, r in read_all(out):
        assert len(p) <= 256 or len(p) + max(len(c), len(r)) <= 512
        assert len(p) + max(len(c), len(r)) <= 512


# -----------------------------------------------------------------------------
# toy task


def test_toy_reward_reference():
    assert toy.toy_reward(" good great bad the .") == pytest.approx((2 - 1) / 4)
    assert toy.toy_reward(" terrible awful .") == -1.0 and toy.toy_reward(" the pizza was .") == 0.0
    assert toy.toy_reward("") == 0.0
    # text after the end token is ignored
    assert toy.toy_reward(" Great nice .<|endoftext|> bad bad bad") == 1.0


def test_toy_pairs():
    a, b = toy.make_toy_pairs(400, seed=1), toy.make_toy_pairs(400, seed=1)
    assert a == b and a != toy.make_toy_pairs(400, seed=2)
    assert all(toy.toy_reward(x["chosen"]) > toy.toy_reward(x["rejected"]) for x in a)
    train, val = toy.toy_prompts("train"), toy.toy_prompts("val")
    assert set(x["prompt"] for x in a) <= set(train) | set(val) and not set(train) & set(val)
    assert (toy.toy_prompts("val", seed=3) != val
            and sorted(toy.toy_prompts("val", seed=3)) == sorted(val))
    assert "Review of the pizza:" in train + val
    item = lambda prompt: prompt.split(" the ")[-1].rstrip(":")
    assert (not {item(p) for p in train} & {item(p) for p in val}
            and len({item(p) for p in val}) >= 5)
    # every word is one GPT-2 token, so sequences stay short
    for w in toy.TOY_ITEMS + toy.TOY_POSITIVE + toy.TOY_NEGATIVE + toy.TOY_NEUTRAL:
        assert len(enc(w)) == 1 and w.startswith(" "), w
    assert len(toy.TOY_ITEMS) >= 50 and len(toy.TOY_POSITIVE) >= 10 and len(toy.TOY_NEGATIVE) >= 10
    for x in a:
        assert (len(enc(x["prompt"])) <= 10 and len(enc(x["chosen"])) <= 13
                and len(enc(x["rejected"])) <= 13)
        assert 6 <= len(x["chosen"].split()) - 1 <= 10  # 6-10 words, then " ."


def test_toy_prepare(tmp_path):
    out = tmp_path / "toy"
    meta = P.prepare(P.parse_args(["--toy_pairs=600", f"--out_dir={out}"]), log=None)
    assert meta["pairs"]["train"] + meta["pairs"]["val"] == 600 and meta["pairs"]["val"] > 30
    decoded = {s: [tuple(ENC.decode(x) for x in pair) for pair in read_split(out, s)]
               for s in ("train", "val")}
    item = lambda prompt: prompt.split(" the ")[-1].rstrip(":")
    train_items = {item(p) for p, _, _ in decoded["train"]}
    # held-out items never seen in train
    assert not train_items & {item(p) for p, _, _ in decoded["val"]}
    assert {p for p, _, _ in decoded["val"]} <= set(toy.toy_prompts("val"))
    for p, c, r in decoded["train"] + decoded["val"]:
        assert c.endswith(" .<|endoftext|>") and toy.toy_reward(c) > toy.toy_reward(r)
    again = P.prepare(P.parse_args(["--toy_pairs=600", f"--out_dir={tmp_path / 'toy2'}"]), log=None)
    assert (tmp_path / "toy2" / "train_000000.bin").read_bytes() == (out / "train_000000.bin").read_bytes()
    assert again["tokens"] == meta["tokens"]


# -----------------------------------------------------------------------------
# downloads (file:// stands in for Hugging Face) and the command line


def test_hh_download_file_url(tmp_path):
    hub = tmp_path / "hub"
    for subset, rows in (("harmless-base", HH_ROWS), ("helpful-base", HH_ROWS[:1])):
        (hub / subset).mkdir(parents=True)
        write_rows(hub / subset / "train.jsonl.gz", rows)
    dl, out = tmp_path / "dl", tmp_path / "out"
    args = ["--dataset=hh", "--hh_subsets=harmless-base,helpful-base",
            f"--hh_base_url=file://{hub}", f"--download_dir={dl}", f"--out_dir={out}",
            "--val_fraction=0"]
    meta = P.prepare(P.parse_args(args), log=None)
    assert meta["rows_read"] == 3 and meta["pairs"]["train"] == 3 and meta["format"] == "hh"
    assert sorted(str(p.relative_to(dl)) for p in dl.rglob("*") if p.is_file()) == \
        ["harmless-base/train.jsonl.gz", "helpful-base/train.jsonl.gz"]  # no .partial left
    assert read_split(out) == [ref_pair(*e) for e in HH_EXPECTED] + [ref_pair(*HH_EXPECTED[0])]
    with pytest.raises(P.PrepareError, match="could not download file://"):
        P.prepare(P.parse_args(args[:2] + [f"--hh_base_url=file://{tmp_path}/nowhere",
                                           f"--download_dir={tmp_path}/dl2",
                                           f"--out_dir={tmp_path}/o2"]), log=None)
    assert not list((tmp_path / "dl2").rglob("*.partial"))


def test_hh_download_cut_short_leaves_nothing(tmp_path, monkeypatch):
    class Short(io.BytesIO):  # the server promised 1000 bytes, then closed the connection after 10
        headers = {"Content-Length": "1000"}
    monkeypatch.setattr(P.urllib.request, "urlopen", lambda url, timeout: Short(b"0123456789"))
    dest = tmp_path / "dl" / "train.jsonl.gz"
    # download is shared with model.py: an OSError naming the URL (prepare's HH step wraps it in a
    # PrepareError)
    with pytest.raises(OSError,
                       match=r"could not download https://example\.invalid/train\.jsonl\.gz: "
                                      "incomplete, got 10 of 1000 bytes"):
        P.download("https://example.invalid/train.jsonl.gz", dest, log=lambda *a: None)
    assert not dest.exists() and not list((tmp_path / "dl").iterdir())
    args = ["--dataset=hh", "--hh_base_url=https://example.invalid",
            f"--download_dir={tmp_path / 'dl'}", f"--out_dir={tmp_path / 'out'}"]
    with pytest.raises(P.PrepareError,
                       match=r"could not download https://example\.invalid/harmless-base/train"
                                             r"\.jsonl\.gz: incomplete.*--hh_base_url"):
        P.prepare(P.parse_args(args), log=None)
    assert (not [f for f in (tmp_path / "dl").rglob("*") if f.is_file()]
            and not (tmp_path / "out").exists())


def test_command_line(tmp_path):
    env = dict(os.environ)
    cmd = [sys.executable, str(ROOT / "prepare.py")]
    r = subprocess.run(cmd + ["--toy_pairs=200", f"--out_dir={tmp_path / 'toy'}"],
                       capture_output=True, text=True, env=env)
    assert (r.returncode == 0 and "rows read" in r.stdout
            and (tmp_path / "toy" / "val_000000.bin").exists())
    r = subprocess.run(cmd + ["--max_lenght=5"], capture_output=True, text=True, env=env)
    assert (r.returncode == 1 and "did you mean --max_length" in r.stderr
            and "valid keys" in r.stderr)
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "--max_prompt_length=256" in r.stdout
    (tmp_path / "bad.jsonl").write_text("not json\n")
    r = subprocess.run(cmd + [f"--input={tmp_path / 'bad.jsonl'}"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 1 and f"{tmp_path / 'bad.jsonl'}:1: not valid JSON" in r.stderr
    # nothing written (no data/)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.jsonl", "toy"]
    r = subprocess.run([sys.executable, "-c",
                        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import prepare"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == r.stderr == ""  # importing has no side effects
