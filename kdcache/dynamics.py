"""Per-sample training dynamics (true-class probability, correctness, EL2N, margin per epoch) and the
difficulty scores derived from them: forgetting events, early EL2N, dynamic uncertainty, AUM.

Store layout, in any kdcache store (a logit cache or a store of its own), for each recorded run:
    dynamics/<run>/prob     (N, E) float32  softmax probability of the true class
    dynamics/<run>/correct  (N, E) int8     1 correct, 0 wrong, -1 not seen that epoch
    dynamics/<run>/el2n     (N, E) float32  ||softmax - onehot||_2
    dynamics/<run>/margin   (N, E) float32  true-class logit minus the largest other logit
Row = sample index, column = epoch; float entries of samples not seen in an epoch are NaN. The values
are those of the training forward pass (augmented inputs, weights moving within the epoch), as in
Toneva et al.; they cost nothing extra to compute.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import store
from .config import AUM_FRACTION, EARLY_FRACTION
from .device import rank
from .errors import UserError

ARRAYS = ("prob", "correct", "el2n", "margin")
DYNUNC_WINDOW = 10  # He et al. 2023 use J = 10


@contextmanager
def _quiet():
    """nan-aware reductions warn on all-NaN rows (never-seen samples): those rows are meant to be NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Toneva et al. 2019: how often each sample goes from correct to wrong between consecutive epochs
    in which it was seen. `correct` is (N, E) of 1/0, with NaN (float) or -1 (int) where unseen.

    Samples never classified correctly rank hardest: they get E + 1, above the most events possible
    (E // 2). Samples never seen at all get NaN."""
    c = np.asarray(correct, dtype=np.float64)
    c = np.where(c < 0, np.nan, c)
    n, e = c.shape
    seen = ~np.isnan(c)
    # value at the latest seen epoch before t (NaN if none): forward-fill, then shift by one
    last = np.where(seen, np.arange(e), -1)
    np.maximum.accumulate(last, axis=1, out=last)
    prev_idx = np.concatenate([np.full((n, 1), -1), last[:, :-1]], axis=1)
    prev = np.where(prev_idx >= 0, np.take_along_axis(np.nan_to_num(c), np.maximum(prev_idx, 0), 1), np.nan)
    events = (seen & (prev == 1) & (c == 0)).sum(1).astype(np.float32)
    learned = (c == 1).any(1)
    events[~learned] = e + 1
    events[~seen.any(1)] = np.nan
    return events


def early_epoch(epochs: int, fraction: float) -> int:
    """The column `fraction` into training: the end of epoch round(fraction * E), counted from 1."""
    return int(min(epochs - 1, max(0, round(fraction * epochs) - 1)))


def el2n_early(el2n_runs: list[np.ndarray], epoch: int) -> np.ndarray:
    """Paul et al. 2021: EL2N at `epoch`, averaged over runs (seeds). A sample not seen at `epoch` in
    a run (one trained on a subset, or resumed past that epoch) takes that run's value from its nearest
    seen epoch (earlier on a tie)."""
    values = []
    for el2n in el2n_runs:
        el2n = np.asarray(el2n, dtype=np.float64)
        seen = ~np.isnan(el2n)
        distance = np.abs(np.arange(el2n.shape[1]) - epoch) * 2 + (np.arange(el2n.shape[1]) > epoch)
        distance = np.where(seen, distance, np.iinfo(np.int64).max)
        nearest = distance.argmin(1)
        values.append(np.where(seen.any(1), el2n[np.arange(len(el2n)), nearest], np.nan))
    with _quiet():
        return np.nanmean(np.stack(values), axis=0).astype(np.float32)


def dynamic_uncertainty(prob: np.ndarray, window: int = DYNUNC_WINDOW) -> np.ndarray:
    """He et al. 2023: the standard deviation (ddof=1, as in the paper) of the true-class probability
    over each window of `window` consecutive epochs, averaged over the E - window + 1 windows.
    `window` is clipped to E; unseen epochs (NaN) are left out of their windows."""
    prob = np.asarray(prob, dtype=np.float64)
    epochs = prob.shape[1]
    window = min(window, epochs)
    if window < 2:
        return np.full(len(prob), np.nan, dtype=np.float32)
    # per-window count, sum and sum of squares from running sums (values are probabilities in [0, 1],
    # so float64 loses nothing to cancellation)
    seen = ~np.isnan(prob)
    x = np.where(seen, prob, 0.0)
    def window_sums(a):
        c = np.concatenate([np.zeros((len(a), 1)), np.cumsum(a, axis=1)], axis=1)
        return c[:, window:] - c[:, :-window]  # (N, E - window + 1)
    n, s, q = window_sums(seen.astype(np.float64)), window_sums(x), window_sums(x * x)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.maximum(q - s * s / n, 0) / (n - 1))
    std[n < 2] = np.nan  # fewer than two seen epochs in the window: no spread to measure
    with _quiet():
        return np.nanmean(std, axis=1).astype(np.float32)


