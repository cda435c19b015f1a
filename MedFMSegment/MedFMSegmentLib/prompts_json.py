"""The prompts file's JSON layer: strict parsing (duplicate keys, huge integers, size and count caps),
the error collector that names key paths, and the typed value checks used by :mod:`prompts`.
"""
from __future__ import annotations

import difflib
import json
import math
import numbers
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from . import geometry
from .errors import InputError

_MAX_LISTED_ERRORS = 20
MAX_PROMPTS_BYTES = 8 << 20
MAX_PROMPTS = 100_000  # boxes + points over all segments
MAX_SEGMENTS = 10_000
MAX_DIGITS = 100  # an integer with more digits is no coordinate (and would not fit a float past ~308)


# --------------------------------------------------------------------------- error collection

class _Problems:
    """Collects validation problems so that one error lists all of them."""

    def __init__(self, source: str):
        self.source = source
        self.items: List[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}" if where else message)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise InputError(f"{self.source}: {self.items[0]}")
        shown = self.items[:_MAX_LISTED_ERRORS]
        more = len(self.items) - len(shown)
        lines = "\n".join(f"  - {item}" for item in shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise InputError(f"{self.source}: {len(self.items)} problems in the prompts:\n{lines}{tail}")


# --------------------------------------------------------------------------- JSON and schema checks

class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _BadInteger(Exception):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:  # also spares Python's 4300-digit int limit (ValueError)
        raise _BadInteger(text)
    return int(text)


def _loads(text: Union[str, bytes], source: str) -> Any:
    if len(text) > MAX_PROMPTS_BYTES:
        raise InputError(f"{source}: {len(text)} bytes of prompts is more than the limit of {MAX_PROMPTS_BYTES} "
                         f"(a prompts file is normally a few kB)")
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    keys = raw.count(b'"corners"') + raw.count(b'"position"')
    if keys > MAX_PROMPTS:  # counted before parsing: parsing 200k boxes alone takes seconds
        raise InputError(f"{source}: segments: {keys} boxes and points in all is more than the limit of "
                         f"{MAX_PROMPTS}")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_parse_int)
    except _BadInteger as exc:
        digits = exc.args[0]
        raise InputError(f"{source}: the integer {digits[:12]}... has {len(digits.lstrip('-'))} digits "
                         f"(at most {MAX_DIGITS}): not a coordinate") from None
    except RecursionError:
        raise InputError(f"{source}: the JSON is nested too deeply (a prompts file is normally 5 levels deep)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except _DuplicateKey as exc:
        raise InputError(f"{source}: the key {exc.args[0]!r} appears twice in the same JSON object") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: not UTF-8 text ({exc})") from exc


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _check_keys(obj: dict, allowed: Sequence[str], where: str, problems: _Problems) -> None:
    for key in obj:
        if not isinstance(key, str) or key.startswith("_") or key in allowed:
            continue
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
        problems.add(f"{where}.{key}" if where else key, f"unknown key{hint}")


def _object(value: Any, where: str, problems: _Problems) -> Optional[dict]:
    if not isinstance(value, dict):
        problems.add(where, f"expected an object {{...}}, got {_type_name(value)}")
        return None
    return value


def _number(value: Any, where: str, problems: _Problems) -> Optional[float]:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):  # numpy numbers too
        problems.add(where, f"expected a number, got {_type_name(value)} {value!r}")
        return None
    if not math.isfinite(float(value)):
        problems.add(where, f"must be a finite number, got {value!r}")
        return None
    return float(value)


def _vector3(value: Any, where: str, problems: _Problems) -> Optional[List[float]]:
    if not isinstance(value, list) or len(value) != 3:
        got = f"{len(value)} values" if isinstance(value, list) else _type_name(value)
        problems.add(where, f"expected 3 numbers [x, y, z], got {got}")
        return None
    numbers = [_number(v, f"{where}[{n}]", problems) for n, v in enumerate(value)]
    return None if any(v is None for v in numbers) else numbers


def _corners(value: Any, where: str, problems: _Problems) -> Optional[List[List[float]]]:
    if not isinstance(value, list) or len(value) != 2:
        got = f"{len(value)} items" if isinstance(value, list) else _type_name(value)
        problems.add(where, f"expected 2 corners [[x, y, z], [x, y, z]], got {got}")
        return None
    corners = [_vector3(v, f"{where}[{n}]", problems) for n, v in enumerate(value)]
    return None if any(c is None for c in corners) else corners


def _axis(value: Any, where: str, problems: _Problems) -> Optional[str]:
    if value not in geometry.AXES:
        problems.add(where, f"unknown axis {value!r}: expected one of {', '.join(geometry.AXES)}")
        return None
    return value


def _boolean(value: Any, where: str, problems: _Problems) -> Optional[bool]:
    if not isinstance(value, bool):
        problems.add(where, f"expected true or false, got {_type_name(value)} {value!r}")
        return None
    return value


def _list(value: Any, where: str, problems: _Problems) -> List[Any]:
    if not isinstance(value, list):
        problems.add(where, f"expected a list, got {_type_name(value)}")
        return []
    return value


def _name(value: Any, where: str, problems: _Problems) -> Optional[str]:
    if not isinstance(value, str) or not value.strip():
        problems.add(where, f"expected a non-empty string, got {_type_name(value)} {value!r}")
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        problems.add(where, f"{value!r} contains control characters (e.g. a newline)")
        return None
    return value
