"""The one `host:port` parser: what listeners, peers and etcd endpoints are split into."""

from __future__ import annotations

import pytest

from agent.hostport import check_host_port, split_host_port


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:1", ("::1", 1)),
        (":9", ("", 9)),
        ("etcd-1.example:2379", ("etcd-1.example", 2379)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
    ],
)
def test_split(value: str, expected: tuple[str, int]) -> None:
    assert split_host_port(value) == expected


@pytest.mark.parametrize("value", ["localhost", "host:", "host:http", "host:٣"])
def test_split_refuses_a_missing_port(value: str) -> None:
    with pytest.raises(ValueError, match="expected host:port"):
        split_host_port(value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("7443", "expected host:port"),
        (":7443", "expected host:port"),
        ("a b:1", "whitespace"),
        ("[::1:7443", "bad IPv6"),
        ("::1:7443", "need brackets"),
        ("h:0", "port must be 1-65535"),
        ("h:65536", "port must be 1-65535"),
    ],
)
def test_check_refuses(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_host_port(value)


def test_check_accepts_ipv6_in_brackets() -> None:
    assert check_host_port("[fd00::7]:7443") == "[fd00::7]:7443"