def aum_epochs(epochs: int, fraction: float) -> int:
    """How many of the first epochs AUM averages: round(fraction * E), at least 1."""
    return max(1, round(fraction * epochs))


def aum(margin: np.ndarray, fraction: float = AUM_FRACTION) -> np.ndarray:
    """Area under the margin (Pleiss et al. 2020): the true-class logit margin averaged over the first
    `fraction` of the epochs. Low (negative) AUM marks hard or mislabelled samples."""
    margin = np.asarray(margin, dtype=np.float64)
    with _quiet():
        return np.nanmean(margin[:, :aum_epochs(margin.shape[1], fraction)], axis=1).astype(np.float32)


class DynamicsRecorder:
    """Accumulates the dynamics of one training run on the device and writes one column per epoch.

    Use: `update(index, logits, labels)` every step, `end_epoch(epoch)` after each epoch, `finish()`
    at the end to derive the scores. Under torch.distributed every rank calls all three; only rank 0
    touches the store."""

    def __init__(self, url: str, info, epochs: int, *, run: str = "seed0", labels: np.ndarray | None = None,
                 el2n_early_fraction: float = EARLY_FRACTION, aum_fraction: float = AUM_FRACTION,
                 device: str | torch.device = "cpu", resume: bool = False):
        """`info`: the training split's DatasetInfo; `labels`: its labels in index order, stored with the
        dynamics so that `kdcache select --store` needs no beton (read from the beton when not given)."""
        if epochs < 1:
            raise UserError(f"cannot record dynamics over {epochs} epochs")
        for name, value in (("el2n-early", el2n_early_fraction), ("aum", aum_fraction)):
            if not 0 < value <= 1:
                raise UserError(f"--{name}-fraction must be in (0, 1], got {value}")
        self.aum_fraction = aum_fraction
        if not run or "/" in run:
            raise UserError(f"bad dynamics run name {run!r}")
        self.url, self.run, self.epochs, self.el2n_early_fraction = str(url), run, epochs, el2n_early_fraction
        self.num_samples = info.size
        self.device = torch.device(device)
        # rows: summed prob, correct, el2n, margin, and the number of times the sample was seen
        self.buffers = torch.zeros(5, self.num_samples, dtype=torch.float32, device=self.device)
        self.rank = rank()
        self.root = self.group = None
        self._check(info)  # every rank, read-only, so a bad store fails on all ranks alike
        if self.rank == 0:
            self.root = self._open_root(info, labels)
            self.group = self._open_run(resume)

    def _check(self, info) -> None:
        try:
            root = store.open_store(self.url, "r")
        except UserError:
            return  # no store yet: rank 0 creates it
        if store.TRAIN_FINGERPRINT in root.attrs:
            store.check_dataset(root, info.train_fingerprint, info.path)
        elif any(True for _ in root.members()):
            raise UserError(f"{self.url} holds data but is not a kdcache store (no {store.TRAIN_FINGERPRINT})")

    def _open_root(self, info, labels: np.ndarray | None):
        root = store.open_store(self.url, "a")
        if store.TRAIN_FINGERPRINT not in root.attrs:
            root.attrs.update(store.root_attrs(store.DYNAMICS_KIND, info))
        if store.LABELS not in root:
            if labels is None:
                from .beton import beton_labels
                labels = beton_labels(info.path)
            store.write_labels(root, labels)
        return root

    def _open_run(self, resume: bool):
        root, name = self.root, f"{store.DYNAMICS}/{self.run}"
        if resume and name in root and all(a in root[name] for a in ARRAYS):
            group = root[name]
            if group["prob"].shape[0] != self.num_samples:
                raise UserError(f"{self.url} {name} has {group['prob'].shape[0]} rows, the dataset "
                                f"{self.num_samples} samples")
            if group["prob"].shape[1] != self.epochs:  # a resumed run with another epoch count
                for a in ARRAYS:
                    group[a].resize((self.num_samples, self.epochs))
                done = [e for e in group.attrs.get("epochs_written", []) if e < self.epochs]
                group.attrs.update({"epochs": self.epochs, "epochs_written": done})
            return group
        group = root.require_group(store.DYNAMICS).require_group(self.run, overwrite=True)
        # one zarr chunk per (row block, epoch): writing an epoch's column never rewrites other epochs
        chunks = (min(store.WHOLE_ARRAY_ROWS, self.num_samples), 1)
        for a in ARRAYS:
            int8 = a == "correct"
            group.create_array(a, shape=(self.num_samples, self.epochs), dtype="int8" if int8 else "float32",
                               chunks=chunks, fill_value=-1 if int8 else np.nan, overwrite=True)
        group.attrs.update({"epochs": self.epochs, "epochs_written": [],
                            "early_fraction": self.el2n_early_fraction,  # the stored name: older stores have it
                            "description": "per-sample training dynamics; row = sample index, column = epoch; "
                                           "NaN (correct: -1) = not seen that epoch"})
        return group

    @torch.no_grad()
    def update(self, index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate one step's (detached) logits. Asynchronous on CUDA: nothing here waits for the GPU."""
        z = logits.detach().float()
        y = labels.to(z.device).long().view(-1, 1)
        p = F.softmax(z, dim=1)
        p_true = p.gather(1, y).squeeze(1)
        correct = (z.argmax(1, keepdim=True) == y).squeeze(1).float()
        el2n = (p.square().sum(1) - 2 * p_true + 1).clamp_min(0).sqrt()  # ||p - onehot(y)||_2
        z_true = z.gather(1, y).squeeze(1)
        margin = z_true - z.scatter(1, y, float("-inf")).amax(1)
        rows = torch.stack([p_true, correct, el2n, margin, torch.ones_like(p_true)])
        self.buffers.index_add_(1, index.to(self.device, non_blocking=True).long(), rows.to(self.device))

    def end_epoch(self, epoch: int) -> None:
        """Write column `epoch` (mean over the sample's appearances this epoch), then reset."""
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch {epoch} outside 0..{self.epochs - 1}")
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.buffers)  # each rank saw a disjoint share of samples
        if self.rank == 0:
            sums = self.buffers.cpu().numpy()
            count = sums[4]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = sums[:4] / count
            unseen = count == 0
            mean[:, unseen] = np.nan
            correct = np.where(unseen, -1, mean[1] >= 0.5).astype(np.int8)
            for name, column in zip(ARRAYS, (mean[0], correct, mean[2], mean[3])):
                self.group[name][:, epoch] = column
            done = sorted(set(self.group.attrs.get("epochs_written", [])) | {epoch})
            self.group.attrs["epochs_written"] = done
        self.buffers.zero_()

    def finish(self) -> list[str]:
        """Derive scores from every run recorded in the store and write them to scores/<name>; return
        their names (on rank 0; other ranks return [])."""
        if self.rank != 0:
            return []
        return write_dynamics_scores(self.root, el2n_early_fraction=self.el2n_early_fraction,
                                     aum_fraction=self.aum_fraction)


