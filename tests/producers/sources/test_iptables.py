"""The iptables source: `-nvxL` output and real accounting rules."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any

import pytest

from quotaflow.producers.sources import ParseError, SourceError
from quotaflow.producers.sources.iptables import parse_iptables, read_iptables
from tests.producers.sources.helpers import (
    DOWNLOAD,
    LOCAL,
    SBIN_PATH,
    _body,
    _read_all,
    readings,
    sample,
)


def test_iptables_sample() -> None:
    counters = parse_iptables(sample("iptables-nvxL.txt"))
    assert readings(counters) == {
        "8388": (21873412 + 87231, 61234987 + 101244),
        "8389": (1203944, 9301225),
        "8390": (0, 0),
    }


IPTABLES_HEADER = (
    "Chain SS_ACCOUNT (1 references)\n"
    "    pkts      bytes target     prot opt in     out     source               destination\n"
)


def test_iptables_port_in_comment_is_not_a_match() -> None:
    rule = "    1  100 ACCEPT  tcp  --  *  *  0.0.0.0/0  0.0.0.0/0  /* dpt:9999 */ tcp spt:8388\n"
    assert readings(parse_iptables(IPTABLES_HEADER + rule)) == {"8388": (0, 100)}


def test_iptables_negated_port_is_skipped() -> None:
    rule = "    1  100 ACCEPT  tcp  --  *  *  0.0.0.0/0  0.0.0.0/0  tcp dpt:!8388\n"
    assert parse_iptables(IPTABLES_HEADER + rule) == []


def test_iptables_line_numbers() -> None:
    text = (
        "Chain SS_ACCOUNT (1 references)\n"
        "num      pkts      bytes target     prot opt in     out     source     destination\n"
        "1          12       3400 ACCEPT     tcp  --  *   *   0.0.0.0/0  0.0.0.0/0  tcp dpt:8388\n"
        "2          10       9900            tcp  --  *   *   0.0.0.0/0  0.0.0.0/0  tcp spt:8388\n"
    )
    assert readings(parse_iptables(text)) == {"8388": (3400, 9900)}


def test_iptables_empty_chain() -> None:
    assert parse_iptables(IPTABLES_HEADER) == []


@pytest.mark.parametrize(
    "rule",
    [
        "   12K  3M ACCEPT tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:8388",  # without -x
        "Zeroing chain `SS_ACCOUNT'\n",
        "1 2 ACCEPT tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp spt:1 dpt:8388",
        "1 2 ACCEPT tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:70000",
        "1 2 ACCEPT tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:08388",
        "hello world",
    ],
)
def test_iptables_refuses_garbage(rule: str) -> None:
    with pytest.raises(ParseError):
        parse_iptables(IPTABLES_HEADER + rule)


def test_iptables_refuses_rules_without_header() -> None:
    # With --line-numbers and no header, "1 12 3400" would be misread: refuse instead.
    with pytest.raises(ParseError, match="header"):
        parse_iptables("1  12  3400 ACCEPT tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:8388\n")


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["iptables", "-w", *args],
        capture_output=True,
        text=True,
        check=check,
        env={**os.environ, "PATH": SBIN_PATH},
    )


@pytest.mark.integration
def test_iptables_counts_port_bytes(root: None, node_software: None, http_port: int) -> None:
    chain = f"QFTEST{os.getpid()}"
    _iptables("-N", chain)
    _iptables("-I", "OUTPUT", "-o", "lo", "-j", chain)
    try:
        _iptables("-A", chain, "-p", "tcp", "-d", LOCAL, "--dport", str(http_port))
        _iptables("-A", chain, "-p", "tcp", "-s", LOCAL, "--sport", str(http_port))
        with socket.create_connection((LOCAL, http_port), timeout=10) as sock:
            sock.sendall(b"GET /blob HTTP/1.0\r\n\r\n")
            assert _read_all(sock).endswith(_body(DOWNLOAD))
        env_path = {**os.environ, "PATH": SBIN_PATH}

        def runner(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, env=env_path, **kwargs)

        text = read_iptables(chain, runner)
        (counter,) = parse_iptables(text)
        assert counter.user_id == str(http_port)
        assert DOWNLOAD <= counter.down <= DOWNLOAD * 11 // 10, text
        assert 0 < counter.up < 20_000, text
    finally:
        _iptables("-D", "OUTPUT", "-o", "lo", "-j", chain, check=False)
        _iptables("-F", chain, check=False)
        _iptables("-X", chain, check=False)
    with pytest.raises(SourceError):
        read_iptables(chain, runner)
