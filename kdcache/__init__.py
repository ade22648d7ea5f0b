"""kdcache: data pruning with knowledge distillation from cached teacher logits."""

__version__ = "0.1.0"
