"""
model.py against independent references: Hugging Face transformers' GPT-2 (eager attention), the
safetensors package, naive loops and hand counts. Tiny configs, CPU, a few seconds.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import safetensors.torch as safetensors_torch  # test-only references (requirements-dev.txt)
import tiktoken
import torch
import torch.nn.functional as F
import transformers

import checkpoint
import export as export_module
import model as model_module
import weights
from dpo import train
from model import GPT, GPTConfig
from prepare import PrepareError
from testlib import (ROOT, TINY, assert_one_error, cli, make_data, our_tiny, packed_inputs, tiny_cfg,
                     tiny_model, tokens)


def hf_tiny(seed=0):
    """A random-weight HF GPT-2 with every tensor (biases, LayerNorms too) perturbed away from its init."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=64,
                                  bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = hf_tiny()
    hf.save_pretrained(d)  # safetensors
    assert os.path.isfile(d / "model.safetensors")
    return d, hf


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


# -----------------------------------------------------------------------------
# loading and saving against transformers


def test_load_hf_safetensors(hf_dir):
    d, hf = hf_dir
    m = GPT.from_pretrained(d).eval()
    idx = tokens()
    assert (m(idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-4
    assert m.lm_head.weight is m.transformer.wte.weight  # still tied after loading
    assert m.num_params(non_embedding=False) == sum(p.numel() for p in hf.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in m.parameters())


def test_load_hf_pytorch_bin(hf_dir, tmp_path):
    d, hf = hf_dir
    shutil.copy(d / "config.json", tmp_path / "config.json")
    sd = dict(hf.state_dict())  # includes lm_head.weight
    # old checkpoints also carry the causal-mask buffers; they must be ignored
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    m = GPT.from_pretrained(tmp_path).eval()
    idx = tokens()
    assert (m(idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_unprefixed_half_precision(hf_dir, tmp_path, dtype):
    # the hub's gpt2 files name tensors without 'transformer.' and include attn.bias buffers
    d, hf = hf_dir
    shutil.copy(d / "config.json", tmp_path / "config.json")
    sd = {k.removeprefix("transformer."): v.to(dtype).contiguous() for k, v in hf.state_dict().items()
          if k != "lm_head.weight"}
    sd["h.1.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64)).to(dtype)
    safetensors_torch.save_file(sd, tmp_path / "model.safetensors")
    m = GPT.from_pretrained(tmp_path).eval()
    ref = hf_tiny()
    with torch.no_grad():  # the reference gets the same rounding
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    idx = tokens()
    assert (m(idx) - hf_logits(ref, idx)).abs().max().item() <= 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path, hf_dir):
    m = our_tiny(seed=3)
    m.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]  # no temp files
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    idx = tokens()
    assert (m(idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-4
    # same tensor names and shapes as transformers writes, readable by the safetensors package
    theirs = safetensors_torch.load_file(hf_dir[0] / "model.safetensors")
    ours = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    with open(tmp_path / "out" / "model.safetensors", "rb") as f:
        assert int.from_bytes(f.read(8), "little") % 8 == 0  # header padded to 8-byte alignment
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_ctx"] == cfg["n_positions"] == 64
    # and back into our model
    m2 = GPT.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(m2(idx), m(idx))


def test_save_pretrained_failure_leaves_old_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    our_tiny(seed=1).save_pretrained(out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def boom(tensors, path):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(model_module, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        our_tiny(seed=2).save_pretrained(out)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_save_pretrained_rejects_no_bias(tmp_path):
    with pytest.raises(ValueError, match="biases"):
        GPT(GPTConfig(**TINY, bias=False)).save_pretrained(tmp_path)


# -----------------------------------------------------------------------------
# getting a model out: export.py and --export_hf, the tokenizer files, a run folder loaded back

TOKENIZER_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
HF_FILES = sorted(["config.json", "model.safetensors", *TOKENIZER_FILES])
# spaces (runs of them, leading, trailing), contractions, digits, punctuation, accents, CJK, emoji,
# tabs, \r\n, and <|endoftext|> written in the text: prepare.py encodes all of it as plain text
SAMPLE_TEXT = ("Hello, world!  It's 3.14159 -- naïve café's (über) 日本語 😀🦜\n\n\tindented  "
               "line\r\nwe'll   see<|endoftext|>after <|endoftext|> x\n   \n")


def read_folder(folder):
    """{file name: bytes}, or None if there is no such folder"""
    if not os.path.exists(folder):
        return None
    return {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """a 2-step tiny DPO run with --export_hf: its out_dir holds ckpt.pt and hf/"""
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(tmp, make_data(tmp), max_iters=2, export_hf=True)
    train(cfg)
    return cfg


def test_export_loads_in_transformers_as_the_export_hf_folder(trained_run, tmp_path):
    run = trained_run.out_dir
    r = cli("export.py", f"--init_from={run}", f"--out_dir={tmp_path / 'exported'}")
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'exported'}: model.safetensors, config.json, vocab.json" in r.stdout
    # dpo.py --export_hf and export.py write the same folder, byte for byte
    exported = read_folder(tmp_path / "exported")
    assert sorted(exported) == HF_FILES and exported == read_folder(os.path.join(run, "hf"))
    ours = checkpoint.load_model(run, trained_run).eval()  # from ckpt.pt
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() < 1e-4
        theirs = hf.generate(idx[:1], max_new_tokens=12, do_sample=False, pad_token_id=50256)
    assert torch.equal(ours.generate(idx[:1], 12, temperature=0), theirs)  # the same greedy tokens


def test_exported_tokenizer_is_tiktokens_gpt2(trained_run):
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(trained_run.out_dir, "hf"))
    enc = tiktoken.get_encoding("gpt2")
    ids = enc.encode_ordinary(SAMPLE_TEXT)
    assert tok(SAMPLE_TEXT)["input_ids"] == ids
    assert tok.decode(ids) == SAMPLE_TEXT
    assert tok.eos_token_id == tok.bos_token_id == 50256 and tok.eos_token == "<|endoftext|>"
    assert tok.decode([50256]) == "<|endoftext|>"
    assert len(tok) == 50257 and tok.model_max_length == trained_run.block_size
    every_byte = bytes(range(256)).decode("latin-1") + " 'll 'S ĠĊ"  # and text that looks spelled
    assert tok(every_byte)["input_ids"] == enc.encode_ordinary(every_byte)


def test_tokenizer_merges_rebuild_tiktokens_ranks():
    # merge k (in file order) makes token 256 + k; every token past the bytes is one merge
    files = weights.gpt2_tokenizer_files(block_size=1024)
    vocab = json.loads(files["vocab.json"])
    merges = files["merges.txt"].splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 50000
    made = [vocab[line.replace(" ", "")] for line in merges[1:]]
    assert made == list(range(256, 50256))
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256


def test_from_pretrained_reads_a_run_folder(trained_run):
    ck = torch.load(os.path.join(trained_run.out_dir, "ckpt.pt"), weights_only=True)
    for source in (trained_run.out_dir, os.path.join(trained_run.out_dir, "ckpt.pt")):
        m = GPT.from_pretrained(source, dropout=0.1)
        assert m.config.dropout == 0.1 and m.lm_head.weight is m.transformer.wte.weight
        sd = m.state_dict()
        assert sd.keys() == ck["model"].keys()
        assert all(torch.equal(sd[k], ck["model"][k]) for k in sd)


def test_export_failure_leaves_no_folder(tmp_path, monkeypatch):
    def offline(block_size):
        raise PrepareError("could not load tiktoken's GPT-2 tokenizer")
    monkeypatch.setattr(model_module, "gpt2_tokenizer_files", offline)
    with pytest.raises(PrepareError):
        tiny_model().save_pretrained(tmp_path / "new")
    monkeypatch.undo()

    def boom(tensors, path):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(model_module, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_model().save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == []


# export.py's main, with a disk that stalls after the first bytes of model.safetensors
STALLING_EXPORT = """
import sys, time
import export, model
def stall(tensors, path):
    open(path, "wb").write(b"partial")
    print("writing", flush=True)
    time.sleep(60)
model.save_safetensors = stall
export.main(sys.argv[1:])
"""


@pytest.mark.parametrize("folder, signum", [("new", signal.SIGINT), ("old", signal.SIGTERM)])
def test_export_stopped_while_writing_leaves_the_old_folder(trained_run, tmp_path, folder, signum):
    out = tmp_path / folder
    if folder == "old":  # an earlier export there
        shutil.copytree(os.path.join(trained_run.out_dir, "hf"), out)
    before = read_folder(out)
    args = [sys.executable, "-c", STALLING_EXPORT, f"--init_from={trained_run.out_dir}", f"--out_dir={out}"]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.stdout.readline() == "writing\n"
    p.send_signal(signum)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.splitlines() == ["export.py: interrupted before the export finished; "
                                "run the same command again"]
    assert read_folder(out) == before  # no folder made, or the old export untouched; no temp file


def test_export_bad_inputs_are_one_line(trained_run, tmp_path, capsys):
    run, out = trained_run.out_dir, f"--out_dir={tmp_path / 'x'}"
    before = sorted(os.listdir(run))
    r = cli("export.py", f"--init_from={run}", "--out_dri=x")  # as users run it
    assert_one_error(r.returncode, r.stderr, r"unknown config key 'out_dri' .*mean out_dir\?")
    cases = [([], r"--init_from and --out_dir are required"),
             ([f"--init_from={run}", f"--out_dir={run}"], r"holds a run \(ckpt.pt\): export into a"),
             (["--init_from=resume", out], r"--init_from=resume: export takes a trained model"),
             ([f"--init_from={tmp_path / 'nope'}", out], r"nope does not exist"),
             ([f"--init_from={tmp_path}", out], r"config.json not found and no ckpt.pt"),
             ([f"--init_from={run}", f"--out_dir={run}/metrics.jsonl"], r"metrics.jsonl is a file: expected a")]
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        for args, pattern in cases:  # main() in-process
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                export_module.main(args)
            assert_one_error(e.value.code, capsys.readouterr().err, pattern)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert sorted(os.listdir(run)) == before and not os.path.exists(tmp_path / "x")


def test_from_pretrained_bad_run_files(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"ckpt.pt: not a readable dpo.py checkpoint .*pass a run"):
        GPT.from_pretrained(tmp_path)
    torch.save({"model": {}, "model_config": dict(n_layer=2)}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"model_config has no GPT-2 shape"):
        GPT.from_pretrained(tmp_path)
    m = tiny_model()
    sd = m.state_dict()
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:10]
    torch.save({"model": sd, "model_config": dict(vars(m.config))}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"ckpt.pt: its weights do not match its model config .*wpe"):
        GPT.from_pretrained(tmp_path / "ckpt.pt")


# -----------------------------------------------------------------------------
# download path, for real, from a file:// "hub"


def make_hub(tmp_path, hf_dir, name, truncate=False):
    src = tmp_path / "hub" / name / "resolve" / "main"
    src.mkdir(parents=True)
    data = (hf_dir[0] / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:len(data) // 2] if truncate else data)
    return (tmp_path / "hub").as_uri(), src / "model.safetensors"


def test_download_and_cache(hf_dir, tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(weights.PRETRAINED, "tiny-gpt", TINY)
    base, src = make_hub(tmp_path, hf_dir, "tiny-gpt")
    monkeypatch.setenv("NANODPO_HF_BASE_URL", base)
    monkeypatch.setenv("NANODPO_CACHE", str(tmp_path / "cache"))
    m = GPT.from_pretrained("tiny-gpt").eval()
    idx = tokens()
    assert (m(idx) - hf_logits(hf_dir[1], idx)).abs().max().item() <= 1e-4
    err = capfd.readouterr().err
    assert "MB" in err and "100.0%" in err  # progress on stderr
    assert os.listdir(tmp_path / "cache" / "tiny-gpt") == ["model.safetensors"]
    os.remove(src)  # second load must come from the cache
    m2 = GPT.from_pretrained("tiny-gpt", dropout=0.1)
    assert m2.config.dropout == 0.1
    assert torch.equal(m2.eval()(idx), m(idx))


def test_download_truncated_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(weights.PRETRAINED, "tiny-gpt", TINY)
    base, _ = make_hub(tmp_path, hf_dir, "tiny-gpt", truncate=True)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="tiny-gpt.*truncated"):
        GPT.from_pretrained("tiny-gpt", cache_dir=cache, base_url=base)
    assert [f for _, _, fs in os.walk(cache) for f in fs] == []


def test_download_missing_source(tmp_path, monkeypatch):
    monkeypatch.setitem(weights.PRETRAINED, "tiny-gpt", TINY)
    with pytest.raises(OSError, match="could not download .*tiny-gpt/resolve/main/model.safetensors"):
        GPT.from_pretrained("tiny-gpt", cache_dir=tmp_path / "c", base_url=(tmp_path / "nohub").as_uri())
    assert [f for _, _, fs in os.walk(tmp_path / "c") for f in fs] == []


def make_repo(tmp_path, hf_dir, name, files):
    """a file:// hub, its repo `name` holding `files` from hf_dir (the .bin made here)"""
    src = tmp_path / "hub" / name / "resolve" / "main"
    src.mkdir(parents=True)
    for f in files:
        if f == "pytorch_model.bin":
            torch.save(hf_dir[1].state_dict(), src / f)
        else:
            shutil.copy(hf_dir[0] / f, src / f)
    return (tmp_path / "hub").as_uri()


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_hub_repo_downloads_and_loads(hf_dir, tmp_path, monkeypatch, weights_file):
    base = make_repo(tmp_path, hf_dir, "someone/tiny-gpt2", ["config.json", weights_file])
    monkeypatch.setenv("NANODPO_HF_BASE_URL", base)
    monkeypatch.setenv("NANODPO_CACHE", str(tmp_path / "cache"))
    m = GPT.from_pretrained("someone/tiny-gpt2").eval()
    idx = tokens()
    assert (m(idx) - hf_logits(hf_dir[1], idx)).abs().max().item() <= 1e-4
    cached = sorted(os.listdir(tmp_path / "cache" / "someone" / "tiny-gpt2"))
    assert cached == ["config.json", weights_file]
    shutil.rmtree(tmp_path / "hub")  # offline now: --init_from=user/repo comes from the cache
    cfg = tiny_cfg(tmp_path, "unused", init_from="someone/tiny-gpt2")
    again = checkpoint.load_model(cfg.init_from, cfg).eval()
    assert torch.equal(again(idx), m(idx))


def test_hub_repo_bad_inputs(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NANODPO_CACHE", str(tmp_path / "cache"))
    base = make_repo(tmp_path, hf_dir, "someone/no-weights", ["config.json"])
    with pytest.raises(OSError, match=r"someone/no-weights is not a local folder, and as a Hugging Face "
                                      r"hub repo: could not download .*model.safetensors.*pytorch_model.bin"):
        GPT.from_pretrained("someone/no-weights", base_url=base)
    with pytest.raises(OSError, match=r"someone/nothing is not a local folder, .*could not download "
                                      r".*someone/nothing/resolve/main/config.json.*check the network"):
        GPT.from_pretrained("someone/nothing", base_url=base)
    src = tmp_path / "hub" / "someone" / "llama" / "resolve" / "main"
    src.mkdir(parents=True)
    shutil.copy(hf_dir[0] / "config.json", src / "config.json")
    edit_config(src, model_type="llama")
    with pytest.raises(ValueError, match=r"downloaded .*someone/llama/resolve/main/config.json is "
                                         r"not valid: .*model_type = 'llama' is not supported"):
        GPT.from_pretrained("someone/llama", base_url=base)
    # only the repo with a GPT-2 config.json left a file in the cache
    assert [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs] == ["config.json"]
    # a missing folder under one that exists here is a typo, not a download
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model folder out/typo does not exist"):
        GPT.from_pretrained("out/typo", base_url=base)


# -----------------------------------------------------------------------------
# bad inputs


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model name 'gpt3'.*gpt2-medium"):
        GPT.from_pretrained("gpt3")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        GPT.from_pretrained(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        GPT.from_pretrained(tmp_path)


def test_folder_without_weights(hf_dir, tmp_path):
    shutil.copy(hf_dir[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights file, expected model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)


def edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def test_config_shape_mismatch(hf_dir, tmp_path):
    d = copy_dir(hf_dir[0], tmp_path / "m")
    edit_config(d, vocab_size=999)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'transformer.wte.weight' has shape "
                                         r"\(1000, 64\), expected \(999, 64\)"):
        GPT.from_pretrained(d)


def test_config_more_layers_than_file(hf_dir, tmp_path):
    d = copy_dir(hf_dir[0], tmp_path / "m")
    edit_config(d, n_layer=3)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['transformer.h.2.ln_1.weight'"):
        GPT.from_pretrained(d)


def test_config_bad(hf_dir, tmp_path):
    d = copy_dir(hf_dir[0], tmp_path / "m")
    (d / "config.json").write_text('{"n_layer": 2,\n "n_head": }')
    with pytest.raises(ValueError, match="config.json, line 2: invalid JSON"):
        GPT.from_pretrained(d)
    (d / "config.json").write_text('{"n_layer": 2}')
    with pytest.raises(ValueError, match="missing GPT-2 config keys .*n_head"):
        GPT.from_pretrained(d)
    shutil.copy(hf_dir[0] / "config.json", d / "config.json")
    edit_config(d, activation_function="relu")
    with pytest.raises(ValueError, match="activation_function = 'relu' is not supported"):
        GPT.from_pretrained(d)


def test_truncated_safetensors(hf_dir, tmp_path):
    d = copy_dir(hf_dir[0], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"m/model.safetensors: truncated"):
        GPT.from_pretrained(d)
    (d / "model.safetensors").write_bytes(data[:100])  # cut inside the header
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        GPT.from_pretrained(d)


def write_modified(hf_dir, tmp_path, change):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(hf_dir[0] / "config.json", d / "config.json")
    sd = {k: v.contiguous() for k, v in hf_dir[1].state_dict().items() if k != "lm_head.weight"}
    change(sd)
    if sd.get("__bin__"):
        sd.pop("__bin__")
        torch.save(sd, d / "pytorch_model.bin")
    else:
        safetensors_torch.save_file(sd, d / "model.safetensors")
    return d


def test_unexpected_tensor(hf_dir, tmp_path):
    d = write_modified(hf_dir, tmp_path, lambda sd: sd.update({"transformer.h.0.attn.q_attn.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.0.attn.q_attn.weight'"):
        GPT.from_pretrained(d)


def test_missing_tensor(hf_dir, tmp_path):
    d = write_modified(hf_dir, tmp_path, lambda sd: sd.pop("transformer.ln_f.bias"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['transformer.ln_f.bias'\]"):
        GPT.from_pretrained(d)


def test_unsupported_dtype(hf_dir, tmp_path):
    d = write_modified(hf_dir, tmp_path, lambda sd: sd.update(
        {"transformer.ln_f.bias": sd["transformer.ln_f.bias"].to(torch.int8)}))
    with pytest.raises(ValueError, match="'transformer.ln_f.bias' has dtype 'I8'"):
        GPT.from_pretrained(d)


def test_untied_lm_head(hf_dir, tmp_path):
    d = write_modified(hf_dir, tmp_path, lambda sd: sd.update(
        {"__bin__": True, "lm_head.weight": torch.zeros(1000, 64)}))
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPT.from_pretrained(d)


def test_forward_bad_inputs():
    m = our_tiny()
    with pytest.raises(ValueError, match="sequence length 65 > block_size 64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position ids must lie in \[0, block_size=64\)"):
        m(torch.zeros(1, 4, dtype=torch.long), pos=torch.tensor([0, 1, 2, 64]))
    with pytest.raises(ValueError, match="pos must be a long tensor"):
        m(torch.zeros(1, 4, dtype=torch.long), pos=torch.arange(3))
    with pytest.raises(ValueError, match="attn_mask must be a bool tensor"):
        m(torch.zeros(1, 4, dtype=torch.long), attn_mask=torch.ones(1, 4, 4))


def test_n_head_must_divide_n_embd(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="n_head must divide n_embd, got n_head=3, n_embd=128"):
        GPT(GPTConfig(n_head=3, n_embd=128))
    d = copy_dir(hf_dir[0], tmp_path / "m")
    edit_config(d, n_head=3)  # the same mistake in a Hugging Face folder names the file
    with pytest.raises(ValueError, match=r"m/config.json: n_head=3 must divide n_embd=64"):
        GPT.from_pretrained(d)
    edit_config(d, n_head=0)
    with pytest.raises(ValueError, match=r"m/config.json: missing GPT-2 config keys \['n_head'\]"):
        GPT.from_pretrained(d)


# -----------------------------------------------------------------------------
# packed sequences, log-probs, gradient checkpointing, flops, init


def test_packed_sequences_match_separate_runs():
    m = our_tiny()
    idx, pos, doc, mask, (ra, rb, rc) = packed_inputs(m)
    for msk in (mask, mask[:, None]):
        out = m(idx, pos=pos, attn_mask=msk)
        assert torch.isfinite(out).all()  # padding rows included
        assert (out[0, :5] - ra).abs().max() <= 1e-5
        assert (out[0, 5:12] - rb).abs().max() <= 1e-5
        assert (out[1] - rc).abs().max() <= 1e-5
        # documented: a padding row that attends to nothing attends to itself alone
        assert (out[0, 12] - m(idx[:1, 12:13], pos=pos[:1, 12:13])[0, 0]).abs().max() <= 1e-5
    # (T,) positions broadcast over the batch
    assert (m(idx[1:], pos=torch.arange(15))[0] - rc).abs().max() <= 1e-5


def test_packed_sequences_flex_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask
    m = our_tiny()
    idx, pos, doc, mask, (ra, rb, rc) = packed_inputs(m)

    def mask_mod(b, h, q, k):
        return (doc[b, q] == doc[b, k]) & (doc[b, q] >= 0) & (q >= k)
    with warnings.catch_warnings(), torch.no_grad():  # flex_attention has no backward on CPU
        warnings.simplefilter("ignore")  # eager flex_attention on CPU warns that it is slow
        bm = create_block_mask(mask_mod, 2, None, 15, 15, device="cpu")
        out = m(idx, pos=pos, attn_mask=bm)
    assert (out[0, :5] - ra).abs().max() <= 1e-5
    assert (out[0, 5:12] - rb).abs().max() <= 1e-5
    assert (out[1] - rc).abs().max() <= 1e-5


def test_token_logprobs_matches_log_softmax():
    m = our_tiny()
    idx = tokens(3, 17)
    targets = tokens(3, 17, seed=5)
    w = torch.randn(3, 17)  # arbitrary weights so every position's gradient matters

    m.zero_grad()
    lp = m.token_logprobs(m.hidden(idx), targets, chunk_size=7)  # 51 rows: chunks of 7, last one partial
    (lp * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}

    m.zero_grad()
    ref = F.log_softmax(m(idx).float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    (ref * w).sum().backward()
    assert lp.dtype == torch.float32 and lp.shape == (3, 17)
    assert (lp - ref).abs().max() <= 1e-5
    for n, p in m.named_parameters():
        assert (grads[n] - p.grad).abs().max() <= 1e-5, n
    with torch.no_grad():
        assert (m.token_logprobs(m.hidden(idx), targets, chunk_size=5) - ref).abs().max() <= 1e-5


def test_token_logprobs_never_saves_full_logits():
    m = our_tiny()
    idx, targets = tokens(4, 16), tokens(4, 16, seed=7)  # N = 64 rows, V = 1000
    h = m.hidden(idx).detach().requires_grad_()
    saved = []
    params = list(m.parameters())  # the lm_head weight itself is saved, but it is no new memory
    pack = lambda t: saved.append(0 if any(t is p for p in params) else t.numel()) or t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = m.token_logprobs(h, targets, chunk_size=16)
    assert max(saved, default=0) < 64 * 1000 / 2  # at most one chunk's logits, here none
    lp.sum().backward()
    ref = F.log_softmax(m.lm_head(h).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(torch.autograd.grad(ref.sum(), h)[0], h.grad, atol=1e-6)


def test_token_logprobs_float32_under_bf16_autocast():
    m = our_tiny()
    idx, targets = tokens(2, 9), tokens(2, 9, seed=6)
    with torch.no_grad():
        ref = F.log_softmax(m(idx).double(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = m.token_logprobs(m.hidden(idx), targets)
    assert lp.dtype == torch.float32
    assert (lp.double() - ref).abs().max() <= 0.2  # bf16 matmuls, float32 normalization


@pytest.mark.parametrize("chunk", [7, 1000])  # several chunks (recomputed in backward), one chunk (kept)
def test_token_logprobs_sum_sq_matches_a_full_softmax_and_leaves_the_gradient(chunk):
    # WPO's per-token term log sum_v p(v)^2, from the chunked lm_head, against float64
    # full-vocabulary softmaxes
    m = tiny_model(3)
    idx = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(1))
    h = m.hidden(idx)
    lp, sq = m.token_logprobs(h, targets, chunk_size=chunk, sum_sq=True)
    logp = F.log_softmax(m.lm_head(h).double(), -1)  # (3, 17, V)
    want = torch.log((logp.exp() ** 2).sum(-1))
    assert sq.shape == (3, 17) and not sq.requires_grad
    torch.testing.assert_close(sq.double(), want, atol=1e-5, rtol=1e-5)
    assert (want < 0).all() and (want > logp.max(-1).values * 2 - 1e-9).all()  # log max p^2 <= it <= 0
    plain = m.token_logprobs(h, targets, chunk_size=chunk)
    assert torch.equal(lp, plain)
    g1 = torch.autograd.grad(lp.sum(), h, retain_graph=True)[0]
    g2 = torch.autograd.grad(plain.sum(), h)[0]
    assert torch.equal(g1, g2)


def test_gradient_checkpointing_same_grads_less_memory():
    m = our_tiny().train()
    idx = tokens(2, 32)

    def run():
        m.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = m(idx).float().logsumexp(-1).mean()
        loss.backward()
        return sum(saved), {n: p.grad.clone() for n, p in m.named_parameters()}
    saved_plain, g_plain = run()
    m.gradient_checkpointing = True
    saved_ckpt, g_ckpt = run()
    assert saved_ckpt < saved_plain / 2  # block internals are not kept for backward
    for n in g_plain:
        assert (g_plain[n] - g_ckpt[n]).abs().max() <= 1e-6, n


def test_flops_hand_count():
    m = GPT(GPTConfig(**TINY))
    L, C, V = 2, 64, 1000
    per_layer = (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 4 * C  # attn, mlp, 2 LN
    blocks = L * per_layer + 2 * C  # + ln_f; the lm_head (tied wte) only on predicted positions, wpe a lookup
    # 10 tokens in, 4 of them predict a response token, attention over 1+2+...+10 (query, key) pairs
    assert m.flops(10, 4, 55) == 6 * blocks * 10 + 6 * V * C * 4 + 12 * L * C * 55
    assert m.num_params(non_embedding=False) == L * per_layer + 2 * C + V * C + 64 * C


def test_init_scales():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=128, vocab_size=500, block_size=32))
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(m.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert abs(m.transformer.h[0].attn.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert m.transformer.h[0].attn.c_attn.bias.abs().max() == 0
