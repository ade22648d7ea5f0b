"""Every option of every command, declared once: its name, type, default and help.

The click options (`cli/`) and a protocol's key tables (`kdcache.protocol`) are derived from these
dataclasses, so a new option is one field here plus the code that uses it. This module imports no
torch: reading a protocol must not pay for it.

Field metadata (see `option`): `help`; `show`, the default shown in `--help` when the field's own
default means "decided later"; `choices`; `negatable` (`--x/--no-x`); `path` (a click.Path);
`result=False` on options that do not change what a run computes (a resumed run may change them);
`protocol`, where a study's protocol sets the field: "train" (teachers and students), "teacher",
"student", "data", "dump", "select", or "runner" (set by the sweep from its stages and its own options,
never written in a protocol).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

DEFAULT_TEMPERATURE = 4.0  # Hinton et al.'s range (2-5); the KD temperature when neither option nor cache sets one
EARLY_FRACTION = 0.1  # el2n_early: Paul et al. 2021 take epoch 20 of 200
AUM_FRACTION = 1.0    # aum: the first fraction of epochs averaged. Pleiss et al. stop before the LR decays;
                      # a cosine schedule decays from the first step, so the whole run is the default
WARMUP_FLOOR = 10  # steps: `--warmup` of a short run must not round to no warm-up at all (then KD diverges)
KEEP_ENDS = ("hard", "easy")
AMP_MODES = ("bf16", "fp16", "off")
DATA_PATHS = ("auto", "ffcv", "resident")
TEACHER_PREPROCESSING = ("auto", "data")
METHODS_HELP = ("random, ccs, or any score in the store (e.g. el2n, forgetting; `kdcache info STORE` says how "
                "each was computed, e.g. the epoch of el2n_early)")
CCS_SCORE_RULE = "aum if the store has it, else el2n"  # what ccs_score None means: default_ccs_score


def default_ccs_score(has_aum: bool) -> str:
    """CCS strata by AUM where the scores include it, as Zheng et al.'s code does, else by the teacher's EL2N."""
    return "aum" if has_aum else "el2n"


def option(default=dataclasses.MISSING, help: str = "", **meta) -> typing.Any:
    """A dataclass field carrying its command-line help and where a protocol sets it (module docstring)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def field_type(cls: type, name: str) -> type:
    """A field's value type, `X | None` read as X."""
    kind = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def protocol_keys(cls: type, *where: str) -> dict[str, type]:
    """{name: type} of the fields a protocol sets in these places (metadata `protocol`)."""
    return {f.name: field_type(cls, f.name) for f in dataclasses.fields(cls) if f.metadata.get("protocol") in where}


