"""kdcache: data pruning with knowledge distillation from cached teacher logits."""

import os

__version__ = "0.1.0"

# numba (FFCV's compiler) picks TBB when it is installed, and its TBB pool hangs at exit in a process
# pinned to one CPU (taskset, a 1-CPU Slurm job); OpenMP has no such problem. Set before numba loads.
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")

# the public API for a training loop of one's own (docs/api.md); imported on first use, so that the CLI
# does not pay for it
_API = ("TeacherTargets", "SparseTargets", "DistillationLoss", "WithIndex", "rows_for", "store_keys")


def __getattr__(name: str):
    if name in _API:
        from . import api
        return getattr(api, name)
    if name == "dump_dataset":
        from .dataset_dump import dump_dataset
        return dump_dataset
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")


__all__ = ["__version__", *_API, "dump_dataset"]
