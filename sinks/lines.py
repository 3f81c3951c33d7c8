"""InfluxDB line protocol: escaping, and points of any fields.

The InfluxDB sink's lines are built from these (`quotaflow.sinks.influx`), and so are
the `node_status` and `pipeline` points (`quotaflow.sinks.health`).
"""

from __future__ import annotations

from collections.abc import Mapping


def escape_tag(value: str) -> str:
    r"""A tag value for InfluxDB 1.x line protocol: `,`, `=` and space get a backslash.

    A backslash is not escaped: 1.x reads a character after a backslash as escaped,
    whatever precedes the backslash, and unescapes only `\,`, `\=` and `\ `, so it
    would keep `\\` as two backslashes. That also makes a tag value that ends with a
    backslash, or has one before a space, impossible to write; the contracts refuse
    such identifiers (`quotaflow.core.contracts.identifier_problem`).

    >>> print(escape_tag("DOMAIN\\alice,b=c d"))
    DOMAIN\alice\,b\=c\ d
    """
    return value.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def string_field(value: str) -> str:
    r"""A string field value for line protocol: quoted, with `\` and `"` escaped.

    >>> print(string_field('say "hi" \\o/'))
    "say \"hi\" \\o/"
    """
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def field_value(value: int | float | bool | str) -> str:
    """A field value in line protocol: `i` for integers, `true`/`false`, quoted strings.

    >>> print(*[field_value(v) for v in (3, 2.5, 1.0, True, 'a "b"')])
    3i 2.5 1.0 true "a \\"b\\""
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    return string_field(value)


def point_line(
    measurement: str, tags: Mapping[str, str], fields: Mapping[str, int | float | bool | str],
    time: int,
) -> str:
    """One point in line protocol; tags in key order (as InfluxDB sorts them), `time` as given.

    >>> print(point_line("node_status", {"node_id": "n 1"}, {"epoch": 7, "alive": False}, 5))
    node_status,node_id=n\\ 1 epoch=7i,alive=false 5
    """
    tag_part = "".join(f",{key}={escape_tag(value)}" for key, value in sorted(tags.items()))
    field_part = ",".join(f"{key}={field_value(value)}" for key, value in fields.items())
    return f"{measurement}{tag_part} {field_part} {time}"
