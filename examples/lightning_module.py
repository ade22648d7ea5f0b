"""Distil a student from a kdcache store with PyTorch Lightning: a LightningModule on a pruned subset.

    python examples/lightning_module.py --data imgs/ --cache cache.zarr --fraction 0.1 --epochs 30 --arch resnet8

The data, the subset, the optimiser and the schedule are examples/own_loop.py's (its options, plus --out);
what Lightning adds is the module: `on_fit_start` loads the kept samples' teacher targets onto the device
Lightning chose, and `training_step` looks a batch's up by its store rows. Prints one line per epoch (with
`samples=`, how many distinct store rows it trained on), and last `test_acc=<float>`. Needs
`pip install 'kdcache[lightning]'`.
"""
from __future__ import annotations

import logging
import tempfile
import time
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
from own_loop import alpha_of, kept_subset, lr_factor, parser, sgd, train_loader
from torch.utils.data import DataLoader

import kdcache
from kdcache.models import build_model


class Distiller(pl.LightningModule):
    """A student trained on (x, y, index) batches against the teacher targets of the store rows `rows`."""

    def __init__(self, model: torch.nn.Module, args, rows: np.ndarray):
        super().__init__()
        self.model, self.args, self.rows = model, args, rows
        self.seen: set[int] = set()

    def on_fit_start(self):  # the model is on its device now: load the targets there, once
        self.targets = kdcache.TeacherTargets(self.args.cache, rows=self.rows, device=self.device)
        self.loss_fn = self.targets.loss(alpha=alpha_of(self.args), temperature=self.args.temperature)
        self.start, self.images = time.perf_counter(), 0

    def training_step(self, batch, _):
        x, y, index = batch
        loss = self.loss_fn(self.model(x), y, self.targets(index))
        self.log_dict({"loss": loss, "ce": self.loss_fn.ce, "kl": self.loss_fn.kl}, on_step=False, on_epoch=True,
                      batch_size=len(x))
        self.seen.update(index.tolist())
        self.images += len(x)
        return loss

    def on_train_epoch_end(self):
        m = self.trainer.callback_metrics
        self.print(f"epoch={self.current_epoch + 1} samples={len(self.seen)} loss={m['loss']:.4f} "
                   f"ce={m['ce']:.4f} kl={m['kl']:.4f} "
                   f"img_per_s={self.images / (time.perf_counter() - self.start):.0f}", flush=True)
        self.seen.clear()

    def test_step(self, batch, _):
        x, y = batch
        self.log("test_acc", (self.model(x).argmax(1) == y).float().mean(), batch_size=len(y))  # weighted: exact

    def configure_optimizers(self):
        opt = sgd(self.model, self.args)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(int(self.trainer.estimated_stepping_batches)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv=None) -> float:
    p = parser(__doc__)
    p.add_argument("--out", default=None, help="Lightning's folder and its CSV log (metrics.csv) [default: a "
                   "temporary folder, no log]")
    args = p.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner of the devices found
    for noise in (".*does not have many workers", ".*LeafSpec"):  # advice for large data; Lightning on newer torch
        warnings.filterwarnings("ignore", noise)
    pl.seed_everything(args.seed, verbose=False)
    store, train_set, test_set, size, keep, rows = kept_subset(args)
    module = Distiller(build_model(args.arch, store.num_classes, size), args, rows)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or tmp
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                             devices=1, default_root_dir=root, enable_checkpointing=False,
                             logger=pl.loggers.CSVLogger(root, name="", version="") if args.out else False,
                             log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_loader(args, train_set, keep, rows))
        result = trainer.test(module, DataLoader(test_set, batch_size=512, num_workers=args.workers), verbose=False)
    accuracy = result[0]["test_acc"]
    print(f"test_acc={accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    import sys

    from kdcache.errors import UserError
    try:
        main()
    except UserError as e:  # a user's mistake: one line, as kdcache's CLI says it
        sys.exit(f"error: {e}")