def defaults(cls: type) -> dict:
    """{name: default} of the fields that have one."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def teacher_preprocessing_option() -> typing.Any:
    """One option of the dump and of an online teacher alike (declared here once, used by both)."""
    return option("auto", "A timm teacher from a state dict or timm checkpoint sees: auto, the input size, mean and "
                          "std of the checkpoint's training args, else of timm's pretrained config; data, this "
                          "dataset's own (a teacher trained on it at its size). kdcache's own model.pt always "
                          "sees the dataset's.", choices=TEACHER_PREPROCESSING, protocol="runner")


@dataclass(frozen=True)
class SelectOptions:
    """How to choose a subset, with the defaults every front end shows (one place for them)."""

    method: str = option("random", f"Selection method: {METHODS_HELP}.", protocol="student")
    fraction: float = option(1.0, "Fraction of training samples kept, in (0, 1].", protocol="student")
    # which end of a score: the hardest samples (as in the papers) or the easiest
    keep: str = option("hard", "Which end of the score to keep (score methods).", choices=KEEP_ENDS,
                       protocol="select")
    class_balanced: bool = option(False, "Keep the same fraction of every class.", protocol="select")
    ccs_beta: float = option(0.1, "ccs: fraction of hardest samples dropped first (Zheng et al. 2023 tune it per "
                                  "fraction, e.g. 0.3 at 10% kept on CIFAR-10).", protocol="select")
    ccs_strata: int = option(50, "ccs: number of equal-width score strata.", protocol="select")
    # None: aum where the store has it, as Zheng et al.'s code stratifies by AUM, else the teacher's el2n
    ccs_score: str | None = option(None, "ccs: the score that defines the strata.", show=CCS_SCORE_RULE,
                                   protocol="select")


SELECTION_FIELDS = tuple(f.name for f in dataclasses.fields(SelectOptions))
S = SelectOptions()


@dataclass(frozen=True)
class DumpOptions:
    """The dump's tunable options and their defaults (a sweep's [dump] table hashes the computing ones)."""

    batch_size: int = option(512, "Samples per teacher batch.", protocol="dump")
    chunk_rows: int = option(4096, "Samples per store chunk, the unit of resuming; a multiple of --batch-size.",
                             protocol="dump")
    topk: int = option(0, "Store only the K most probable classes' log-probabilities (0: all logits).",
                       protocol="dump")
    # full logits serve any temperature; top-k and sampled targets are exact at this one only
    temperature: float = option(DEFAULT_TEMPERATURE, "With --topk or --sample: the teacher's temperature for the "
                                "targets; students train at it.", protocol="dump")
    sample: int = option(0, "Store S classes drawn from the tempered teacher with their counts: unbiased sparse "
                            "targets (Sparse Logit Sampling; 0: off).", protocol="dump")
    sample_seed: int = option(0, "Seed of the --sample draws.", protocol="dump")
    views: int = option(1, "1: the teacher's outputs on the clean image. K > 1: on K augmented views per sample "
                           "(pad-4 crop + flip; image folders: random-resized crop + flip), stored with their "
                           "parameters; students are shown exactly those views.", protocol="student")
    view_seed: int = option(0, "Seed of the --views draws.", protocol="dump")
    device: str = option("auto", "auto (CUDA if available), cpu, cuda or cuda:N.", protocol="runner")
    workers: int = option(-1, "FFCV loader threads (-1: all cores).", protocol="runner")


@dataclass(frozen=True, kw_only=True)
class DumpConfig(DumpOptions):
    """One `kdcache dump`: which teacher, which data, where to, and the options above."""

    teacher: str = option(help="Teacher model: {archs}.", protocol="runner")
    data: str = option(help="The training split's .beton.", path=True, protocol="runner")
    out: str = option(help="Store path or URL (file://, s3://, ...).", protocol="runner")
    checkpoint: str | None = option(None, "Teacher checkpoint written by kdcache train.", path=True,
                                    protocol="runner")
    pretrained: bool = option(False, "Use torchvision's pretrained weights (needs network access or a cached "
                                     "download).", protocol="runner")
    teacher_preprocessing: str = teacher_preprocessing_option()
    overwrite: bool = option(False, "Start over when --out holds another dump's store.", protocol="runner")


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """`kdcache data`'s options (the source is its argument); a protocol's [data] table holds the same keys."""

    source: str = option(help="The dataset source.", protocol="data")
    src: str | None = option(None, "Source folder (default for fashion-mnist: /usr/share/datasets/fashion-mnist).",
                             path=True, protocol="data")
    out: str = option(help="Folder for train.beton, test.beton, manifest.json.", path=True, protocol="runner")
    max_side: int = option(256, "imagefolder: longest stored image side (JPEG).", protocol="data")
    jpeg_quality: int = option(90, "imagefolder: JPEG quality.", protocol="data")
    crop_side: int | None = option(None, "imagefolder: the side models see.",
                                   show="224 when --max-side >= 256, else 7/8 of it", protocol="data")
    workers: int = option(-1, "Writer processes (-1: all cores).", protocol="runner")
    num_train: int = option(1000, "synthetic: training samples.", protocol="data")
    num_test: int = option(500, "synthetic: test samples.", protocol="data")
    num_classes: int = option(10, "synthetic: classes.", protocol="data")
    image_size: int = option(32, "synthetic: image side in pixels.", protocol="data")
    seed: int = option(0, "synthetic: generator seed.", protocol="data")


SYNTHETIC_FIELDS = ("num_train", "num_test", "num_classes", "image_size", "seed")
IMAGEFOLDER_FIELDS = ("max_side", "jpeg_quality", "crop_side")


@dataclass
class TrainConfig:
    """Every option of a training run, with its default: the CLI shows these, config.json records them.

    The subset is either chosen here (`fraction`, `method`, `keep`, None: SelectOptions' default; the
    selection group's other fields) or given by `indices`, never both."""

    data: str = option(help="Training .beton (from `kdcache data`).", path=True, protocol="runner")
    out: str = option(help="Run folder for config, metrics, model.", path=True, result=False, protocol="runner")
    test: str | None = option(None, "Test .beton [default: test.beton beside --data].", path=True,
                              protocol="runner")
    arch: str = option("resnet20", "Student model: {archs}.", protocol="train")
    cache: str | None = option(None, "Teacher-logit store from `kdcache dump` (path or URL).", protocol="runner")
    store: str | None = option(None, "Store holding selection scores [default: --cache].", protocol="runner")
    fraction: float | None = option(None, show=S.fraction, selection=True, protocol="student")
    method: str | None = option(None, show=S.method, selection=True, protocol="student")
    keep: str | None = option(None, show=S.keep, selection=True, protocol="select")
    class_balanced: bool = option(S.class_balanced, selection=True, protocol="select")
    ccs_beta: float = option(S.ccs_beta, selection=True, protocol="select")
    ccs_strata: int = option(S.ccs_strata, selection=True, protocol="select")
    ccs_score: str | None = option(S.ccs_score, selection=True, protocol="select")
    indices: str | None = option(None, "Train on these indices (.npy from `kdcache select`) instead of selecting "
                                       "here.", path=True, protocol="runner")
    alpha: str = option("auto", "KD weight in [0, 1], or auto (from the fraction).", protocol="student")
    # None: a top-k cache's own temperature, else DEFAULT_TEMPERATURE
    temperature: float | None = option(None, "KD temperature T [default: a top-k cache's own, else the value "
                                             "shown].", show=DEFAULT_TEMPERATURE, protocol="student")
    epochs: int = option(200, "Passes over the selected subset.", protocol="train")
    steps: int | None = option(None, "Fixed number of optimisation steps (overrides --epochs): equal-compute "
                                     "comparisons.", protocol="train")
    batch_size: int = option(128, "Per process (under torchrun: x world size).", protocol="train")
    lr: float = option(0.1, "Peak learning rate (SGD, Nesterov; DeepCore's CIFAR default).", protocol="train")
    momentum: float = option(0.9, "SGD momentum.", protocol="train")
    weight_decay: float = option(5e-4, "Not applied to norms and biases.", protocol="train")
    warmup: float = option(0.02, f"Fraction of steps with linear warm-up (0: none; else at least {WARMUP_FLOOR} "
                                 "steps, or a quarter of a shorter run), then cosine decay.", protocol="train")
    # the running averages lag far behind fast-moving weights in short runs
    bn_batches: int = option(20, "Re-estimate BatchNorm statistics over this many training batches, augmented as "
                                 "in training, before each evaluation (0: off).", protocol="train")
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy term.", protocol="train")
    augment: bool = option(True, "Random crop (4 px padding) + flip; image folders: random-resized crop + flip "
                                 "(both seeded).",
                           negatable=True, protocol="train")
    seed: int = option(0, "Seed for selection, initialisation and data order.", protocol="student")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.", result=False, protocol="runner")
    amp: str = option("bf16", "Autocast on CUDA (CPU: always off).", choices=AMP_MODES, protocol="train")
    compile: bool = option(False, "torch.compile the student.", protocol="train")
    workers: int = option(-1, "FFCV loader threads (-1: all cores).", result=False, protocol="runner")
    data_path: str = option("auto", "auto: images of 64 px or less kept on the device when they fit its budget "
                                    "(docs/resident.md), else FFCV; the batches are the same either way.",
                            choices=DATA_PATHS, result=False, protocol="runner")
    eval_every: int = option(1, "Evaluate on the test set every N epochs.", protocol="train")
    eval_batch_size: int = option(512, "Test-set batch size: larger is faster on a GPU, smaller fits less memory "
                                       "(evaluation runs in eval mode, so the accuracy does not depend on it).",
                                  result=False, protocol="runner")
    tensorboard: bool = option(False, "Also log each epoch's metrics to TensorBoard in OUT/tensorboard "
                                      "(pip install 'kdcache[tensorboard]').", result=False, protocol="runner")
    teacher_online: str | None = option(None, "Run this teacher in the loop instead of reading a cache.",
                                        protocol="runner")
    teacher_checkpoint: str | None = option(None, "Checkpoint of --teacher-online.", path=True, protocol="runner")
    teacher_preprocessing: str = teacher_preprocessing_option()
    record_dynamics: bool = option(False, "Record per-sample training dynamics and derive scores.",
                                   protocol="teacher")
    dynamics_store: str | None = option(None, "Store for dynamics [default: OUT/dynamics.zarr].", protocol="runner")
    el2n_early_fraction: float = option(EARLY_FRACTION, "Dynamics: el2n_early is EL2N this far into training "
                                        "(Paul et al.: epoch 20 of 200).", protocol="teacher")
    aum_fraction: float = option(AUM_FRACTION, "Dynamics: AUM averages the margin over this first part of "
                                 "training (Pleiss et al. stop before the learning rate decays; cosine decays "
                                 "from the start).", protocol="teacher")
    resume: bool = option(False, "Continue a killed run in --out from its last epoch.", result=False,
                          protocol="runner")
    overwrite: bool = option(False, "Start over although --out holds a run (finished or killed).", result=False,
                             protocol="runner")
