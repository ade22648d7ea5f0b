"""Click options derived from the config dataclasses of `kdcache.config` (one declaration per option)."""
from __future__ import annotations

import dataclasses

import click

from kdcache.config import SELECTION_FIELDS, SelectOptions, field_type

CLICK_TYPES = {str: str, int: int, float: float}


def click_option(cls: type, name: str, *, required: bool = False, unset: bool = False, **fill):
    """The `--name` option of dataclass field `name`: its type, default (shown in --help) and help.
    `unset`: default None, showing the field's default (the command resolves None later); `fill`
    completes `{...}` placeholders in the help (e.g. the model registry's names)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta, kind = f.metadata, field_type(cls, name)
    flag = "--" + name.replace("_", "-")
    kw: dict = {"help": meta.get("help", "").format(**fill) or None, "show_default": True}
    if f.default is dataclasses.MISSING or required:
        kw["required"] = True
    elif unset:
        kw.update(default=None, show_default=str(f.default))
    else:
        kw["default"] = f.default
    if "show" in meta:
        kw["show_default"] = str(meta["show"])
    if kind is bool:
        if meta.get("negatable"):
            flag = f"{flag}/--no-{name.replace('_', '-')}"
        else:
            kw["is_flag"] = True
    elif meta.get("choices"):
        kw["type"] = click.Choice(meta["choices"])
    elif meta.get("path"):
        kw["type"] = click.Path()
    else:
        kw["type"] = CLICK_TYPES[kind]
    return click.option(flag, **kw)


def options_of(cls: type, *, exclude=(), **fill):
    """A decorator adding every field of `cls` (but `exclude` and the selection group's) as options, in order."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in exclude
             and not f.metadata.get("selection")]
    return _stack([click_option(cls, n, **fill) for n in names])


def selection_options(*, required=(), unset=()):
    """The selection group (`SelectOptions`), the same for every command that chooses a subset.
    `required`: options the command needs; `unset`: options whose None means "SelectOptions' default"."""
    return _stack([click_option(SelectOptions, n, required=n in required, unset=n in unset)
                   for n in SELECTION_FIELDS])


def _stack(options: list):
    def decorate(command):
        for opt in reversed(options):  # click lists options in the order they are applied, last first
            command = opt(command)
        return command
    return decorate
