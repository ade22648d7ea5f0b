"""kdcache: data pruning with knowledge distillation from cached teacher logits."""

import os

__version__ = "0.1.0"

# numba (FFCV's compiler) picks TBB when it is installed, and its TBB pool hangs at exit in a process
# pinned to one CPU (taskset, a 1-CPU Slurm job); OpenMP has no such problem. Set before numba loads.
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
