"""
Hugging Face TRL's DPOTrainer: the speed we quote ours against, and a check that TRL's per-pair
log-probs and loss equal ours (model.py + dpo.dpo_loss) on the same weights and tokens.
TRL is not a dependency of this project: it lives in its own venv, next to the main one. From the
repository root:
    python3 -m venv .venv-trl
    .venv-trl/bin/pip install torch==2.13.0    # first, so pip keeps this torch (the CPU wheel)
    .venv-trl/bin/pip install trl tiktoken     # + transformers, datasets, accelerate
    .venv-trl/bin/python experiments/bench_trl.py --steps=6  # speed: 4x256 GPT-2, 8 HH pairs a step
    .venv-trl/bin/python experiments/bench_trl.py --check=1  # TRL vs ours: logps and loss, 6 pairs
    .venv-trl/bin/python experiments/bench_trl.py --check=2  # TRL's DPO options vs ours, 4 steps
The speed run's defaults: max_length 512, CPU, float32. On a GPU (bf16, TRL's default there), GPT-2
124M-shaped, our packed bench's batch (bash .ci/gpu --trl runs this):
    python experiments/bench_trl.py --device=cuda --n_layer=12 --n_head=12 --n_embd=768 \
        --global_batch_size=512 --batch_size=32
    ... --precompute_ref_log_probs=1    # TRL's reference log-probs computed once, before training
Prints one JSON line last. Options: --steps, --warmup, --check, --data, --seed, --device, --n_layer,
--n_head, --n_embd, --global_batch_size (pairs per optimizer step), --batch_size (pairs per
micro-step: TRL's per_device_train_batch_size), --max_length, --precompute_ref_log_probs, --pairs
(the first N pairs only; 0: all). TIKTOKEN_CACHE_DIR defaults to /work/shared/tiktoken. Time it on
an otherwise idle machine: load_avg_1m in the output says if it was not.
"""
import copy
import gzip
import hashlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time

if __name__ == "__main__" and ("--help" in sys.argv or "-h" in sys.argv):
    print(__doc__.strip())  # before importing TRL: only its own venv has it
    sys.exit(0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # dpo.py, model.py and prepare.py, for the checks
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: never ask the hub for anything
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one progress bar per dataset pass: noise in the logs
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken")  # GPT-2's BPE files, offline
import torch
import datasets
import transformers
import trl
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer

DATA = "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
EOT = 50256


def gpt2_tokenizer():
    """GPT-2's BPE as an HF tokenizer from tiktoken's cache (files named by the SHA-1 of their URL)"""
    cache = os.environ["TIKTOKEN_CACHE_DIR"]
    path = {}
    for name in ("encoder.json", "vocab.bpe"):
        path[name] = os.path.join(cache, hashlib.sha1((BPE_URL + name).encode()).hexdigest())
        if not os.path.isfile(path[name]):
            sys.exit(f"{path[name]} ({name}) not found: set TIKTOKEN_CACHE_DIR to tiktoken's cache "
                     f"of GPT-2's BPE")
    with open(path["encoder.json"], encoding="utf-8") as f:
        vocab = json.load(f)  # token -> id, 50257 entries
    with open(path["vocab.bpe"], encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]  # after the '#version' line
    merges = [tuple(line.split()) for line in lines if line]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token  # GPT-2 has no pad token; TRL's collator masks the padding anyway
    return tok


def hh_pairs(path):
    """HH rows -> {prompt, chosen, rejected}: prompt = chosen up to its last '\\n\\nAssistant:'"""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            ex = json.loads(line)
            cut = ex["chosen"].rfind("\n\nAssistant:")
            if cut < 0:
                continue
            prompt = ex["chosen"][:cut + len("\n\nAssistant:")]
            if not ex["rejected"].startswith(prompt):  # the transcripts differ before the last turn
                continue
            chosen = ex["chosen"][len(prompt):]
            rejected = ex["rejected"][len(prompt):]
            rows.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
    return rows


def gpt2(n_layer, n_embd, n_head, seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=50257,
                     n_positions=1024)
    return GPT2LMHeadModel(cfg).float()


def make_trainer(model, ref_model, tok, rows, batch_size, max_steps, seed, out_dir, accumulation=1,
                 device="cpu", max_length=512, precompute=False):
    on_cpu = {}  # elsewhere TRL's default: bf16
    if device == "cpu":
        on_cpu = dict(use_cpu=True, bf16=False, fp16=False)
    # TRL's defaults (sigmoid, beta 0.1, lr 1e-6, the reference run every step, gradient
    # checkpointing) except these
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_length=max_length, max_steps=max_steps,
        seed=seed, data_seed=seed, precompute_ref_log_probs=precompute, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=10**9, disable_tqdm=True,
        dataloader_num_workers=0, **on_cpu)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tok,
                      train_dataset=datasets.Dataset.from_list(rows))


