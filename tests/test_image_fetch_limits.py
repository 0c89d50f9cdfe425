"""Remote image fetching's own guards, tested on the module (the server only fetches https://
from public addresses, which a test cannot stand up locally): the address check against a
table of addresses, and the wall-clock deadline against a local server that trickles."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Iterator

import pytest
from urllib3.connection import HTTPConnection

from bastion.services.images import Deadline, ImageError, get_once, is_public, watched


@pytest.mark.parametrize("address,public", [
    ("93.184.216.34", True),
    ("2606:2800:220:1:248:1893:25c8:1946", True),
    ("127.0.0.1", False),
    ("10.1.2.3", False),
    ("169.254.169.254", False),
    ("::1", False),
    ("fe80::1", False),
    ("fc00::1", False),
    ("::ffff:169.254.169.254", False),   # IPv4-mapped
    ("::ffff:93.184.216.34", True),
    ("::a9fe:a9fe", False),              # IPv4-compatible 169.254.169.254
    ("::5db8:d822", False),              # IPv4-compatible, even of a public address
    ("64:ff9b::a9fe:a9fe", False),       # NAT64 of the metadata service
    ("64:ff9b::7f00:1", False),          # NAT64 of loopback
    ("64:ff9b::5db8:d822", True),        # NAT64 of a public address
    ("64:ff9b:1::a00:1", False),         # local-use NAT64 prefix
    ("2002:a9fe:a9fe::1", False),        # 6to4 of the metadata service
    ("2002:7f00:1::", False),            # 6to4 of loopback
    ("2002:5db8:d822::1", True),         # 6to4 of a public address
    ("fec0::1", False),                  # site-local
    ("2001:0:4136:e378::1", False),      # Teredo
    ("ff02::1", False),
])
def test_address_table(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


def serve(handler) -> Iterator[int]:
    """A one-connection-at-a-time TCP server on loopback running `handler(conn)`."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn, stop), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def trickle_body(conn: socket.socket, stop: threading.Event) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    with conn:
        while not stop.is_set():
            try:
                conn.sendall(b"x")
            except OSError:
                return
            time.sleep(0.3)


def trickle_headers(conn: socket.socket, stop: threading.Event) -> None:
    conn.recv(65536)
    with conn:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
            if stop.is_set():
                return
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.3)


def quick(conn: socket.socket, stop: threading.Event) -> None:
    conn.recv(65536)
    with conn:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")


@pytest.fixture(params=[trickle_body, trickle_headers], ids=["body", "headers"])
def trickler(request) -> Iterator[int]:
    yield from serve(request.param)


def fetch_plain(port: int, seconds: float) -> tuple[int, str, bytes]:
    # Each read's timeout (5 s) is far above the trickle's pace (0.3 s): only the wall-clock
    # deadline can stop it.
    connection = watched(HTTPConnection)("127.0.0.1", port, timeout=5)
    return get_once(connection, "/", "127.0.0.1", 1_000_000, Deadline(seconds), seconds, "p")


def test_a_trickling_server_is_cut_off_at_the_deadline(trickler: int) -> None:
    started = time.monotonic()
    with pytest.raises(ImageError, match="took over 1.5s"):
        fetch_plain(trickler, 1.5)
    assert time.monotonic() - started < 3


def test_a_prompt_server_is_read_whole() -> None:
    for port in serve(quick):
        assert fetch_plain(port, 5) == (200, "", b"hello")
