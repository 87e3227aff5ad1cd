"""Setting fields: how a stage config declares a setting, and the checks that read it.

`setting(...)` makes a dataclass field that carries its help text and, where it has them, its
choices, range, aliases and list form; the CLI builds its flags from that metadata, the MCP
tools their schemas, and `validate` checks a config against it, naming the flag and the fix in
one line. The stage configs themselves (and their defaults) are in oml_core.config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from oml_core.errors import OMLInputError

MAX_TEMPERATURE = 2.0  # the most OpenAI-compatible APIs accept


def setting(default: Any = None, help: str = "", *, choices=None, low=None, high=None, flag=None,
            only=None, repeat=False, empty=None, aliases=None, above=False, layers=None):
    """A dataclass field with the metadata the CLI, MCP schemas and `validate` read; `only`
    names the method (e.g. of fingerprinting), or a tuple of the methods, the setting applies
    to (`applies`).

    A list-typed field is a list setting: `choices`, `low`/`high` (`above`: low itself is
    excluded) and `aliases` (old item name -> new) apply to each item; `empty` says what an
    empty list means (None: an empty list is refused); `repeat`: the CLI flag is given once
    per item instead of as one comma list. `choices` may be a function returning them (names
    other packages register). `layers`: a layer setting, one of these words (auto, none) or a
    comma list of layer indices (`parse_layer_spec`)."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "flag": flag, "only": only,
            "repeat": repeat, "empty": empty, "aliases": aliases or {}, "above": above,
            "layers": layers}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def temperatures_setting(default, help: str, empty=None):
    """A list of sampling temperatures, each in (0, MAX_TEMPERATURE]: every stage that samples
    declares its temperatures with this, so they accept the same values."""
    return setting(default, help, low=0.0, high=MAX_TEMPERATURE, above=True, empty=empty)


def applies(f, method: str) -> bool:
    """Whether the setting of dataclass field `f` matters to `method`."""
    only = f.metadata.get("only")
    return only is None or method in ((only,) if isinstance(only, str) else only)


def split_comma_strings(config) -> None:
    """List settings given as comma strings (the form they had before they were lists; scripts
    and JSON still send them) become lists; `validate` checks the items."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, str) and comma_list(type(config), f):
            setattr(config, f.name, split_items(value, flag_of(f), list_item_type(type(config), f)))


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def choices_of(f) -> tuple | None:
    """The field's allowed values (for a list setting: allowed items), or None."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


@functools.cache
def _hints(config_cls) -> dict:
    return typing.get_type_hints(config_cls)


def list_item_type(config_cls, f) -> type | None:
    """The item type of a list setting (`list[float]` -> float); None for other fields."""
    hint = _hints(config_cls)[f.name]
    if typing.get_origin(hint) is not list:
        return None
    return (typing.get_args(hint) or (str,))[0]


def comma_list(config_cls, f) -> bool:
    """Whether the field is a list setting given on the command line as one comma list."""
    return list_item_type(config_cls, f) is not None and not f.metadata.get("repeat")


def _item_words(kind: type) -> str:
    return {int: "whole number", float: "number"}.get(kind, kind.__name__)


def split_items(text: str, flag: str, kind: type = str) -> list:
    """A comma list as typed items ('' -> []); one line naming the flag for an item that is
    not of the type."""
    items = []
    for part in (part.strip() for part in str(text).split(",")):
        if not part:
            continue
        try:
            items.append(kind(part))
        except ValueError:
            raise OMLInputError(f"{flag}: {part!r} is not a {_item_words(kind)}; pass a comma "
                                f"list of them") from None
    return items


def _check_item(f, item, flag: str) -> None:
    meta = f.metadata
    choices = choices_of(f)
    if choices and item not in choices:
        raise OMLInputError(f"{flag}: {item!r} is not one of: {', '.join(choices)}")
    low, high, above = meta.get("low"), meta.get("high"), meta.get("above")
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        too_low = low is not None and (item <= low if above else item < low)
        if not math.isfinite(item) or too_low or (high is not None and item > high):
            bounds = [f"{'above' if above else 'at least'} {low:g}" if low is not None else "",
                      f"at most {high:g}" if high is not None else ""]
            raise OMLInputError(f"{flag}: {item:g} is out of range; pass values "
                                + " and ".join(b for b in bounds if b))


def list_value(config_cls, f, value, flag: str | None = None) -> list:
    """A list setting's value checked item by item: a comma string is split first (callers
    that still pass one), old item names become their new ones, duplicates are dropped, and an
    empty list is refused unless the field says what it means."""
    kind = list_item_type(config_cls, f)
    flag = flag or flag_of(f)
    if isinstance(value, str):
        value = split_items(value, flag, kind)
    if not isinstance(value, (list, tuple)):
        raise OMLInputError(f"{flag}: pass a list (on the command line, a comma list)")
    aliases = f.metadata.get("aliases") or {}
    items = []
    for item in value:
        if kind is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        item = aliases.get(item, item)
        if not isinstance(item, kind):
            raise OMLInputError(f"{flag}: {item!r} is not a {_item_words(kind)}")
        _check_item(f, item, flag)
        items.append(item)
    if not items and f.metadata.get("empty") is None:
        raise OMLInputError(f"{flag}: no value given; pass at least one"
                            + (f" (one or more of: {', '.join(choices_of(f))})"
                               if choices_of(f) else ""))
    return list(dict.fromkeys(items))


@dataclass
class _Temperatures:  # the list setting parse_temperatures reads
    temperatures: list[float] = temperatures_setting([], "", empty="none")


def parse_temperatures(value, flag: str = "--temperatures", allow_empty: bool = False
                       ) -> list[float]:
    """Sampling temperatures (a comma list or a list), each in (0, 2]: one parser for callers
    outside a stage config, with the range every stage's `temperatures_setting` declares."""
    temperatures = list_value(_Temperatures, dataclasses.fields(_Temperatures)[0], value, flag)
    if not temperatures and not allow_empty:
        raise OMLInputError(f"{flag}: no value given; pass at least one (e.g. 0.7,1.0)")
    return temperatures


def parse_layer_spec(spec: str, flag: str, words: tuple[str, ...] = ("auto",)) -> str | list[int]:
    """A layer setting: one of `words` (auto, none) or a comma list of layer indices, sorted.
    Whether the indices exist is for the loaded model's depth to say (train/edit.py)."""
    spec = (spec or "").strip()
    if spec in words:
        return spec
    try:
        layers = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        layers = []
    if not layers or layers[0] < 0:
        raise OMLInputError(f"{flag} {spec!r}: give {', '.join(words)} or a comma list of layer "
                            "indices (e.g. 2,3,4)")
    return layers


def validate(config) -> None:
    """Check every field against its declared choices and range; raise one clear line. List
    settings are checked item by item and stored normalised (see `list_value`)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        meta = f.metadata
        flag = flag_of(f)
        if value is None:
            continue
        if list_item_type(type(config), f) is not None:
            setattr(config, f.name, list_value(type(config), f, value))
            continue
        if meta.get("layers"):
            parse_layer_spec(value, flag, meta["layers"])
        choices = choices_of(f)
        if choices and value not in choices:
            raise OMLInputError(f"{flag} {value!r} is not one of: {', '.join(choices)}")
        low, high = meta.get("low"), meta.get("high")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"at least {low}" if high is None else f"between {low} and {high}"
                raise OMLInputError(f"{flag} must be {bounds} (got {value})")
