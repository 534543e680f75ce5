"""Typed config files: TOML → msgspec Struct, with errors that name the key and suggest the closest one.

Every recipe (data, train, serve) is a msgspec Struct with `forbid_unknown_fields=True`; this module turns
msgspec's validation errors into messages a user can act on.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from model.errors import ConfigError

T = TypeVar("T", bound=msgspec.Struct)


def _known_fields(struct_type: type, path: list[str]) -> list[str]:
    """Field names of the Struct reached by following `path` (nested Structs only)."""
    current: Any = struct_type
    for key in path:
        info = msgspec.inspect.type_info(current)
        field = next((f for f in getattr(info, "fields", ()) if f.encode_name == key), None)
        if field is None or not isinstance(field.type, msgspec.inspect.StructType):
            return []
        current = field.type.cls
    info = msgspec.inspect.type_info(current)
    return [f.encode_name for f in getattr(info, "fields", ())]


def _unknown_keys(data: Any, struct_type: type, path: list[str]) -> list[tuple[list[str], str]]:
    out: list[tuple[list[str], str]] = []
    if not isinstance(data, dict):
        return out
    known = _known_fields(struct_type, path)
    if not known:
        return out
    for key, value in data.items():
        if key not in known:
            out.append((path, key))
        elif isinstance(value, dict):
            out.extend(_unknown_keys(value, struct_type, [*path, key]))
    return out


def convert(data: dict[str, Any], struct_type: type[T], source: str) -> T:
    """Validate a plain dict into `struct_type`; `source` names the file (or 'flags') in errors."""
    for path, key in _unknown_keys(data, struct_type, []):
        known = _known_fields(struct_type, path)
        close = difflib.get_close_matches(key, known, n=1)
        where = ".".join([*path, key])
        hint = (
            f"; did you mean '{'.'.join([*path, close[0]])}'?"
            if close
            else f"; known keys: {', '.join(known)}"
        )
        raise ConfigError(f"{source}: unknown key '{where}'{hint}")
    try:
        return msgspec.convert(data, struct_type, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.train.lr`"; make the path read like TOML.
        raise ConfigError(f"{source}: {str(exc).replace('$.', '').replace('`$`', 'top level')}") from None


def load(path: str | Path, struct_type: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Read a TOML file into `struct_type`; `overrides` (dotted keys, e.g. from flags) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return convert(data, struct_type, str(path))
