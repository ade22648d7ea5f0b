"""Where the work runs: the device, and the process group when launched by torchrun."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU of this process's local rank when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but torch sees no CUDA device")
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        try:
            return torch.device(name)
        except RuntimeError:
            raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def rank() -> int:
    """This process's rank: the process group's once joined, torchrun's RANK before, else 0."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> bool:
    """Join torchrun's process group (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1; True when this
    call created it, so that the caller also destroys it."""
    if world_size() <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True
