"""Image parts of chat messages: fetched (only if enabled, and only from public addresses),
checked and decoded with Pillow before any model sees them.

Every failure is a 400 that names the part (`messages[1].content[2]`). The decoder reads the
header first and refuses an image whose declared size is over the pixel limit before a single
pixel is decompressed, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
import threading
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

from starlette.concurrency import run_in_threadpool

from bastion.config import Settings
from bastion.engines.base import DecodedImage
from bastion.errors import InvalidRequestError
from bastion.protocol.chat import ChatMessage, ImagePart

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
MAX_REDIRECTS = 3


class ImageError(InvalidRequestError):
    code = "invalid_image"


def image_parts(messages: list[ChatMessage]) -> list[tuple[int, int, ImagePart]]:
    return [(i, j, part) for i, m in enumerate(messages) if isinstance(m.content, list)
            for j, part in enumerate(m.content) if isinstance(part, ImagePart)]


async def load_images(messages: list[ChatMessage], settings: Settings
                      ) -> dict[tuple[int, int], DecodedImage]:
    """(message index, part index) -> decoded image, for every image part of the request."""
    parts = image_parts(messages)
    if len(parts) > settings.max_images_per_request:
        i, j, _ = parts[settings.max_images_per_request]
        raise ImageError(f"At most {settings.max_images_per_request} images per request "
                         f"(this one has {len(parts)}).", param=f"messages[{i}].content[{j}]",
                         code="too_many_images")
    out: dict[tuple[int, int], DecodedImage] = {}
    for i, j, part in parts:
        param = f"messages[{i}].content[{j}]"
        data = await image_bytes(part.image_url.url, settings, param)
        out[(i, j)] = await run_in_threadpool(decode, data, settings, param)
    return out


async def image_bytes(url: str, settings: Settings, param: str) -> bytes:
    if url.startswith("data:"):
        return from_data_uri(url, settings.max_image_bytes, param)
    scheme = urlsplit(url).scheme.lower()
    if scheme != "https":
        raise ImageError(f"{param}: the image URL must be a data: URI or an https:// URL "
                         f"(got a {scheme or 'relative'} URL).", param=param)
    if not settings.fetch_remote_images:
        raise ImageError(f"{param}: this server does not fetch remote images; send the image "
                         f"inline as a data: URI (data:image/png;base64,...).", param=param,
                         code="remote_images_disabled")
    return await run_in_threadpool(fetch, url, settings.max_image_bytes,
                                   settings.remote_image_timeout, param)


def from_data_uri(url: str, max_bytes: int, param: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    mime, _, encoding = header.partition(";")
    if not sep or encoding.lower() != "base64":
        raise ImageError(f"{param}: a data URI must look like data:image/png;base64,<data>.",
                         param=param)
    if mime.lower() not in FORMATS.values():
        raise ImageError(f"{param}: unsupported image type '{mime}'; use PNG, JPEG, WebP or "
                         f"GIF.", param=param, code="unsupported_image_format")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"{param}: the image is about {len(payload) * 3 // 4} bytes; the "
                         f"limit is {max_bytes} bytes.", param=param, code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{param}: the data URI is not valid base64.", param=param) from None
    if len(data) > max_bytes:
        raise ImageError(f"{param}: the image is {len(data)} bytes; the limit is {max_bytes} "
                         f"bytes.", param=param, code="image_too_large")
    return data


def decode(data: bytes, settings: Settings, param: str) -> DecodedImage:
    """Pillow decode with the format and size checked from the header before decompression."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
            width, height = im.size
            if width * height > settings.max_image_pixels:
                raise ImageError(
                    f"{param}: the image is {width}x{height} = {width * height} pixels; the "
                    f"limit is {settings.max_image_pixels} pixels.", param=param,
                    code="image_too_large")
            im.seek(0)  # an animated GIF or WebP: its first frame
            rgb = im.convert("RGB")
            return DecodedImage(width=rgb.width, height=rgb.height, rgb=rgb.tobytes())
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{param}: not an image in a supported format (PNG, JPEG, WebP or "
                         f"GIF).", param=param, code="unsupported_image_format") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{param}: the image could not be decoded ({exc}).",
                         param=param) from None


# IPv6 ranges that carry an IPv4 address or reach a private network whatever they carry.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")        # the well-known prefix: unwrap
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # a site's own translator: refuse
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")       # deprecated ::a.b.c.d: refuse


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a mapped, 6to4 or NAT64 address reaches: `is_global` judges only the
    IPv6 wrapper, so `64:ff9b::a9fe:a9fe` would pass as public while it is 169.254.169.254."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether Bastion may connect to `ip` on a client's behalf."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            return is_public(inner)
        if ip in IPV4_COMPATIBLE or ip in LOCAL_NAT64 or ip.is_site_local:
            return False
    return ip.is_global and not ip.is_multicast


