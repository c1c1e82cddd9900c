"""
checkpoint.py: how a dpo.py run starts, saves, resumes and stops, kept out of the trainer so dpo.py reads as DPO.

- where it computes: device, dtype, torchrun's process group (setup -> Run)
- models from any source: scratch, a GPT-2 name, a Hugging Face folder, one of our checkpoints
- the reference's identity: a run records where its reference came from and a hash of its weights; a resume (or
  sample.py) rebuilds that reference and refuses one whose weights changed
- checkpoints hold the full (unsharded) state, written atomically: any world size resumes bit for bit
- what it writes besides: the cached reference log-probs, metrics.jsonl and wandb
- a resume continues the run as it was: its options come from the checkpoint, the command line changes only what it
  names, and a change that would break the run (its data, model shape, loss, seed, batch, layout, reference) is refused
- one trainer per out_dir (a file lock), and SIGINT/SIGTERM finish the step, save and exit
"""
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import configurator
from model import GPT, GPTConfig
from prepare import list_shards, load_pairs


@dataclass
class Run:
    """where and how this process computes: decided once, from the config and torchrun's environment"""
    rank: int
    world: int
    device: torch.device
    dtype: str  # float32 | bfloat16
    ctx: contextlib.AbstractContextManager  # bf16 autocast, or nothing
    compile: bool  # torch.compile the transformer
    flex: bool  # FlexAttention block masks (CUDA, packed): compiled kernels that skip masked-out blocks
    cfg: object  # dpo.Config
    shape: object = None  # dpo.Shape, set once the data is loaded (make_shape)

def print0(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)

def setup(cfg):
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: then one process group, nccl on GPUs, gloo on CPU"""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    elif cfg.fsdp:
        raise ValueError("--fsdp=true shards over torchrun's ranks: start it with torchrun (--nproc_per_node=1 works)")
    if cfg.global_batch_size % world:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} must be divisible by the {world} ranks")
    device = torch.device(device)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    compile_ = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
    return Run(rank, world, device, dtype, ctx, compile_, device.type == "cuda" and cfg.layout == "packed", cfg)

def load_model(source, cfg):
    """scratch, a GPT-2 name, a Hugging Face folder, or one of our checkpoints (a ckpt.pt or the folder holding it)"""
    if source == "scratch":
        torch.manual_seed(cfg.seed)  # the same seed gives the same init: a resumed run rebuilds its reference
        return GPT(GPTConfig(block_size=cfg.block_size or data_block_size(cfg.data_dir), n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    if (source.startswith("gpt2") and not os.path.exists(source)) or os.path.isfile(os.path.join(source, "config.json")):
        return GPT.from_pretrained(source, dropout=cfg.dropout)
    path = checkpoint_path(source)
    if path is None:
        raise FileNotFoundError(f"init_from={source}: expected scratch, gpt2[-medium|-large|-xl], a Hugging Face "
                                f"folder with config.json, or a checkpoint file / folder with ckpt.pt; found none")
    return model_from_checkpoint(read_checkpoint(path), cfg, path)

def data_block_size(data_dir):
    """block_size=0: the longest prompt + response of the data, at most GPT-2's 1024 positions (1024 without data)"""
    shards = [load_pairs(p) for split in ("train", "val") for p in list_shards(data_dir, split, required=False)]
    return min(1024, max((int((s.lengths[:, 0] + s.lengths[:, 1:].max(1)).max()) for s in shards if len(s)), default=1024))

def data_hash(data_dir):
    """the identity of data_dir's pairs, every shard's bytes: a resume may find its data under another path, not other data"""
    h = hashlib.sha256()
    for path in list_shards(data_dir, "train") + list_shards(data_dir, "val", required=False):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
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
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:100]})") from None
    if not isinstance(ck, dict) or not {"model", "model_config"} <= ck.keys():
        raise ValueError(f"{path}: not a dpo.py checkpoint (no model / model_config)")
    return ck