class StepTimer(TrainerCallback):
    """wall time between optimizer steps (data, forward, reference, backward, AdamW, metrics)"""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are done, not only launched
        self.ends.append(time.perf_counter())


def bench(o):
    tok = gpt2_tokenizer()
    rows = hh_pairs(o["data"])[:o["pairs"] or None]  # TRL tokenizes them all before step 1
    gbs = o["global_batch_size"]
    bs = o["batch_size"]
    warmup = o["warmup"]
    if gbs % bs or warmup < 1:
        sys.exit(f"error: --global_batch_size={gbs} must be a multiple of --batch_size={bs}, "
                 f"and --warmup >= 1")
    model = gpt2(o["n_layer"], o["n_embd"], o["n_head"], o["seed"])
    # the reference is the initial policy, as TRL loads it when none is given;
    # with precomputed log-probs TRL keeps no reference model
    ref_model = None if o["precompute_ref_log_probs"] else copy.deepcopy(model)
    on_gpu = o["device"] != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()  # tokenizing (and a precomputed reference pass) happen here
        precompute = bool(o["precompute_ref_log_probs"])
        trainer = make_trainer(model, ref_model, tok, rows, bs, warmup + o["steps"], o["seed"], out_dir,
                               gbs // bs, o["device"], o["max_length"], precompute)
        init_s = time.perf_counter() - t0
        timer = StepTimer()
        trainer.add_callback(timer)
        t_start = time.perf_counter()
        trainer.train()
    first_step_s = timer.ends[0] - t_start
    ends = timer.ends
    dts = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]  # (steps,) after the warmup
    timed = " ".join(f"{dt:.2f}" for dt in dts)
    print(f"{len(rows)} pairs; trainer init {init_s:.2f}s; first step {first_step_s:.2f}s; "
          f"timed steps: {timed}", file=sys.stderr)
    med = statistics.median(dts)  # batches differ in length (padded to their longest): steps vary
    if on_gpu:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # RSS, in KiB on Linux
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    load = round(os.getloadavg()[0], 2)  # above the core count: something else shared the CPU
    return dict(trl_pairs_per_s=round(gbs / med, 4), trl_s_per_step_median=round(med, 4),
                steps=len(dts), trl_pairs_per_s_mean=round(gbs * len(dts) / sum(dts), 4),
                first_step_s=round(first_step_s, 2), init_s=round(init_s, 2), device=device,
                bf16=trainer.args.bf16, gradient_checkpointing=trainer.args.gradient_checkpointing,
                precompute_ref_log_probs=trainer.args.precompute_ref_log_probs,
                global_batch_size=gbs, batch_size=bs, model=f"{o['n_layer']}x{o['n_embd']}",
                max_length=o["max_length"], trl_version=trl.__version__,
                transformers_version=transformers.__version__, datasets_version=datasets.__version__,
                torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                peak_mb=round(peak_mb), load_avg_1m=load)


def naive_logps(model, prompt_ids, response_ids):
    """summed log p(response | prompt) from full logits, one unpadded sequence at a time"""
    idx = torch.tensor([prompt_ids + response_ids])  # (1, T)
    with torch.no_grad():
        logp = torch.log_softmax(model(idx).double(), dim=-1)  # (1, T, V)
    targets = idx[0, 1:]  # (T-1,) token t+1 is predicted at position t
    per_token = logp[0, :-1].gather(-1, targets[:, None])[:, 0]  # (T-1,)
    return per_token[len(prompt_ids) - 1:].sum()  # the response tokens only


