"""
checkpoint.py: how a dpo.py run starts, saves, resumes and stops, kept out of the trainer so dpo.py reads as DPO.

- where it computes: device, dtype, torchrun's process group (setup -> Run)
- models from any source: scratch, a GPT-2 name, a Hugging Face folder, one of our checkpoints
- the reference's identity: a run records where its reference came from and a hash of its weights; a resume (or
  sample.py) rebuilds that reference and refuses one whose weights changed
- checkpoints hold the full (unsharded) state, written atomically: any world size resumes bit for bit
- what it writes besides: the cached reference log-probs, metrics.jsonl and wandb
- one trainer per out_dir (a file lock), and SIGINT/SIGTERM finish the step, save and exit
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import signal
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from model import GPT, GPTConfig


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
        return GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    if (source.startswith("gpt2") and not os.path.exists(source)) or os.path.isfile(os.path.join(source, "config.json")):
        return GPT.from_pretrained(source, dropout=cfg.dropout)
    path = checkpoint_path(source)
    if path is None:
        raise FileNotFoundError(f"init_from={source}: expected scratch, gpt2[-medium|-large|-xl], a Hugging Face "
                                f"folder with config.json, or a checkpoint file / folder with ckpt.pt; found none")
    return model_from_checkpoint(read_checkpoint(path), cfg, path)

def checkpoint_path(source):
    """our checkpoint file for a ckpt.pt path or the folder holding it; None if there is none"""
    path = os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source
    return path if os.path.isfile(path) else None

def read_checkpoint(path):
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
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

def data_hash(data):
    """identifies a dpo.PairData for the reference cache: every token and length, and the block size"""
    h = hashlib.sha256()
    for s in data.shards:
        h.update(s.tokens)  # the memmap, read once (about 1 s per 200M tokens)
    h.update(data.lengths.tobytes() + str(data.block_size).encode())
    return h.hexdigest()[:16]

def load_run(path, cfg):
    """a checkpoint -> (ck, policy, reference); reference None if the run had none. the reference is rebuilt from its
    recorded source: scratch from the run's seed and model shape, never the command line's; a path that no longer
    exists is looked for where it was relative to the checkpoint (both moved together). changed weights: refused"""
    ck = read_checkpoint(path)
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

def start(cfg):
    """-> (policy, reference model, the checkpoint resumed from or None, meta). meta is the reference's identity,
    saved in every checkpoint: its source (absolute, and relative to out_dir), weights hash and seed"""
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from == "resume":
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"init_from=resume: no checkpoint at {ckpt}")
        ck, model, ref_model = load_run(ckpt, cfg)
        if "ref_model" in ck:  # TR-DPO: the reference as synced so far (its source and hash are the first one's)
            ref_model.load_state_dict(ck["ref_model"])
        meta = {"ref_from": ck["ref_from"], "ref_hash": ck.get("ref_hash") or weights_hash(ref_model),
                "ref_rel": ck.get("ref_rel"), "ref_seed": ck.get("ref_seed", ck["config"]["seed"])}  # the first run's
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
    return model, model, None, {"ref_from": ref_from, "ref_hash": weights_hash(model), "ref_rel": rel, "ref_seed": cfg.seed}

def atomic_save(obj, path, what):
    """write, then rename: a crash or a full disk mid-save leaves the previous file intact and no temp file"""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or a second Ctrl-C mid-save: never a temp file left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(f"could not write {what} {path} ({e.strerror or e}); the previous file is intact") from None
        raise

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
    if ck["rng_cuda"] and device.type == "cuda":
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

def metrics_log(cfg, stack, append):
    """-> log(record): rank 0 writes metrics.jsonl (appended on a resume, else a fresh file) and wandb"""
    if int(os.environ.get("RANK", 0)) != 0:
        return lambda rec: None
    if cfg.wandb_log:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    f = stack.enter_context(open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a" if append else "w"))

    def log(rec):
        print(json.dumps(rec), file=f, flush=True)
        if cfg.wandb_log:
            wandb.log(rec, step=rec["iter"])
    return log

def lock(out_dir):
    """one trainer per out_dir: a second one refuses (the lock goes with the process, even on kill -9). rank 0 holds it"""
    if int(os.environ.get("RANK", 0)) != 0:
        return contextlib.nullcontext()
    f = open(os.path.join(out_dir, ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"out_dir={out_dir} is in use by another running trainer; wait for it or choose another out_dir") from None
    return f

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

    def agreed(self, device):
        """asked on any rank: all ranks stop after the same step"""
        asked = torch.tensor(float(self.asked), device=device)
        if dist.is_initialized():
            dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        return bool(asked.item())

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)

class Interrupted(Exception):
    """raised after the stop checkpoint is saved (exit status 130)"""
