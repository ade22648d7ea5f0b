"""Each option is declared once (a field of a kdcache.config dataclass) and reachable from its command and
from a protocol with the same default."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import click
import pytest
from kdcache_cli.data import data
from kdcache_cli.dump import dump
from kdcache_cli.select import select
from kdcache_cli.train import train

from kdcache import config
from kdcache.config import DataOptions, DumpConfig, DumpOptions, SelectOptions, TrainConfig
from kdcache.protocol import DATA_KEYS, DUMP_KEYS, SELECT_KEYS, STUDENT_KEYS, TEACHER_KEYS, TRAIN_KEYS, _defaults

# each config class, the command whose options it declares, and the protocol keys of each `protocol` place
COMMANDS = [(TrainConfig, train), (SelectOptions, select), (DumpConfig, dump), (DataOptions, data)]
PROTOCOL_TABLES = {"train": TRAIN_KEYS, "teacher": TEACHER_KEYS, "student": STUDENT_KEYS, "select": SELECT_KEYS,
                   "dump": DUMP_KEYS, "data": DATA_KEYS}


def params(command: click.Command) -> dict:
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("cls, command", COMMANDS, ids=lambda x: getattr(x, "__name__", None) or x.name)
def test_every_field_is_an_option_of_its_command_with_its_default(cls, command):
    options = params(command)
    for f in dataclasses.fields(cls):
        assert f.name in options, f"{cls.__name__}.{f.name} has no option in `kdcache {command.name}`"
        opt = options[f.name]
        assert isinstance(opt, (click.Option, click.Argument))
        if f.default is dataclasses.MISSING:
            assert opt.required, f.name
        elif not opt.required:  # `select` requires --method and --fraction; train leaves them to SelectOptions
            assert opt.default == f.default, f.name
        if isinstance(opt, click.Option) and f.metadata.get("help"):
            assert opt.help, f.name


def test_train_shows_the_selection_defaults_it_leaves_unset():
    options = params(train)
    for name in ("fraction", "method", "keep"):
        assert options[name].default is None and options[name].show_default == str(getattr(SelectOptions, name))
    for name in ("class_balanced", "ccs_beta", "ccs_strata", "ccs_score"):
        assert options[name].default == getattr(TrainConfig, name) == getattr(SelectOptions, name)
        assert options[name].help == params(select)[name].help  # one group, one help text


@pytest.mark.parametrize("cls", [TrainConfig, SelectOptions, DumpOptions, DumpConfig, DataOptions],
                         ids=lambda c: c.__name__)
def test_every_field_is_a_protocol_key_with_the_same_default_or_set_by_the_runner(cls):
    hints = {f.name: config.field_type(cls, f.name) for f in dataclasses.fields(cls)}
    defaults = _defaults()
    for f in dataclasses.fields(cls):
        place = f.metadata.get("protocol")
        assert place in (*PROTOCOL_TABLES, "runner"), f"{cls.__name__}.{f.name}: protocol place {place!r}"
        if place == "runner":  # the sweep sets it from its stages and options (--workers, --device, paths)
            continue
        table = PROTOCOL_TABLES[place]
        assert f.name in table, f"{cls.__name__}.{f.name} is not a protocol key"
        if f.name != "alpha":  # `--alpha auto` is the CLI's; a protocol names a number
            assert table[f.name] is hints[f.name], f.name
        if f.name in defaults and cls in (TrainConfig, SelectOptions) and not f.metadata.get("selection"):
            assert defaults[f.name] == f.default, f.name


def test_protocol_tables_are_exactly_the_tagged_fields():
    # the hashed stage configs hold exactly these keys: a change here renames every study's folders
    assert set(TRAIN_KEYS) == {"arch", "epochs", "steps", "batch_size", "lr", "momentum", "weight_decay", "warmup",
                               "label_smoothing", "augment", "eval_every", "amp", "compile", "bn_batches"}
    assert set(TEACHER_KEYS) - set(TRAIN_KEYS) == {"seed", "record_dynamics", "el2n_early_fraction", "aum_fraction"}
    assert set(DUMP_KEYS) == {"batch_size", "chunk_rows", "topk", "temperature", "sample", "sample_seed", "view_seed"}
    assert set(DATA_KEYS) == {"source", "src", "num_train", "num_test", "num_classes", "image_size", "seed",
                              "max_side", "jpeg_quality", "crop_side"}


def test_help_shows_defaults():
    from click.testing import CliRunner

    out = CliRunner().invoke(train, ["--help"]).output
    assert "[default: 20]" in out and "--bn-batches" in out and f"at least {config.WARMUP_FLOOR} steps" in out


def test_reading_a_protocol_imports_no_torch():
    smoke = Path(__file__).parents[1] / "protocols" / "smoke.toml"
    code = (f"import sys, kdcache.protocol as p; p.student_runs(p.load_protocol({str(smoke)!r})); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)



PINNED = """
[data]
source = "synthetic"
num_train = 400
[teachers.t]
arch = "resnet8"
epochs = 3
record_dynamics = true
[dump]
batch_size = 100
[defaults]
arch = "resnet8"
epochs = 2
[[students]]
fraction = 0.5
method = ["random", "el2n", "ccs", "aum"]
alpha = [0, 0.9]
[[students]]
fraction = 0.5
alpha = 0.9
topk = 2
"""


def test_stage_names_do_not_move(tmp_path, monkeypatch):
    """Folder names hash each stage's resolved configuration (defaults, key names, the trainer revision): a
    renamed key or a new hashed default would orphan every study's finished runs. These names were made by
    the code before options moved into kdcache.config, at trainer revision 2; a new revision moves the
    trainer's stages (and those after them) on purpose, and nothing else may."""
    import kdcache.train
    from kdcache.plan import plan
    from kdcache.protocol import load_protocol

    monkeypatch.setattr(kdcache.train, "TRAINER_REVISION", 2)
    (tmp_path / "pin.toml").write_text(PINNED)
    p = plan(load_protocol(tmp_path / "pin.toml"))
    assert (p.data.name, p.teachers["t"].name) == ("data-265d4cecd5", "teacher-t-95bdc74200")
    assert sorted(d.name for d in p.dumps.values()) == ["cache-t-d54e7a5ce1.zarr", "cache-t-top2-e9a5d6379a.zarr"]
    assert sorted(s.name.removeprefix("students/") for s in p.students) == [
        "aum-f0.5-a0-noKD-s0-815da81a66", "aum-f0.5-a0.9-t-s0-ef0e15deaf", "ccs-f0.5-a0-noKD-s0-fd8c1e74a8",
        "ccs-f0.5-a0.9-t-s0-654ba0d918", "el2n-f0.5-a0-noKD-s0-9cc85a1979", "el2n-f0.5-a0.9-t-s0-55a8350919",
        "random-f0.5-a0-noKD-s0-5bbe0b325b", "random-f0.5-a0.9-t-s0-2364baeafe",
        "random-f0.5-a0.9-t-top2-s0-3ce5e23d73"]