def check(seed, data, n_pairs=6):
    import tiktoken
    import dpo
    from model import GPT
    tok = gpt2_tokenizer()
    rows = shortest_pairs(data, n_pairs)  # a quick check, no truncation
    policy = gpt2(2, 64, 2, seed)
    ref = gpt2(2, 64, 2, seed + 1)  # a different reference: loss != log 2
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(policy, ref, tok, rows, n_pairs, 1, seed, tmp)
        ex = [trainer.train_dataset[i] for i in range(n_pairs)]  # TRL's token ids, in row order
        batch = trainer._prepare_inputs(trainer.data_collator(ex))
        trainer.model.eval()
        with torch.no_grad():
            # the policy's log-probs: the same code on the other model
            trl_pc, trl_pr = trainer.compute_ref_log_probs(trainer.model, batch)
            trl_rc, trl_rr = trainer.compute_ref_log_probs(trainer.ref_model, batch)
            trl_loss = trainer.compute_loss(trainer.model, batch)
        for name, m in (("policy", policy), ("ref", ref)):
            m.save_pretrained(os.path.join(tmp, name))
        ours = {}
        for name in ("policy", "ref"):
            ours[name] = GPT.from_pretrained(os.path.join(tmp, name)).eval()
    # does TRL tokenize as tiktoken would (prompt, response and EOT encoded apart)? report it
    enc = tiktoken.get_encoding("gpt2")
    same_ids = 0
    for e, r in zip(ex, rows):
        same_ids += (e["prompt_ids"] == enc.encode(r["prompt"])
                     and e["chosen_ids"] == enc.encode(r["chosen"]) + [EOT]
                     and e["rejected_ids"] == enc.encode(r["rejected"]) + [EOT])
    lp = {}  # (model, side) -> (B,) float64
    for name, m in ours.items():
        for side in ("chosen", "rejected"):
            per_pair = [naive_logps(m, e["prompt_ids"], e[f"{side}_ids"]) for e in ex]
            lp[name, side] = torch.stack(per_pair)
    losses, _, _ = dpo.dpo_loss(lp["policy", "chosen"], lp["policy", "rejected"],
                                lp["ref", "chosen"], lp["ref", "rejected"],
                                beta=trainer.beta, loss_type="sigmoid")
    our_loss = losses.mean().item()
    res = dict(pairs=n_pairs, tiktoken_same_ids=same_ids, trl_loss=trl_loss.item(),
               our_loss=our_loss,
               max_diff_policy_chosen=max_diff(trl_pc, lp["policy", "chosen"]),
               max_diff_policy_rejected=max_diff(trl_pr, lp["policy", "rejected"]),
               max_diff_ref_chosen=max_diff(trl_rc, lp["ref", "chosen"]),
               max_diff_ref_rejected=max_diff(trl_rr, lp["ref", "rejected"]),
               loss_diff=abs(trl_loss.item() - our_loss), trl_version=trl.__version__)
    print("policy chosen logps, TRL:", [round(x, 4) for x in trl_pc.tolist()], file=sys.stderr)
    print("policy chosen logps, ours:", [round(x, 4) for x in lp["policy", "chosen"].tolist()],
          file=sys.stderr)
    return res


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def shortest_pairs(data, n):
    """the n HH pairs of the fewest characters"""
    rows = hh_pairs(data)
    rows.sort(key=lambda r: len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]))
    return rows[:n]


# TRL DPOConfig options -> the same run here (dpo.py options). TRL's sft term averages over the
# batch's tokens, ours per pair, and ORPO's NLL covers the prompt in TRL: README compares those.
ALPHA_03 = dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
SYNC_2 = dict(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.6)
ALL_THREE = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5,
                 ld_alpha=0.3, use_weighting=True)
JS = dict(f_divergence_type="js_divergence")
OPTION_CASES = [
    ("sigmoid", {}, {}),
    ("js_divergence", JS, JS),
    ("hinge, alpha_divergence 0.3", dict(loss_type=["hinge"], **ALPHA_03),
     dict(loss_type="hinge", **ALPHA_03)),
    ("sigmoid,bco_pair 0.8,0.2", dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2]),
     dict(loss_type="sigmoid,bco_pair", loss_weights="0.8,0.2")),
    ("ld_alpha 0.5", dict(ld_alpha=0.5), dict(ld_alpha=0.5)),
    ("use_weighting", dict(use_weighting=True), dict(use_weighting=True)),
    ("sync_ref_model tau 2 alpha 0.6", SYNC_2, SYNC_2),
    ("sync tau 1 alpha 0.5, ld_alpha 0.3, use_weighting", ALL_THREE, ALL_THREE),
]


