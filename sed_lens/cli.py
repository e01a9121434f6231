"""Command-line plumbing shared by every experiment: flags generated from config dataclasses, clean errors.

Each experiment's config is a dataclass (nested dataclasses are flattened); every field becomes one flag,
``snake_case`` → ``--kebab-case``, with the field's ``metadata`` giving ``help``, ``aliases`` and a ``parse``
function for list-valued fields. A ``Literal`` annotation gives the flag's ``choices`` (``metadata["choices"]``
does for a plain ``str``); fields that a shared piece of :mod:`sed_lens.configs` declares (its ``cli_group``) are
listed under that piece's heading in ``--help``. A user error — a bad flag or value, or a :class:`SedLensError`
raised while running — prints one line on stderr and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard, TypeVar

from sed_lens.configs import describe, fits, flag
from sed_lens.errors import SedLensError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` that reports a bad flag in one line (and exits 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def csv(item: Callable[[str], Any] = str) -> Callable[[str], tuple[Any, ...]]:
    """Parser of a comma-separated list: ``"add,sub"`` → ``("add", "sub")``."""

    def parse(text: str) -> tuple[Any, ...]:
        parts = [t.strip() for t in text.split(",") if t.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return tuple(item(t) for t in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid list item in {text!r}") from None

    parse.__name__ = "list"
    return parse


def _scalar_type(tp: Any) -> Any:
    """``int | None`` → ``int``; other annotations unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _group(cls: type, name: str) -> str | None:
    """The ``cli_group`` of the class in ``cls``'s hierarchy that declares the field ``name`` (None: no piece)."""
    for base in cls.__mro__:
        if name in base.__dict__.get("__annotations__", {}):
            return base.__dict__.get("cli_group")
    return None


def _is_dataclass_type(tp: Any) -> TypeGuard[type[DataclassInstance]]:
    """Whether the annotation ``tp`` is a dataclass (a nested config), not a dataclass instance."""
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _fields(cls: type[DataclassInstance]) -> list[tuple[dataclasses.Field[Any], Any, str | None]]:
    """Leaf fields of a (possibly nested) config dataclass, with their resolved types and ``--help`` groups."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[dataclasses.Field[Any], Any, str | None]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out.extend(_fields(tp))
        elif f.metadata.get("cli", True):
            out.append((f, tp, _group(cls, f.name)))
    return out


def parser_for(cls: type[DataclassInstance], prog: str, description: str, epilog: str | None = None) -> ArgumentParser:
    """An :class:`ArgumentParser` with one flag per field of the config dataclass ``cls``."""
    ap = ArgumentParser(prog=prog, description=description, epilog=epilog,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    # one heading per piece the config is made of, in the order of its bases (ModelOptions, TrackingOptions, ...)
    groups = {g: ap.add_argument_group(g) for g in dict.fromkeys(
        base.__dict__["cli_group"] for base in cls.__mro__ if "cli_group" in base.__dict__)}
    for f, tp, group in _fields(cls):
        meta = f.metadata
        flags = [flag(f.name), *meta.get("aliases", ())]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"config field {f.name!r} needs a default to become a flag")
        kw: dict[str, Any] = {"help": meta.get("help", ""), "dest": f.name, "default": argparse.SUPPRESS}
        scalar = _scalar_type(tp)
        if typing.get_origin(scalar) is typing.Literal:
            kw["choices"] = typing.get_args(scalar)
        elif "choices" in meta:
            kw["choices"] = meta["choices"]
        if scalar is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(scalar) is tuple:
            item = (typing.get_args(scalar) or (str,))[0]
            kw["type"] = meta.get("parse", csv(item if item in (int, float, str) else str))
            kw["metavar"] = meta.get("metavar", "A,B,…")
        else:
            kw["type"] = meta.get("parse", scalar if scalar in (int, float, str) else str)
            kw["metavar"] = meta.get("metavar")
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if default is not None:
            kw["help"] = f"{kw['help']} (default: {shown})"
        if group is not None and group not in groups:
            groups[group] = ap.add_argument_group(group)
        (groups[group] if group is not None else ap).add_argument(*flags, **kw)
    return ap


def config_from_args(cls: type[C], ns: argparse.Namespace) -> C:
    """Build the (nested) config dataclass ``cls`` from parsed flags; unset flags keep their defaults."""
    given = vars(ns)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            kwargs[f.name] = config_from_args(tp, ns)
        elif f.name in given:
            kwargs[f.name] = given[f.name]
    return cls(**kwargs)


def config_from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build the (nested) config dataclass ``cls`` from a dict such as ``asdict(config)`` or a JSON file; lists
    become tuples. An unknown key (a config written by another version of sed_lens, or edited by hand) or a value
    of the wrong type raises :class:`SedLensError` naming the key and what it must be; keys left out keep their
    defaults. ``where``: the key path of ``data`` inside an enclosing config (for messages)."""
    if not isinstance(data, dict):
        raise SedLensError(f"{where or cls.__name__} must be a dict of {cls.__name__} fields, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        inside = f" in {where!r}" if where else ""
        raise SedLensError(f"unknown {cls.__name__} field(s){inside}: {', '.join(map(str, unknown))} "
                           "(a config written by another version of sed_lens?).")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp, key = data[f.name], hints[f.name], f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if not isinstance(value, tp):
                value = config_from_dict(tp, value, key)
        else:
            if isinstance(value, list):
                value = tuple(value)
            if not fits(tp, value):
                raise SedLensError(f"{cls.__name__} key {key!r} must be {describe(tp)}, got {value!r} "
                                   f"(a {type(value).__name__}).")
        kwargs[f.name] = value
    return cls(**kwargs)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None,
            prog: str = "sed_lens") -> int:
    """Run ``main(argv)``; a :class:`SedLensError` becomes one line on stderr and exit status 2. Training
    stopped by SIGINT or SIGTERM (:class:`sed_lens.training.TrainingInterrupted`) prints one line — step,
    checkpoint, resume command — and exits 130 or 143."""
    try:
        main(argv)
    except SedLensError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        describe = getattr(e, "describe", None)  # TrainingInterrupted, without importing torch here
        print(f"{prog}: interrupted" + (f" by {describe()}" if callable(describe) else ""), file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    return 0
