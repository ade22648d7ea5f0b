"""Choose a training subset: random, by a difficulty score (keep the hardest or the easiest), or by
coverage-centric selection (CCS, Zheng et al. 2023). Output: sorted sample indices plus a JSON sidecar."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import METHODS_HELP, SelectOptions, default_ccs_score
from .errors import UserError
from .files import save_npy, write_json


def budget(fraction: float, n: int) -> int:
    """round(fraction * n) (Python's round, half to even), at least 1."""
    return max(1, round(fraction * n))


def _check_options(fraction: float, keep: str, ccs_beta: float, ccs_strata: int) -> None:
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {fraction}")
    if keep not in ("hard", "easy"):
        raise UserError(f"--keep must be hard or easy, got {keep!r}")
    if not 0 <= ccs_beta < 1:
        raise UserError(f"--ccs-beta must be in [0, 1), got {ccs_beta}")
    if ccs_strata < 1:
        raise UserError(f"--ccs-strata must be at least 1, got {ccs_strata}")


def class_budgets(labels: np.ndarray, fraction: float, total: int) -> np.ndarray:
    """Per-class counts: round(fraction * n_c) each, then nudged one at a time until they sum to
    `total`; the class furthest below (above) its exact share gains (loses) first, ties to the lower
    class index, and no class goes below 0 or above n_c."""
    counts = np.bincount(labels)
    exact = fraction * counts
    out = np.minimum(np.round(exact).astype(np.int64), counts)
    classes = np.arange(len(counts))
    while (diff := total - out.sum()) != 0:
        step = 1 if diff > 0 else -1
        room = out < counts if step > 0 else out > 0
        # under-served first when adding, over-served first when removing
        order = np.lexsort((classes, -step * (exact - out)))
        for c in order[room[order]][:abs(diff)]:
            out[c] += step
    return out


def _top(hardness: np.ndarray, n: int, keep: str, rng: np.random.Generator) -> np.ndarray:
    # ties are frequent (forgetting counts): break them by a seeded permutation, not by index order,
    # which would favour whatever the dataset stores first
    tiebreak = rng.permutation(len(hardness))
    key = -hardness if keep == "hard" else hardness
    return np.lexsort((tiebreak, key))[:n]


def ccs_allocate(strata_sizes: np.ndarray, n: int) -> np.ndarray:
    """Share `n` over strata evenly, smallest stratum first; a stratum smaller than its share gives
    the rest to the larger ones (CCS's bin allocation). Sums to n whenever n <= strata_sizes.sum()."""
    sizes = np.asarray(strata_sizes, dtype=np.int64)
    out = np.zeros_like(sizes)
    order = np.argsort(sizes, kind="stable")
    nonempty = [s for s in order if sizes[s] > 0]
    left = n
    for i, s in enumerate(nonempty):
        out[s] = min(sizes[s], left // (len(nonempty) - i))
        left -= out[s]
    return out


def ccs(hardness: np.ndarray, n: int, rng: np.random.Generator, *, beta: float = SelectOptions.ccs_beta,
        strata: int = SelectOptions.ccs_strata) -> np.ndarray:
    """Coverage-centric selection: drop the hardest `beta` fraction (fewer if the rest could not
    fill the budget), cut the remaining score range into `strata` equal-width strata, allocate the
    budget with `ccs_allocate` and sample uniformly inside each stratum. Returns positions."""
    order = _top(hardness, len(hardness), "hard", rng)  # hardest first
    drop = min(round(beta * len(hardness)), len(hardness) - n)
    pool = order[drop:]
    h = hardness[pool].astype(np.float64)
    lo, hi = h.min(), h.max()
    width = (hi - lo) / strata
    which = np.zeros(len(pool), dtype=np.int64) if width == 0 else \
        np.minimum(((h - lo) / width).astype(np.int64), strata - 1)
    take = ccs_allocate(np.bincount(which, minlength=strata), n)
    chosen = [rng.choice(pool[which == s], take[s], replace=False) for s in range(strata) if take[s]]
    return np.concatenate(chosen)


def select(method: str, fraction: float, labels: np.ndarray, *, hardness: np.ndarray | None = None,
           keep: str = SelectOptions.keep, class_balanced: bool = False, seed: int = 0,
           ccs_beta: float = SelectOptions.ccs_beta, ccs_strata: int = SelectOptions.ccs_strata) -> np.ndarray:
    """Sorted unique int64 sample indices, exactly round(fraction * N) of them (at least 1).

    `method` is "random", "ccs", or the name of a score whose values (oriented higher = harder) are
    in `hardness`; `keep` picks the hard or easy end for a score (CCS and random ignore it). With
    `class_balanced`, each class contributes its share (see `class_budgets`). Deterministic for a seed."""
    labels = np.asarray(labels, dtype=np.int64)
    n_total = len(labels)
    _check_options(fraction, keep, ccs_beta, ccs_strata)
    if n_total == 0:
        raise UserError("cannot select from an empty dataset")
    if method != "random":
        if hardness is None:
            raise UserError(f"method {method!r} needs a score")
        hardness = np.asarray(hardness, dtype=np.float64)
        if hardness.shape != labels.shape:
            raise UserError(f"score {method!r} has {len(hardness)} values, the dataset {n_total} samples")
        bad = np.flatnonzero(~np.isfinite(hardness))
        if len(bad):
            raise UserError(f"score {method!r} is missing (NaN) for {len(bad)} samples, e.g. index "
                            f"{bad[0]}: compute it on the full training set")

    rng = np.random.default_rng(seed)
    total = budget(fraction, n_total)

    def pick(positions: np.ndarray, n: int) -> np.ndarray:
        if method == "random":
            return rng.choice(positions, n, replace=False)
        if method == "ccs":
            return positions[ccs(hardness[positions], n, rng, beta=ccs_beta, strata=ccs_strata)]
        return positions[_top(hardness[positions], n, keep, rng)]

    if class_balanced:
        per_class = class_budgets(labels, fraction, total)
        parts = [pick(np.flatnonzero(labels == c), k) for c, k in enumerate(per_class) if k]
        chosen = np.concatenate(parts)
    else:
        chosen = pick(np.arange(n_total), total)
    chosen = np.sort(chosen).astype(np.int64)
    assert len(chosen) == total and len(np.unique(chosen)) == total
    return chosen


def _store_labels(group, n: int | None) -> np.ndarray | None:
    from .store import LABELS
    if LABELS not in group:
        return None
    labels = group[LABELS][:]
    return labels.astype(np.int64) if n is None or len(labels) == n else None


def _labels(info, group, store: str | None, labels: np.ndarray | None) -> tuple[np.ndarray, int]:
    """The training labels and the number of classes: from the beton when `info` is given (unless the
    caller has them already), else from the store."""
    if info is not None:
        if labels is None:
            from .beton import beton_labels
            labels = beton_labels(info.path)
        return labels, info.num_classes
    labels = _store_labels(group, None)
    if labels is None:
        raise UserError(f"store {store} has no labels array: pass the training beton with --data")
    manifest = group.attrs.get("manifest") or {}
    return labels, int(group.attrs.get("num_classes") or manifest.get("num_classes") or labels.max() + 1)


def choose_subset(info, method: str, fraction: float, *, store: str | None = None,
                  keep: str = SelectOptions.keep, class_balanced: bool = SelectOptions.class_balanced,
                  seed: int = 0, ccs_beta: float = SelectOptions.ccs_beta, ccs_strata: int = SelectOptions.ccs_strata,
                  ccs_score: str = SelectOptions.ccs_score,
                  labels: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Validate the request, load labels and the score, and select. `info` is the training split's
    DatasetInfo; it may be None when the store holds a `labels` array (then the dataset check is
    skipped). `labels`, when the caller has read them already, saves reading the beton's. Returns
    (indices, sidecar) for `save_selection`."""
    from .store import check_dataset, open_store, read_score, score_names
    from .store import hardness as read_hardness

    _check_options(fraction, keep, ccs_beta, ccs_strata)
    if not method:
        raise UserError(f"no selection method given: {METHODS_HELP}")
    if info is not None and info.split != "train":
        raise UserError(f"{info.path} is the {info.split} split; select from the training beton")
    group = open_store(store, "r") if store is not None else None
    if method == "ccs" and ccs_score is None:
        ccs_score = default_ccs_score(group is not None and "aum" in score_names(group))
    score = None if method == "random" else ccs_score if method == "ccs" else method
    if store is None and (score is not None or info is None):
        need = f"--method {method}" if score is not None else "without --data, selection"
        raise UserError(f"{need} needs a --store holding scores ({METHODS_HELP})")

    values = None
    if group is not None:
        if info is not None:
            check_dataset(group, info.train_fingerprint, info.path)
        if score is not None:
            read_score(group, score)  # a missing score: one line listing the ones the store has
            values = read_hardness(group, score)

    labels, num_classes = _labels(info, group, store, labels)
    indices = select(method, fraction, labels, hardness=values, keep=keep, class_balanced=class_balanced,
                     seed=seed, ccs_beta=ccs_beta, ccs_strata=ccs_strata)
    sidecar = {
        "method": method,
        "fraction": fraction,
        "keep": keep,
        "class_balanced": class_balanced,
        "seed": seed,
        "score_source": None if score is None else {"store": str(store), "score": score},
        "score_description": None if score is None else group["scores"][score].attrs.get("description", ""),
        "num_selected": len(indices),
        "num_samples": len(labels),
        "class_counts": np.bincount(labels[indices], minlength=num_classes).tolist(),
    }
    if method == "ccs":
        sidecar.update({"ccs_beta": ccs_beta, "ccs_strata": ccs_strata, "ccs_score": ccs_score})
    if info is not None:
        sidecar["train_fingerprint"] = info.train_fingerprint
    return indices, sidecar


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_selection(path: str | Path, indices: np.ndarray, sidecar: dict) -> None:
    """Write the indices as .npy and the sidecar as JSON beside it (same stem), each via a temporary
    name and a rename, so neither is ever seen half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(path, np.asarray(indices, dtype=np.int64))
    write_json(sidecar_path(path), sidecar)
