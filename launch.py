"""
launch.py: where and how a process computes (devices, dtype, torchrun's ranks), the one trainer an
out_dir may have (its lock), and the stop signals (SIGINT, SIGTERM) that end a run cleanly.
"""
import contextlib
import fcntl
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Run:
    """where and how this process computes: from the config and torchrun's environment"""
    rank: int
    world: int
    device: torch.device
    dtype: str  # float32 | bfloat16
    ctx: contextlib.AbstractContextManager  # bf16 autocast, or nothing
    compile: bool  # torch.compile the transformer
    flex: bool  # FlexAttention block masks (CUDA, packed): kernels that skip masked-out blocks
    cfg: object  # dpo.Config
    shape: object = None  # dpo.Shape, set once the data is loaded (make_shape)

def is_rank0():
    return int(os.environ.get("RANK", 0)) == 0

def print0(*args):
    if is_rank0():
        print(*args, flush=True)

def setup(cfg):
    """torchrun sets RANK, LOCAL_RANK, WORLD_SIZE: one process group, nccl on GPUs, gloo on CPU"""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ:
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    elif cfg.fsdp:
        raise ValueError("--fsdp=true shards over torchrun's ranks: start it with torchrun (--nproc_per_node=1 works)")
    if cfg.global_batch_size % world:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} must be divisible by the {world} ranks")
    device = torch.device(device)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    ctx = contextlib.nullcontext()
    if dtype == "bfloat16":
        ctx = torch.autocast(device.type, dtype=torch.bfloat16)
    compile_ = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
    flex = device.type == "cuda" and cfg.layout == "packed"
    return Run(rank=rank, world=world, device=device, dtype=dtype, ctx=ctx, compile=compile_, flex=flex, cfg=cfg)

@contextlib.contextmanager
def lock(out_dir):
    """one trainer per out_dir: a second one refuses (the lock goes with the process, even on
    kill -9). rank 0 makes out_dir and holds the lock; a start that fails early leaves no trace"""
    if not is_rank0():
        yield
        return
    made = []  # the folders this run makes, deepest first
    folder = os.path.abspath(out_dir)
    while not os.path.isdir(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(out_dir, exist_ok=True)
    found = set(os.listdir(out_dir))
    with open(os.path.join(out_dir, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"out_dir={out_dir} is in use by another running trainer; wait for it "
                             f"or choose another out_dir") from None
        try:
            yield
        except BaseException:
            new = [os.path.join(out_dir, name) for name in set(os.listdir(out_dir)) - found]
            if not any(os.path.isdir(p) or os.path.getsize(p) for p in new):  # only empty files
                for p in new:
                    os.remove(p)
                for d in made:
                    with contextlib.suppress(OSError):
                        os.rmdir(d)
            raise

class Stop:
    """SIGINT / SIGTERM (a cluster preempts the job): finish the step, save, exit; twice: quit.
    before the first step (during = what runs) either one quits at once"""

    def __init__(self):
        self.asked = False
        self.during = "setup"
        self.old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self, signum, frame):
        if self.asked or self.during:
            raise KeyboardInterrupt
        self.asked = True
        if is_rank0():  # os.write: a print here can re-enter a print the step is in
            name = signal.Signals(signum).name
            os.write(2, f"\n{name}: stopping after this step (again to quit now)\n".encode())

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)

class Interrupted(Exception):
    """raised after the stop checkpoint is saved (exit status 130)"""
