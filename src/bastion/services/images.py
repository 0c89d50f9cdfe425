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
import socket
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


def check_address(host: str, port: int, param: str) -> str:
    """The address to connect to: every address the name resolves to must be public, so a name
    that points inside (loopback, private, link-local, the cloud metadata service) is refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ImageError(f"{param}: cannot resolve the image host '{host}' ({exc}).",
                         param=param, code="image_fetch_failed") from None
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            raise ImageError(f"{param}: the image host '{host}' resolves to {ip}, which is not "
                             f"a public address; Bastion never fetches from internal "
                             f"addresses.", param=param, code="image_url_forbidden")
        addresses.append(str(ip))
    return addresses[0]


def fetch(url: str, max_bytes: int, timeout: float, param: str) -> bytes:
    """GET an https URL pinned to the checked address (no second DNS answer can swap it),
    with the certificate checked against the name, a byte cap, an overall deadline and
    redirects followed only on the same host."""
    import urllib3

    deadline = time.monotonic() + timeout
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
        pool = urllib3.HTTPSConnectionPool(
            address, port, server_hostname=host, assert_hostname=host, maxsize=1,
            timeout=urllib3.Timeout(total=max(0.1, deadline - time.monotonic())),
            retries=False)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            resp: Any = pool.urlopen("GET", path, headers={"Host": host, "User-Agent": "Bastion"},
                                     redirect=False, preload_content=False, retries=False)
            try:
                if resp.status in (301, 302, 303, 307, 308):
                    url = urljoin(url, resp.headers.get("location", ""))
                    continue
                if resp.status != 200:
                    raise ImageError(f"{param}: fetching the image returned HTTP {resp.status}.",
                                     param=param, code="image_fetch_failed")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise ImageError(f"{param}: the image is {declared} bytes; the limit is "
                                     f"{max_bytes} bytes.", param=param, code="image_too_large")
                body = bytearray()
                for chunk in resp.stream(65536):
                    body += chunk
                    if len(body) > max_bytes:
                        raise ImageError(f"{param}: the image is over the {max_bytes}-byte "
                                         f"limit.", param=param, code="image_too_large")
                    if time.monotonic() > deadline:
                        raise ImageError(f"{param}: fetching the image took over {timeout:g}s.",
                                         param=param, code="image_fetch_failed")
                return bytes(body)
            finally:
                resp.release_conn()
        except urllib3.exceptions.HTTPError as exc:
            raise ImageError(f"{param}: the image could not be fetched ({type(exc).__name__}).",
                             param=param, code="image_fetch_failed") from None
        finally:
            pool.close()
    raise ImageError(f"{param}: more than {MAX_REDIRECTS} redirects.", param=param,
                     code="image_fetch_failed")
