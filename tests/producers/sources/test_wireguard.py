"""The wireguard source: `wg show dump` and a real wireguard-go tunnel."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from quotaflow.producers.sources import ParseError
from quotaflow.producers.sources.wireguard import parse_wg_dump, read_wg_dump
from tests.producers.sources.helpers import (
    _NETNS_FETCH,
    _NETNS_HTTP_SERVER,
    DOWNLOAD,
    LOCAL,
    PEER_1,
    PEER_2,
    SBIN_PATH,
    UPLOAD,
    Processes,
    _body,
    _ip,
    assert_tunnel_figures,
    by_user,
    free_port,
    readings,
    sample,
    wait_until,
)

PEER_3 = "KdRCiLDxU9C6bWLtQussWAK5b32KNTNKj/qX1n+5vTk="


def test_wg_dump_all_sums_a_key_over_interfaces() -> None:
    counters = parse_wg_dump(sample("wg-show-all-dump.txt"))
    assert readings(counters) == {
        PEER_1: (48213390 + 1000, 912837412 + 2000),
        PEER_2: (1203, 8812),
        PEER_3: (0, 0),
    }


def test_wg_dump_one_interface() -> None:
    counters = parse_wg_dump(sample("wg-show-wg0-dump.txt"))
    assert readings(counters) == {PEER_1: (48213390, 912837412), PEER_2: (1203, 8812)}


def test_wg_dump_empty() -> None:
    assert parse_wg_dump("") == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t.replace(PEER_2, "not-a-key"),
        lambda t: t.replace("\t1203\t", "\t-1203\t"),
        lambda t: t.replace("\t8812\t", "\t8.8K\t"),
        lambda t: "\n".join(t.splitlines()[1:]),  # peers without their interface
        lambda t: t + t.splitlines()[1] + "\n",  # a peer listed twice
        lambda t: t.replace("\t(none)\t198.51.100.7:40123", "\t198.51.100.7:40123"),
    ],
)
def test_wg_dump_refuses_garbage(mutate: Callable[[str], str]) -> None:
    with pytest.raises(ParseError):
        parse_wg_dump(mutate(sample("wg-show-all-dump.txt")))


def test_wg_dump_refuses_mixed_forms() -> None:
    text = sample("wg-show-all-dump.txt") + sample("wg-show-wg0-dump.txt")
    with pytest.raises(ParseError):
        parse_wg_dump(text)


@pytest.mark.integration
def test_wireguard_counts_peer_bytes(
    root: None, node_software: None, processes: Processes, tmp_path: Path
) -> None:
    tag = f"{os.getpid() % 100_000}"
    ns_client, ns_server = f"qf{tag}c", f"qf{tag}s"
    wg_client, wg_server = f"qfwc{tag}", f"qfws{tag}"
    keys = {}
    for side in ("client", "server"):
        private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True)
        public = subprocess.run(
            ["wg", "pubkey"], input=private.stdout, capture_output=True, text=True, check=True
        )
        (tmp_path / f"{side}.key").write_text(private.stdout)
        keys[side] = public.stdout.strip()
    udp = {"client": free_port(socket.SOCK_DGRAM), "server": free_port(socket.SOCK_DGRAM)}
    server_port = 8080
    try:
        for ns in (ns_client, ns_server):
            _ip("netns", "add", ns)
        for iface in (wg_client, wg_server):
            processes.start(iface, ["wireguard-go", iface], env={"WG_PROCESS_FOREGROUND": "1"})
        for iface in (wg_client, wg_server):
            wait_until(iface, Path(f"/var/run/wireguard/{iface}.sock").exists)
        plan = [
            ("client", wg_client, ns_client, "10.213.0.1", "server", "10.213.0.2"),
            ("server", wg_server, ns_server, "10.213.0.2", "client", "10.213.0.1"),
        ]
        for side, iface, ns, address, peer, peer_address in plan:
            subprocess.run(
                ["wg", "set", iface, "listen-port", str(udp[side]),
                 "private-key", str(tmp_path / f"{side}.key"),
                 "peer", keys[peer], "endpoint", f"{LOCAL}:{udp[peer]}",
                 "allowed-ips", f"{peer_address}/32"],
                check=True,
            )  # fmt: skip
            # The UDP socket stays in this namespace (loopback); the tunnel moves out.
            _ip("link", "set", iface, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", iface)
            _ip("-n", ns, "link", "set", iface, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        processes.start(
            "http-in-netns",
            ["ip", "netns", "exec", ns_server, sys.executable, "-c", _NETNS_HTTP_SERVER,
             "10.213.0.2", str(server_port), str(DOWNLOAD)],
        )  # fmt: skip
        fetch = subprocess.run(
            ["ip", "netns", "exec", ns_client, sys.executable, "-c", _NETNS_FETCH,
             "10.213.0.2", str(server_port), str(UPLOAD)],
            capture_output=True, timeout=60, env={**os.environ, "PATH": SBIN_PATH},
        )  # fmt: skip
        assert fetch.returncode == 0, (fetch.stderr, processes.logs())
        assert fetch.stdout == _body(DOWNLOAD)

        users = by_user(parse_wg_dump(read_wg_dump(wg_server)))
        client_peer = users[keys["client"]]  # the server's view: what the client sent and got
        assert_tunnel_figures(client_peer)
        # The client's view of the server peer. Not an exact mirror: a sender counts
        # datagrams that the loopback then drops (TCP sends them again).
        mirror = by_user(parse_wg_dump(read_wg_dump(wg_client)))[keys["server"]]
        assert DOWNLOAD < mirror.up <= client_peer.down and mirror.down > UPLOAD, mirror
    finally:
        processes.stop()
        for ns in (ns_client, ns_server):
            _ip("netns", "del", ns, check=False)


# --------------------------------------------------------------------------- OpenVPN
