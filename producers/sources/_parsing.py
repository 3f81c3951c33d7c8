"""Text-reading helpers shared by the sources: strict numbers, strict JSON, user renaming.

Every source reads its program's counters as *cumulative*: never ask a server to
reset its counters on read (`xray api statsquery -reset`, `iptables -Z`), because a
reading lost on the way would then be traffic lost for good. Input that cannot be
read with certainty raises `ParseError` (a `ValueError`) naming what was wrong; a
parser never guesses, because a wrong reading would be billed.

Direction follows the contracts: `up` is what the user sent, `down` what the user
received.

>>> parse_counters_json('{"alice": [10, 20]}')
[Counter(user_id='alice', up=10, down=20)]
>>> apply_user_map(parse_counters_json('{"8388": [0, 500], "8389": [0, 70]}'),
...                {"8388": "alice", "8389": "alice"})
[Counter(user_id='alice', up=0, down=570)]
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import orjson
from pydantic import ValidationError

from quotaflow.core.contracts import (
    MAX_COUNTER,
    MAX_IDENTIFIER_LENGTH,
    Counter,
    identifier_problem,
)

MAX_USER_ID_LENGTH: Final = MAX_IDENTIFIER_LENGTH  # the contracts' Identifier limit
MAX_EXACT_FLOAT: Final = 2**53  # larger float values may not be exact byte counts
DIGITS: Final = re.compile(r"[0-9]{1,19}")


class ParseError(ValueError):
    """The input is not in the expected format, or holds a value that cannot be billed."""




def decimal_uint(text: str, what: str) -> int:
    """A decimal byte count, checked to fit the contracts' 63-bit counters."""
    if not DIGITS.fullmatch(text):
        raise ParseError(f"{what}: expected a non-negative decimal integer, got {text[:60]!r}")
    value = int(text)
    if value > MAX_COUNTER:
        raise ParseError(f"{what}: {value} is larger than the largest counter ({MAX_COUNTER})")
    return value


def checked_counter(user_id: str, up: int, down: int) -> Counter:
    """Build a Counter, turning every validation failure into a ParseError.

    >>> try:
    ...     checked_counter("alice\\\\", 1, 2)
    ... except ParseError as exc:
    ...     print(exc)
    user id 'alice\\\\' must not end with a backslash
    """
    problem = identifier_problem(user_id)
    if problem is not None:
        raise ParseError(f"user id {user_id[:60]!r} {problem}")
    if up > MAX_COUNTER or down > MAX_COUNTER:
        raise ParseError(f"{user_id!r}: counter larger than {MAX_COUNTER} (up={up}, down={down})")
    try:
        return Counter(user_id=user_id, up=up, down=down)
    except ValidationError as exc:  # e.g. lone surrogates from undecodable bytes
        raise ParseError(f"{user_id!r}: not a valid counter: {exc}") from exc


def counters_of(totals: Mapping[str, tuple[int, int]]) -> list[Counter]:
    """Counters from a user -> (up, down) mapping, sorted by user id for stable output."""
    return [checked_counter(user, up, down) for user, (up, down) in sorted(totals.items())]


def add_traffic(totals: dict[str, tuple[int, int]], user: str, up: int, down: int) -> None:
    old_up, old_down = totals.get(user, (0, 0))
    totals[user] = (old_up + up, old_down + down)


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice makes the object ambiguous."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ParseError(f"JSON object has the key {key!r} twice")
        result[key] = value
    return result


def loads_strict(text: str | bytes, what: str) -> Any:
    """json.loads with duplicate keys refused and every failure as a ParseError."""
    try:
        return json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except ParseError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ParseError(f"{what}: not valid JSON: {exc}") from exc


def json_uint(value: object, what: str) -> int:
    """A byte count from JSON: an integer or (protobuf JSON's int64 form) a decimal string."""
    if isinstance(value, bool):
        raise ParseError(f"{what}: expected a byte count, got {value!r}")
    if isinstance(value, int):
        if value < 0 or value > MAX_COUNTER:
            raise ParseError(f"{what}: byte count {value} out of range")
        return value
    if isinstance(value, str):
        return decimal_uint(value, what)
    raise ParseError(f"{what}: expected an integer or a decimal string, got {value!r:.60}")


