"""Command-line options read off a configuration dataclass: one spelling of each option.

A field declared with :func:`option` becomes ``--field-name`` (or the flag given), typed from its
default (or ``parse``), with its help and default shown. The parser's own default is None for every
option, so :func:`config_from_args` can tell what the user gave from what they left, and lay the
given values over a base (``--quick``'s settings, say) rather than over the dataclass defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import MISSING, field, fields
from typing import Any, TypeVar

Config = TypeVar("Config")


def option(
    default: Any = MISSING,
    *,
    help: str,  # noqa: A002 (argparse's own word)
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    repeatable: bool = False,
    shown: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    ``parse`` turns the text into the value (default: the default's type); ``repeatable`` collects
    each use of the flag into a tuple. A bool field is a switch: ``--name`` where it defaults to
    False, ``flag`` (say ``--no-progress``) setting False where it defaults to True. ``shown`` is what
    the help says the default is, where the value alone would not say it (a None that means "derived").
    """
    metadata = {"help": help, "flag": flag, "parse": parse, "repeatable": repeatable, "shown": shown}
    return field(default=default, metadata=metadata)


def comma_list(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    """A parser of ``a,b,c`` into a tuple of ``item(a)``, ..., refusing an empty list."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(item(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, not {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, not {text!r}")
        return values

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, not {text!r}")
    return value


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "all" if value is None else str(value)


def add_config_options(
    parser: argparse.ArgumentParser | Any,
    config_type: type,
    other_defaults: Mapping[str, Mapping[str, Any]] = {},
    prefix: str = "",
) -> None:
    """One option per :func:`option` field of ``config_type`` (a dataclass whose fields all have defaults).

    ``other_defaults`` names other sets of defaults for the help text: ``{"quick": {...}}``. ``prefix``
    goes before each field's name where the parsed arguments keep it, so that several config types with
    fields of the same name can share one parser (their flags must differ).
    """
    defaults = config_type()
    for item in fields(config_type):
        if "help" not in item.metadata:
            continue
        meta = item.metadata
        default = getattr(defaults, item.name)
        flag = meta["flag"] or "--" + item.name.replace("_", "-")
        dest = prefix + item.name
        others = "".join(
            f"; {name}: {_shown(d[item.name])}" for name, d in other_defaults.items() if item.name in d
        )
        if isinstance(default, bool):
            action = "store_false" if default else "store_true"
            parser.add_argument(flag, dest=dest, action=action, default=None, help=meta["help"])
            continue
        kwargs: dict[str, Any] = {"dest": dest, "default": None, "type": meta["parse"] or type(default)}
        if meta["repeatable"]:
            kwargs["action"] = "append"
        kwargs["metavar"] = flag.removeprefix("--").replace("-", "_").upper()
        shown = meta.get("shown") or _shown(default)
        parser.add_argument(flag, help=f"{meta['help']} (default: {shown}{others})", **kwargs)


def config_from_args(
    config_type: type[Config], args: argparse.Namespace, base: Mapping[str, Any] = {}, prefix: str = ""
) -> Config:
    """``config_type`` from ``base`` with the options the user gave laid over it (``prefix`` as given to
    :func:`add_config_options`)."""
    given = {}
    for item in fields(config_type):  # type: ignore[arg-type]
        value = getattr(args, prefix + item.name, None)
        if "help" in item.metadata and value is not None:
            given[item.name] = tuple(value) if item.metadata["repeatable"] else value
    return config_type(**{**base, **given})
