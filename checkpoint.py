"""
checkpoint.py: how a dpo.py run loads its models, starts or resumes, saves and ends (launch.py:
where it computes, its lock and its stop signals).
A checkpoint is the full (unsharded) state, written atomically, with the identity of the run's data
and reference (its source and a hash of its weights): a resume on any number of ranks continues the
run as it was, with the options from the checkpoint and the changes the command line names.
"""
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
from dataclasses import asdict

import torch
import torch.distributed as dist

import configurator
from launch import is_rank0, print0
from model import GPT, GPTConfig
from shards import list_shards, load_pairs
from weights import is_hub_repo

SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias")
# the options a resume refuses to change: they would break the run
FIXED = ("seed", "global_batch_size", "loss_type", "layout", "reference", "truncate") + SHAPE
MACHINE = ("device", "dtype", "compile", "fsdp")  # this launch's (an FSDP run may resume unsharded)
# what --init_from=resume reads from a checkpoint besides the weights
RESUME_NEEDS = {"config": "options", "optimizer": "optimizer state", "iter_num": "step",
                "rng_cpu": "random state", "ref_from": "reference source"}

def one_line(error, limit):
    return " ".join(str(error).split())[:limit]

# ---- loading: models, checkpoints, a run's reference
def load_model(source, cfg):
    """scratch, a GPT-2 name, a Hugging Face folder, or our checkpoint (a ckpt.pt or its folder)"""
    if source == "scratch":
        torch.manual_seed(cfg.seed)  # the same seed, the same init: a resume rebuilds its reference
        block_size = cfg.block_size or data_block_size(cfg.data_dir)
        return GPT(GPTConfig(block_size=block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    hub_name = (source.startswith("gpt2") or is_hub_repo(source)) and not os.path.exists(source)
    if hub_name or os.path.isfile(os.path.join(source, "config.json")):
        return GPT.from_pretrained(source, dropout=cfg.dropout)
    path = checkpoint_path(source)
    if path is None:
        raise FileNotFoundError(f"init_from={source}: expected scratch, gpt2[-medium|-large|-xl], a hub repo "
                                f"user/name, a Hugging Face folder with config.json, or a checkpoint file / "
                                f"folder with ckpt.pt; found none")
    return model_from_checkpoint(read_checkpoint(path), cfg, path)

def data_block_size(data_dir):
    """block_size=0: the longest prompt + response, at most GPT-2's 1024 (1024 without data)"""
    longest = 0
    for split in ("train", "val"):
        for path in list_shards(data_dir, split, required=False):
            lengths = load_pairs(path).lengths  # (N, 3) prompt, chosen, rejected
            if len(lengths):
                longest = max(longest, int((lengths[:, 0] + lengths[:, 1:].max(1)).max()))
    return min(1024, longest or 1024)

def data_hashes(data_dir):
    """one read of every shard -> the hash of all the pairs (a resume's identity of its data, which
    may sit under another path) and each split's own (its reference cache's key); names and bytes"""
    whole = hashlib.sha256()
    split_hash = {}
    for split in ("train", "val"):
        part = hashlib.sha256()
        for path in list_shards(data_dir, split, required=split == "train"):
            name = os.path.basename(path).encode()
            whole.update(name)
            part.update(name)
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    whole.update(chunk)
                    part.update(chunk)
        split_hash[split] = part.hexdigest()[:16]
    return whole.hexdigest()[:16], split_hash

def data_hash(data_dir):
    return data_hashes(data_dir)[0]

def weights_hash(model):
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

def checkpoint_path(source):
    """our checkpoint file for a ckpt.pt path or the folder holding it; None if there is none"""
    path = os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source
    return path if os.path.isfile(path) else None

def read_checkpoint(path, mmap=False):
    """mmap: the tensors are not read until used (a resume reads the config first)"""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, empty, not a torch file, or a pickle we refuse to run
        why = f"{type(e).__name__}: {one_line(e, 100)}"
        raise ValueError(f"{path}: not a readable checkpoint ({why})") from None
    if not isinstance(ck, dict) or "model" not in ck or "model_config" not in ck:
        raise ValueError(f"{path}: not a dpo.py checkpoint (no model / model_config)")
    return ck

def model_from_checkpoint(ck, cfg, path):
    try:
        model = GPT(GPTConfig(**{**ck["model_config"], "dropout": cfg.dropout}))
        model.load_state_dict(ck["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: its weights do not match its model config ({one_line(e, 200)})") from None
    return model

def load_run(path, cfg, ck=None):
    """a checkpoint -> (ck, policy, reference or None), the reference from its recorded source"""
    ck = ck or read_checkpoint(path)
    policy = model_from_checkpoint(ck, cfg, path)
    source = ck.get("ref_from")
    if not source:
        return ck, policy, None
    ref_cfg = cfg
    if source == "scratch":  # never the command line's seed and shape
        shape = {k: ck["model_config"][k] for k in SHAPE}
        ref_cfg = dataclasses.replace(cfg, seed=ck.get("ref_seed", ck["config"]["seed"]), **shape)
    elif ck.get("ref_rel") and not os.path.exists(source):  # moved together with the run
        near = os.path.normpath(os.path.join(os.path.dirname(path), ck["ref_rel"]))
        if os.path.exists(near):
            source = near
    reference = load_model(source, ref_cfg)
    h = weights_hash(reference)
    if ck.get("ref_hash") not in (None, h):
        raise ValueError(f"{path}: its reference {ck['ref_from']} changed since this run started (weights {h}, "
                         f"the checkpoint recorded {ck['ref_hash']}): restore it, or start a new run")
    return ck, policy, reference

# ---- starting a run: fresh, or resumed from out_dir's checkpoint
def read_resumable(out_dir, mmap=False):
    """-> (out_dir's checkpoint, its path); refused if it lacks what --init_from=resume needs"""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from=resume: no checkpoint at {path}")
    ck = read_checkpoint(path, mmap=mmap)
    missing = [f"{what} ({key})" for key, what in RESUME_NEEDS.items() if key not in ck]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} saved, which --init_from=resume needs; "
                         f"--init_from={path} starts a new run from its weights")
    return ck, path

def show(value):
    """an option's value as the command line writes it"""
    return str(value).lower() if isinstance(value, bool) else value

def resume_config(out_dir, argv, cls, check):
    """--init_from=resume: the options from the checkpoint (the shape from its model), changed where
    the command line or a --config file names one; each change printed once check(cfg) passed, one
    that breaks the run refused. start() then checks the data and the reference and loads it"""
    ck, path = read_resumable(out_dir, mmap=True)
    saved = {**ck["config"], **{k: ck["model_config"][k] for k in SHAPE}}
    saved = {k: v for k, v in saved.items() if k not in ("out_dir", "init_from")}  # this command's
    cfg = configurator.parse(argv, cls, {k: v for k, v in saved.items() if k not in MACHINE})
    # {option: (the run's value, this launch's)}; an option this version no longer has is no change
    changes = {k: (old, getattr(cfg, k)) for k, old in saved.items() if getattr(cfg, k, old) != old}
    breaking = {k: change for k, change in changes.items() if k in FIXED}
    # other data is named with the rest of the breaking changes (start checks it too)
    if breaking and list_shards(cfg.data_dir, "train", required=False):
        if ck.get("data_hash") not in (None, data_hash(cfg.data_dir)):
            breaking["data_dir"] = (ck["config"]["data_dir"], f"{cfg.data_dir} (other data)")
    if breaking:
        asked = ", ".join(f"--{k}={show(new)}" for k, (old, new) in breaking.items())
        had = ", ".join(f"{k}={show(old)}" for k, (old, new) in breaking.items())
        them = "them" if len(breaking) > 1 else "it"
        files = [arg.partition("=")[2] for arg in argv if arg.startswith("--config=")]
        where = f" (from the command line or {files[-1]})" if files else ""
        raise ValueError(f"resume: {asked} would break the run in {path} ({had} there): drop "
                         f"{them}{where} to continue the run as it was, or start a new run from "
                         f"its weights: --init_from={path} --out_dir=NEW")
    check(cfg)
    for k, (old, new) in changes.items():
        launch = f" (this launch's; --{k}={show(old)} keeps the run's)" if k in MACHINE else ""
        print0(f"resume: {k} {show(old)} -> {show(new)}{launch}")
    return cfg

def start(cfg):
    """-> (policy, reference, the checkpoint resumed from or None, meta). meta, saved in every
    checkpoint: the reference's source (absolute, relative to out_dir), hash, seed; the data hashes"""
    if cfg.init_from == "resume":  # resume_config took the options from the checkpoint
        ck, path = read_resumable(cfg.out_dir)
        h, split_hash = data_hashes(cfg.data_dir)
        if ck.get("data_hash") not in (None, h):  # the same data may sit under another path
            raise ValueError(f"resume: {cfg.data_dir} holds other data than the run in {path} trained on "
                             f"(from {ck['config']['data_dir']}): restore it, or start a new run: "
                             f"--init_from={path} --out_dir=NEW")
        ck, model, ref_model = load_run(path, cfg, ck)
        if "ref_model" in ck:  # TR-DPO: the reference as synced so far (its meta: the first's)
            ref_model.load_state_dict(ck["ref_model"])
        meta = dict(ref_from=ck["ref_from"], ref_hash=ck.get("ref_hash") or weights_hash(ref_model),
                    ref_rel=ck.get("ref_rel"), ref_seed=ck.get("ref_seed", ck["config"]["seed"]),
                    data_hash=h, split_hash=split_hash)
        return model, ref_model, ck, meta
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    source = checkpoint_path(cfg.init_from) if cfg.init_from != "scratch" else None
    if source and os.path.realpath(source) == os.path.realpath(ckpt):
        raise ValueError(f"init_from={cfg.init_from} is out_dir's own checkpoint: this run would overwrite its "
                         f"reference. choose another --out_dir (or --init_from=resume to continue it)")
    if os.path.isfile(ckpt):
        print0(f"note: {ckpt} from an earlier run will be replaced (--init_from=resume continues it instead)")
    model = load_model(cfg.init_from, cfg)
    ref_from, ref_rel = cfg.init_from, None
    if os.path.exists(cfg.init_from):  # a path
        ref_from = os.path.abspath(cfg.init_from)
        ref_rel = os.path.relpath(ref_from, cfg.out_dir)
    h, split_hash = data_hashes(cfg.data_dir)
    meta = dict(ref_from=ref_from, ref_hash=weights_hash(model), ref_rel=ref_rel, ref_seed=cfg.seed,
                data_hash=h, split_hash=split_hash)
    return model, model, None, meta

# ---- saving and restoring
def atomic_save(obj, path, what):
    """write, then rename: a crash or a full disk mid-save leaves the previous file intact"""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save: a RuntimeError on a full disk
        full = isinstance(e, RuntimeError) or e.errno == errno.ENOSPC
        why = f"the disk is full? torch.save: {one_line(e, 80)}"
        if isinstance(e, OSError):
            why = e.strerror or str(e)
        free = ""
        if full:
            folder = os.path.dirname(path) or "."
            gib = shutil.disk_usage(folder).free / 2 ** 30
            free = f"; free space on the disk of {folder} ({gib:.1f} GiB free now)"
        raise OSError(f"could not write {what} {path} ({why}); the previous file is intact{free}") from None
    finally:
        with contextlib.suppress(OSError):  # a failed save or a second Ctrl-C: no temp file stays
            os.remove(tmp)

def save(cfg, model, optimizer, it, meta):
    """all ranks gather the full (unsharded) state; rank 0 writes one ckpt.pt"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    if not is_rank0():
        return
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not all(v.isfinite().all() for v in model_state.values()):
        raise FloatingPointError(f"step {it}: the weights are not finite; not saved (the last good "
                                 f"checkpoint is {path}). try a lower learning_rate or beta")
    rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    state = {"model": model_state, "model_config": asdict(model.config), "optimizer": optimizer_state,
             "config": asdict(cfg), "iter_num": it, **meta, "rng_cpu": torch.get_rng_state(), "rng_cuda": rng_cuda}
    atomic_save(state, path, "the checkpoint")

def restore(ck, model, optimizer, device):
    """the optimizer state and random generators of a checkpoint; -> the step to continue from"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, ck["optimizer"], options=options)
    torch.set_rng_state(ck["rng_cpu"])
    if ck.get("rng_cuda") and device.type == "cuda":
        torch.cuda.set_rng_state_all(ck["rng_cuda"])
    return ck["iter_num"]

def cached(path, n, run, compute):
    """(n,) chosen and (n,) rejected float32 tables from path, else compute() them and store them"""
    table = torch.zeros(3, n, dtype=torch.float32, device=run.device)  # chosen, rejected, 1 = read
    if run.rank == 0 and os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            table = torch.stack([saved["chosen"], saved["rejected"], torch.ones(n)]).float().to(run.device)
        except Exception as e:  # truncated, foreign, wrong length: computed again
            print0(f"{path}: unreadable reference cache ({type(e).__name__}: {one_line(e, 80)}); computing it again")
    if run.world > 1:  # rank 0 read it: other nodes may not see its filesystem
        dist.broadcast(table, 0)
    if table[2, 0] == 1:
        return table[0].cpu(), table[1].cpu()
    chosen, rejected = compute()
    if run.rank == 0:
        atomic_save({"chosen": chosen, "rejected": rejected}, path, "the reference cache")
    return chosen, rejected

# ---- the run's log, its lock, its end and its stop signal
def logged_before(line, ck):
    """a metrics.jsonl line written before the checkpoint ck: a resume keeps it"""
    try:
        rec = json.loads(line)
    except ValueError:  # the last line, cut short by a kill
        return False
    if rec["iter"] != ck["iter_num"]:
        return rec["iter"] < ck["iter_num"]
    return "lr" not in rec and not ck.get("stopped")  # its eval, unless a stop saved before it

def metrics_log(cfg, stack, ck):
    """-> log(record): rank 0 writes metrics.jsonl and wandb"""
    if not is_rank0():
        return lambda rec: None
    if cfg.wandb_log:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if ck and os.path.exists(path):  # a resume redoes the steps after its checkpoint: logged again
        with open(path, "rb+") as f:
            kept = 0
            for line in f:
                if not logged_before(line, ck):
                    break
                kept += len(line)
            f.truncate(kept)
    f = stack.enter_context(open(path, "a" if ck else "w"))

    def log(rec):
        print(json.dumps(rec), file=f, flush=True)
        if cfg.wandb_log:
            wandb.log(rec, step=rec["iter"])
    return log

def finish(cfg, model, step):
    """the end of a run: the Hugging Face export if asked, and where the result is"""
    hf = os.path.join(cfg.out_dir, "hf")
    if cfg.export_hf:  # every rank: FSDP gathers the full weights from the shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
        weights = get_model_state_dict(model, options=options)
        if is_rank0():
            model.save_pretrained(hf, weights)
    result = f"finished step {step}, no checkpoint (--save_checkpoint=false)"
    if cfg.save_checkpoint:
        result = f"saved {os.path.join(cfg.out_dir, 'ckpt.pt')} (step {step})"
    if cfg.export_hf:
        result += f" and {hf} (transformers)"
    print0(f"{result}; metrics in {os.path.join(cfg.out_dir, 'metrics.jsonl')}")