def apply_user_map(
    counters: Iterable[Counter], user_map: Mapping[str, str] | None
) -> list[Counter]:
    """Rename source ids (ports, public keys, common names) to user ids, summing merges.

    Counters whose ids map to the same user are added together. Ids the map does
    not name keep their own id: dropping them would silently lose traffic, and a
    source id that reaches the ledger is easy to spot and fix in the map. With no
    map the counters are returned as they are (combined by id, sorted).
    """
    totals: dict[str, tuple[int, int]] = {}
    for counter in counters:
        user = user_map.get(counter.user_id, counter.user_id) if user_map else counter.user_id
        add_traffic(totals, user, counter.up, counter.down)
    return counters_of(totals)


def parse_counters_json(text: str | bytes) -> list[Counter]:
    """`{"user": [up, down], ...}` or a list of `{"user_id", "up", "down"}` objects.

    The format of the `command` source's `json` parser and of the panel push body.
    A key given twice is refused, as everywhere.
    """
    return load_counters_json(text)[0]


def load_counters_json(text: str | bytes) -> tuple[list[Counter], dict[str, Any] | list[Any]]:
    """`parse_counters_json`, with the JSON value it read (the push receiver hashes it).

    Lean on large input (a panel push can be megabytes): orjson reads the text
    into one value, and a key given twice is found by counting. Outside strings a
    colon separates an object's key from its value and appears nowhere else, so
    the text has as many colons outside strings as its objects have members; a
    valid value's objects have `n` distinct keys (`n` users, or 3 per listed
    counter) and nothing nested, so `n` colons means no key was given twice. On
    anything else — not valid for orjson (UTF-16, NaN, lone surrogates, integers
    past 64 bits read as floats), a value refused, a count that differs — the text
    is read again the strict way, so errors and results are exactly the strict
    reader's.
    """
    try:
        data = orjson.loads(text)
        counters = _counters_from_json(data)
    except ValueError:  # orjson.JSONDecodeError and ParseError both are
        pass
    else:
        members = len(data) if isinstance(data, dict) else 3 * len(data)
        if _colons_outside_strings(text, members) == members:
            return counters, data
    data = loads_strict(text, "counters JSON")
    return _counters_from_json(data), data


_JSON_STRING_BYTES: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_STRING_TEXT: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _colons_outside_strings(text: str | bytes, at_least: int) -> int:
    r"""How many `:` valid JSON `text` has outside its strings (its objects' members).

    The text is only scanned for strings when it has more than `at_least` colons
    in all (outside strings there are at least as many as its values' members).

    >>> _colons_outside_strings(b'{"a:b": 1, "c\\\":": {"d": 2}}', 0)
    3
    """
    if isinstance(text, str):
        colons = text.count(":")
        return colons if colons <= at_least else _JSON_STRING_TEXT.sub("", text).count(":")
    colons = text.count(b":")
    return colons if colons <= at_least else _JSON_STRING_BYTES.sub(b"", text).count(b":")


def _counters_from_json(data: Any) -> list[Counter]:
    if isinstance(data, dict):
        pairs = []
        for user, value in data.items():
            if (
                not isinstance(value, list) or len(value) != 2
                or not all(type(v) is int for v in value)
            ):
                raise ParseError(
                    f"counters of {user[:40]!r} must be [up, down], whole numbers >= 0"
                )
            up, down = json_uint(value[0], user), json_uint(value[1], user)
            pairs.append(checked_counter(user, up, down))
        return pairs
    if isinstance(data, list):
        out = []
        for item in data:
            if not isinstance(item, dict) or set(item) != {"user_id", "up", "down"}:
                raise ParseError(f"expected {{user_id, up, down}} objects, got {item!r:.60}")
            user, up, down = item["user_id"], item["up"], item["down"]
            if not isinstance(user, str) or type(up) is not int or type(down) is not int:
                raise ParseError(f"expected {{user_id, up, down}} objects, got {item!r:.60}")
            out.append(checked_counter(user, json_uint(up, user), json_uint(down, user)))
        return out
    raise ParseError("expected a JSON object or list of counters")