def check_options(seed, data, steps=4, lr=1e-3, n_pairs=8):
    """each case trained `steps` steps by TRL and by dpo.train on the same weights and TRL's token
    ids; every step sees all pairs (one batch), constant lr, the same AdamW settings -> the per-step
    losses of both"""
    import numpy as np
    from pathlib import Path
    import dpo
    import prepare
    tok = gpt2_tokenizer()
    rows = shortest_pairs(data, n_pairs)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, trl_kw, our_kw in OPTION_CASES:
            policy = gpt2(2, 64, 2, seed)
            args = DPOConfig(
                output_dir=str(tmp / "trl"), per_device_train_batch_size=n_pairs, max_length=512,
                max_steps=steps, use_cpu=True, bf16=False, fp16=False, report_to="none",
                save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
                logging_steps=10**9, seed=seed, **trl_kw)
            trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=args,
                                 processing_class=tok, train_dataset=datasets.Dataset.from_list(rows))
            if not (tmp / "policy").exists():  # the same start and the same token ids for us
                policy.save_pretrained(tmp / "policy")
                ex = [trainer.train_dataset[i] for i in range(n_pairs)]
                lengths = [[len(e[f"{part}_ids"]) for part in ("prompt", "chosen", "rejected")] for e in ex]
                tokens = [e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"] for e in ex]
                (tmp / "data").mkdir()
                w = prepare.ShardWriter(tmp / "data", "train", n_pairs)
                w.add(np.array(lengths, dtype=np.int32), np.concatenate(tokens).astype(np.uint16))
                w.close()
            trl_losses = []
            compute = trainer.compute_loss

            def recorded(*a, **k):  # each step's loss, as TRL computed it
                loss = compute(*a, **k)
                trl_losses.append(loss.item())
                return loss
            trainer.compute_loss = recorded
            trainer.train()
            cfg = dpo.Config(
                out_dir=str(tmp / "ours"), data_dir=str(tmp / "data"),
                init_from=str(tmp / "policy"), reference="model", global_batch_size=n_pairs,
                batch_size=n_pairs, max_iters=steps, learning_rate=lr, min_lr=lr, warmup_iters=0,
                weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0, eval_interval=0,
                save_checkpoint=False, log_interval=10**9, device="cpu", compile="false", **our_kw)
            ours = [h["loss"] for h in dpo.train(cfg)]
            worst = max(abs(a - b) for a, b in zip(trl_losses, ours))
            out.append(dict(case=name, trl=trl_losses, ours=ours, max_abs_diff=worst))
            print(json.dumps(out[-1]), file=sys.stderr)
    worst = max(r["max_abs_diff"] for r in out)
    return dict(cases=len(out), max_abs_diff=worst, steps=steps, trl_version=trl.__version__)


def main(argv):
    opts = dict(steps=6, warmup=2, check=0, seed=1337, data=DATA, device="cpu", n_layer=4, n_head=4,
                n_embd=256, global_batch_size=8, batch_size=8, max_length=512,
                precompute_ref_log_probs=0, pairs=0)
    for arg in argv:
        key, _, val = arg.removeprefix("--").partition("=")
        if key not in opts or not val:
            sys.exit(f"unknown or empty option {arg!r}; "
                     f"expected --key=value with key in {sorted(opts)}")
        opts[key] = type(opts[key])(val)
    if not os.path.isfile(opts["data"]):
        sys.exit(f"{opts['data']} not found: expected Anthropic HH jsonl.gz "
                 f"(rows with 'chosen' and 'rejected')")
    if opts["device"] != "cpu" and not torch.cuda.is_available():
        sys.exit(f"error: --device={opts['device']} but torch {torch.__version__} "
                 f"sees no CUDA device")
    if opts["device"] == "cpu":
        torch.set_num_threads(2)
    if opts["check"] == 2:
        res = check_options(opts["seed"], opts["data"])
    elif opts["check"]:
        res = check(opts["seed"], opts["data"])
    else:
        res = bench(opts)
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
