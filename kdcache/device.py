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
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if name == "cuda" else torch.device(name)
    return torch.device(name)


def init_distributed(device: torch.device) -> bool:
    """Join torchrun's process group (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1; True when this
    call created it, so that the caller also destroys it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True