# name -> (higher_is_harder, description); {placeholders} are filled in from the recorded runs
TRAINING_PASS = "from the training forward pass (augmented views, train mode, weights moving within the epoch)"
SCORES = {
    "forgetting": (True, ("forgetting events over training epochs, mean over runs (Toneva et al. 2019); "
                          "never-learned samples get epochs + 1, so they rank hardest as in Toneva et al. "
                          "(DeepCore ranks them easiest)")),
    "el2n_early": (True, ("EL2N at the end of epoch {early} ({el2n_early_fraction:.0%} into training; Paul et al. "
                          "2021 take epoch 20 of 200), mean over runs; " + TRAINING_PASS)),
    "dynunc": (True, (f"dynamic uncertainty: std of the true-class probability over {DYNUNC_WINDOW}-epoch "
                      "windows, mean over windows and runs (He et al. 2023), " + TRAINING_PASS + "; He et al. "
                      "use the unaugmented view in eval mode")),
    "aum": (False, ("area under the margin: true-class logit margin averaged over epochs 1-{aum_last} "
                    "({aum_fraction:.0%} of training) and runs (Pleiss et al. 2020 average before the "
                    "learning rate decays)")),
}
assert tuple(SCORES) == store.DYNAMICS_SCORE_NAMES  # the store layout names them; this module describes them