def check_address(host: str, port: int, param: str) -> str:
    """The address to connect to: every address the name resolves to must be public, so a name
    that points inside (loopback, private, link-local, the cloud metadata service, or any of
    them wrapped in an IPv6 translation prefix) is refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ImageError(f"{param}: cannot resolve the image host '{host}' ({exc}).",
                         param=param, code="image_fetch_failed") from None
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not is_public(ip):
            inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
            raise ImageError(f"{param}: the image host '{host}' resolves to {inner or ip}, "
                             f"which is not a public address; Bastion never fetches from "
                             f"internal addresses.", param=param, code="image_url_forbidden")
        addresses.append(str(ip))
    return addresses[0]


class Deadline:
    """Shuts the connection's socket down when the fetch's time is up. urllib3's timeout bounds
    each read, not the whole fetch: a server that trickles a byte every few seconds would hold
    the thread for days. shutdown() on a duplicate descriptor acts on the shared socket, so it
    also ends a read blocked inside the TLS layer in another thread."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = socket.socket(fileno=os.dup(sock.fileno()))
            self._timer = threading.Timer(self.left(), self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if time.monotonic() >= self.at:
                self.expired = True


def watched(base: type) -> type:
    """`base` (a urllib3 connection class) whose socket a Deadline watches from its creation,
    so the TLS handshake and the response headers are bounded too."""

    class Watched(base):  # type: ignore[misc, valid-type]
        deadline: Deadline

        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            self.deadline.watch(sock)
            return sock

    return Watched


def get_once(connection: Any, path: str, host: str, max_bytes: int, deadline: Deadline,
             timeout: float, param: str) -> tuple[int, str, bytes]:
    """One GET on `connection`: (status, Location header, body), bounded by the deadline and
    the byte cap."""
    import http.client

    import urllib3

    connection.deadline = deadline
    try:
        connection.request("GET", path, headers={"Host": host, "User-Agent": "Bastion"},
                           preload_content=False)
        resp: Any = connection.getresponse()
        if resp.status != 200:
            return resp.status, resp.headers.get("location", ""), b""
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise ImageError(f"{param}: the image is {declared} bytes; the limit is "
                             f"{max_bytes} bytes.", param=param, code="image_too_large")
        body = bytearray()
        for chunk in resp.stream(65536, decode_content=False):  # images are never
            # content-encoded: a gzip "image" fails to decode as one instead of inflating here
            body += chunk
            if len(body) > max_bytes:
                raise ImageError(f"{param}: the image is over the {max_bytes}-byte "
                                 f"limit.", param=param, code="image_too_large")
        deadline.close()
        if deadline.expired:  # the body ended because the watchdog shut the socket
            raise TimeoutError
        return 200, "", bytes(body)
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
        deadline.close()
        if deadline.expired:
            raise ImageError(f"{param}: fetching the image took over {timeout:g}s.",
                             param=param, code="image_fetch_failed") from None
        raise ImageError(f"{param}: the image could not be fetched ({type(exc).__name__}).",
                         param=param, code="image_fetch_failed") from None
    finally:
        deadline.close()
        connection.close()


def fetch(url: str, max_bytes: int, timeout: float, param: str) -> bytes:
    """GET an https URL pinned to the checked address (no second DNS answer can swap it),
    with the certificate checked against the name, a byte cap, a wall-clock deadline for the
    whole fetch (redirects included) and redirects followed only on the same host."""
    from urllib3.connection import HTTPSConnection

    deadline = Deadline(timeout)
    first_host = urlsplit(url).hostname
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 443
        if parts.scheme.lower() != "https" or not host:
            raise ImageError(f"{param}: the image URL must be https:// with a host name.",
                             param=param)
        if host != first_host:
            raise ImageError(f"{param}: the image URL redirects to another host ({host}); "
                             f"redirects are followed only on the same host.", param=param,
                             code="image_url_forbidden")
        address = check_address(host, port, param)
        left = deadline.left()
        if left <= 0:
            raise ImageError(f"{param}: fetching the image took over {timeout:g}s.",
                             param=param, code="image_fetch_failed")
        step = Deadline(left)
        connection = watched(HTTPSConnection)(address, port, server_hostname=host,
                                              assert_hostname=host, timeout=left)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        status, location, body = get_once(connection, path, host, max_bytes, step, timeout,
                                          param)
        if status in (301, 302, 303, 307, 308):
            url = urljoin(url, location)
            continue
        if status != 200:
            raise ImageError(f"{param}: fetching the image returned HTTP {status}.",
                             param=param, code="image_fetch_failed")
        return body
    raise ImageError(f"{param}: more than {MAX_REDIRECTS} redirects.", param=param,
                     code="image_fetch_failed")