def model_from_checkpoint(ck, cfg, path="checkpoint"):
    try:
        model = GPT(GPTConfig(**{**ck["model_config"], "dropout": cfg.dropout}))
        model.load_state_dict(ck["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: its weights do not match its model config ({' '.join(str(e).split())[:200]})") from None
    return model

def weights_hash(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

def load_run(path, cfg, ck=None):
    """a checkpoint -> (ck, policy, reference); reference None if the run had none. the reference is rebuilt from its
    recorded source: scratch from the run's seed and model shape, never the command line's; a path that no longer
    exists is looked for where it was relative to the checkpoint (both moved together). changed weights: refused"""
    ck = ck or read_checkpoint(path)
    policy = model_from_checkpoint(ck, cfg, path)
    if not ck.get("ref_from"):
        return ck, policy, None
    source, ref_cfg = ck["ref_from"], cfg
    if source == "scratch":
        shape = {k: ck["model_config"][k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
        ref_cfg = dataclasses.replace(cfg, seed=ck.get("ref_seed", ck["config"]["seed"]), **shape)
    elif ck.get("ref_rel") and not os.path.exists(source):
        near = os.path.normpath(os.path.join(os.path.dirname(path), ck["ref_rel"]))
        source = near if os.path.exists(near) else source
    reference = load_model(source, ref_cfg)
    h = weights_hash(reference)
    if ck.get("ref_hash") not in (None, h):
        raise ValueError(f"{path}: its reference {ck['ref_from']} changed since this run started (weights {h}, the "
                         f"checkpoint recorded {ck['ref_hash']}): restore it, or start a new run")
    return ck, policy, reference

# what --init_from=resume needs besides the weights, and the options it cannot change without breaking the run
RESUME_NEEDS = {"config": "options", "optimizer": "optimizer state", "iter_num": "step", "rng_cpu": "random state",
                "ref_from": "reference source"}
FIXED = ("seed", "global_batch_size", "loss_type", "layout", "reference", "truncate")  # and the model's shape
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias")
MACHINE = ("device", "dtype", "compile", "fsdp")  # where it computes: this launch's (an FSDP run may resume unsharded)

def resumable(ck, path):
    missing = [f"{what} ({k})" for k, what in RESUME_NEEDS.items() if k not in ck]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} saved, which --init_from=resume needs; "
                         f"--init_from={path} starts a new run from its weights")

def show(v):  # as the command line writes it
    return str(v).lower() if isinstance(v, bool) else v

def refuse(path, changes, where=""):
    """changes: {option: (the run's value, the asked one)} that would break the run"""
    if changes:
        asked, had = (", ".join(f"{'--' * (i == 1)}{k}={show(c[i])}" for k, c in changes.items()) for i in (1, 0))
        them = "them" if len(changes) > 1 else "it"
        raise ValueError(f"resume: {asked} would break the run in {path} ({had} there): drop {them}{where} to continue the "
                         f"run as it was, or start a new run from its weights: --init_from={path} --out_dir=NEW")

def resume_config(out_dir, argv, cls):
    """--init_from=resume: every option from the checkpoint's config (the model's shape from the model itself), the
    command line (and a --config file) changes only what it names; -> the config. each change is printed once"""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from=resume: no checkpoint at {path}")
    ck = read_checkpoint(path, mmap=True)
    resumable(ck, path)
    saved = {**ck["config"], **{k: ck["model_config"][k] for k in SHAPE}}
    saved = {k: v for k, v in saved.items() if k not in ("out_dir", "init_from")}  # these are this command's
    cfg = configurator.parse(argv, cls, {k: v for k, v in saved.items() if k not in MACHINE})
    changes = {k: (v, getattr(cfg, k)) for k, v in saved.items() if getattr(cfg, k, v) != v}
    files = [a.partition("=")[2] for a in argv if a.startswith("--config=")]
    refuse(path, {k: c for k, c in changes.items() if k in FIXED + SHAPE}, f" (from the command line or {files[-1]})" if files else "")
    for k, (old, new) in changes.items():
        launch = f" (this launch's; --{k}={show(old)} keeps the run's)" if k in MACHINE else ""
        print0(f"resume: {k} {show(old)} -> {show(new)}{launch}")
    return cfg

def start(cfg):
    """-> (policy, reference model, the checkpoint resumed from or None, meta). meta is the reference's identity,
    saved in every checkpoint: its source (absolute, and relative to out_dir), weights hash and seed"""
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from == "resume":
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"init_from=resume: no checkpoint at {ckpt}")
        ck = read_checkpoint(ckpt)
        resumable(ck, ckpt)
        refuse(ckpt, {k: (v, getattr(cfg, k)) for k, v in ck["config"].items() if k in FIXED and v != getattr(cfg, k)})
        if ck.get("data_hash") not in (None, data_hash(cfg.data_dir)):
            raise ValueError(f"resume: {cfg.data_dir} holds other data than the run in {ckpt} trained on (from "
                             f"{ck['config']['data_dir']}): restore it, or start a new run: --init_from={ckpt} --out_dir=NEW")
        ck, model, ref_model = load_run(ckpt, cfg, ck)
        if "ref_model" in ck:  # TR-DPO: the reference as synced so far (its source and hash are the first one's)
            ref_model.load_state_dict(ck["ref_model"])
        meta = {"ref_from": ck["ref_from"], "ref_hash": ck.get("ref_hash") or weights_hash(ref_model),
                "ref_rel": ck.get("ref_rel"), "ref_seed": ck.get("ref_seed", ck["config"]["seed"]),  # the first run's
                "data_hash": ck.get("data_hash") or data_hash(cfg.data_dir)}
        return model, ref_model, ck, meta
    source = checkpoint_path(cfg.init_from) if cfg.init_from != "scratch" else None
    if source and os.path.realpath(source) == os.path.realpath(ckpt):
        raise ValueError(f"init_from={cfg.init_from} is out_dir's own checkpoint: this run would overwrite its "
                         f"reference. choose another --out_dir (or --init_from=resume to continue it)")
    if os.path.isfile(ckpt):
        print0(f"note: {ckpt} from an earlier run will be replaced (--init_from=resume continues it instead)")
    model = load_model(cfg.init_from, cfg)
    ref_from = os.path.abspath(cfg.init_from) if os.path.exists(cfg.init_from) else cfg.init_from
    rel = os.path.relpath(ref_from, cfg.out_dir) if os.path.isabs(ref_from) else None
    return model, model, None, {"ref_from": ref_from, "ref_hash": weights_hash(model), "ref_rel": rel, "ref_seed": cfg.seed,
                                "data_hash": data_hash(cfg.data_dir)}

def atomic_save(obj, path, what):
    """write, then rename: a crash or a full disk mid-save leaves the previous file intact and no temp file"""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or a second Ctrl-C mid-save: never a temp file left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ENOSPC  # torch.save's zip writer
        if not (full or isinstance(e, OSError)):  # raises a RuntimeError ("unexpected pos ...") on a full disk
            raise
        folder = os.path.dirname(path) or "."
        why = f"the disk is full? torch.save: {' '.join(str(e).split())[:80]}" if isinstance(e, RuntimeError) else e.strerror or e
        free = f"; free space on the disk of {folder} ({shutil.disk_usage(folder).free / 2 ** 30:.1f} GiB free now)" * full
        raise OSError(f"could not write {what} {path} ({why}); the previous file is intact{free}") from None

def save(cfg, model, optimizer, it, meta):
    """all ranks gather the full (unsharded) state; rank 0 writes one ckpt.pt that any world size can load"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized()))
    if int(os.environ.get("RANK", 0)) != 0:
        return
    if not all(v.isfinite().all() for v in msd.values()):
        raise FloatingPointError(f"step {it}: the weights are not finite; not saved (the last good checkpoint is "
                                 f"{os.path.join(cfg.out_dir, 'ckpt.pt')}). try a lower learning_rate or beta")
    state = {"model": msd, "model_config": asdict(model.config), "optimizer": osd, "config": asdict(cfg), "iter_num": it,
             **meta, "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    atomic_save(state, os.path.join(cfg.out_dir, "ckpt.pt"), "the checkpoint")

def restore(ck, model, optimizer, device):
    """the optimizer state and random generators of a checkpoint; -> the step to continue from"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, ck["optimizer"], options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(ck["rng_cpu"])
    if ck.get("rng_cuda") and device.type == "cuda":
        torch.cuda.set_rng_state_all(ck["rng_cuda"])
    return ck["iter_num"]

def cached(path, n, run, compute):
    """(n,) chosen and (n,) rejected float32 tables stored at path, else compute() them and store them. rank 0 reads
    the file and shares it (other nodes may not see its filesystem); an unreadable file is computed again"""
    found = torch.zeros(3, n, dtype=torch.float32, device=run.device)  # chosen, rejected, found in the file
    if run.rank == 0 and os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            found[0], found[1], found[2] = saved["chosen"], saved["rejected"], 1
        except Exception as e:  # truncated, foreign, wrong length: computed again
            found.zero_()
            print0(f"{path}: unreadable reference cache ({type(e).__name__}: {' '.join(str(e).split())[:80]}); computing it again")
    if run.world > 1:
        dist.broadcast(found, 0)
    if found[2, 0] == 1:
        return found[0].cpu(), found[1].cpu()
    chosen, rejected = compute()
    if run.rank == 0:
        atomic_save({"chosen": chosen, "rejected": rejected}, path, "the reference cache")
    return chosen, rejected

def logged_before(line, ck):
    """a metrics.jsonl line that a resume from ck keeps: written before its checkpoint (the steps after it are redone)"""
    try:
        rec = json.loads(line)
    except ValueError:  # the last line, cut short by a kill
        return False
    return rec["iter"] < ck["iter_num"] or (rec["iter"] == ck["iter_num"] and "lr" not in rec and not ck.get("stopped"))

def metrics_log(cfg, stack, ck):
    """-> log(record): rank 0 writes metrics.jsonl (a fresh file, or on a resume the records before its checkpoint,
    so a run killed after it logs its redone steps once) and wandb"""
    if int(os.environ.get("RANK", 0)) != 0:
        return lambda rec: None
    if cfg.wandb_log:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if ck and os.path.exists(path):  # killed after its checkpoint: the records at its end go, their steps are redone
        with open(path, "rb+") as f:
            kept = itertools.takewhile(lambda line: logged_before(line, ck), f.readlines())
            f.truncate(sum(map(len, kept)))
    f = stack.enter_context(open(path, "a" if ck else "w"))

    def log(rec):
        print(json.dumps(rec), file=f, flush=True)
        if cfg.wandb_log:
            wandb.log(rec, step=rec["iter"])
    return log

@contextlib.contextmanager
def lock(out_dir):
    """one trainer per out_dir: a second one refuses (the lock goes with the process, even on kill -9). rank 0 makes
    out_dir and holds the lock; a failed start that wrote nothing leaves out_dir as it found it (no .lock, no folder)"""
    if int(os.environ.get("RANK", 0)) != 0:
        yield
        return
    made, d = [], os.path.abspath(out_dir)
    while not os.path.isdir(d):  # the folders this run makes, deepest first
        made, d = made + [d], os.path.dirname(d)
    os.makedirs(out_dir, exist_ok=True)
    found = set(os.listdir(out_dir))
    with open(os.path.join(out_dir, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"out_dir={out_dir} is in use by another running trainer; wait for it or choose another out_dir") from None
        try:
            yield
        except BaseException:
            files = [os.path.join(out_dir, n) for n in set(os.listdir(out_dir)) - found]
            if not any(os.path.isdir(p) or os.path.getsize(p) for p in files):  # its lock and empty files only: no trace
                for p in files:
                    os.remove(p)
                for d in made:
                    with contextlib.suppress(OSError):
                        os.rmdir(d)
            raise

def finish(cfg, model, step):
    """the end of a run: the Hugging Face export if asked, and where the result is"""
    hf = os.path.join(cfg.out_dir, "hf")
    if int(os.environ.get("RANK", 0)) == 0 and cfg.export_hf:
        model.save_pretrained(hf)
    ckpt = f"saved {os.path.join(cfg.out_dir, 'ckpt.pt')} (step {step})" if cfg.save_checkpoint else \
        f"finished step {step}, no checkpoint (--save_checkpoint=false)"
    hf = f" and {hf} (transformers)" * cfg.export_hf
    print0(f"{ckpt}{hf}; metrics in {os.path.join(cfg.out_dir, 'metrics.jsonl')}")

class Stop:
    """SIGINT / SIGTERM (a cluster preempting the job): finish the step, save, exit. a second signal exits at once"""

    def __init__(self):
        self.asked, self.old = False, {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        if int(os.environ.get("RANK", 0)) == 0:  # os.write: a print here can re-enter a print the step is in
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step (again to quit now)\n".encode())

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)

class Interrupted(Exception):
    """raised after the stop checkpoint is saved (exit status 130)"""