def _runs(root) -> dict:
    """Every complete run under dynamics/: {run name: group}."""
    if store.DYNAMICS not in root:
        return {}
    return {name: group for name, group in sorted(root[store.DYNAMICS].groups()) if all(a in group for a in ARRAYS)}


def write_dynamics_scores(root, *, el2n_early_fraction: float = EARLY_FRACTION, aum_fraction: float = AUM_FRACTION,
                          window: int = DYNUNC_WINDOW, block_rows: int = store.WHOLE_ARRAY_ROWS) -> list[str]:
    """Compute forgetting, el2n_early, dynunc and aum from all recorded runs (mean over runs); write
    them to scores/; return the names written. Works through row blocks to bound memory."""
    runs = _runs(root)
    if not runs:
        return []
    n = next(iter(runs.values()))["prob"].shape[0]
    sums = {name: np.zeros(n) for name in SCORES}
    counts = {name: np.zeros(n) for name in SCORES}
    blocks = [(run, start) for run in runs for start in range(0, n, block_rows)]
    for run, start in tqdm(blocks, desc="dynamics scores", leave=False, disable=len(blocks) < 8):
        group, rows = runs[run], slice(start, start + block_rows)
        prob, margin, el2n = group["prob"][rows], group["margin"][rows], group["el2n"][rows]
        correct = group["correct"][rows]
        epochs = prob.shape[1]
        values = {"forgetting": forgetting_events(correct),
                  "el2n_early": el2n_early([el2n], early_epoch(epochs, el2n_early_fraction)),
                  "dynunc": dynamic_uncertainty(prob, window),
                  "aum": aum(margin, aum_fraction)}
        for name, v in values.items():
            ok = ~np.isnan(v)
            sums[name][rows][ok] += v[ok]
            counts[name][rows][ok] += 1
    epochs = sorted({group["prob"].shape[1] for group in runs.values()})
    facts = {"early": " / ".join(str(early_epoch(e, el2n_early_fraction) + 1) for e in epochs),
             "el2n_early_fraction": el2n_early_fraction, "aum_fraction": aum_fraction,
             "aum_last": " / ".join(str(aum_epochs(e, aum_fraction)) for e in epochs)}
    written = []
    for name, (higher_is_harder, description) in SCORES.items():
        description = description.format(**facts)
        if not counts[name].any():  # e.g. dynamic uncertainty of one-epoch runs
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(counts[name] > 0, sums[name] / counts[name], np.nan)
        store.write_score(root, name, score, higher_is_harder=higher_is_harder, description=description)
        written.append(name)
    return written
