"""Image parts of chat messages: every check happens before any model sees the image, and
each failure is a 400 that names the part."""

from __future__ import annotations

import base64
import io
from typing import Iterator

import httpx
import pytest

from conftest import (ADMIN_KEY, MODEL, RunningServer, image_bytes, png_data_uri, start_server,
                      stop_server)


def ask(server: RunningServer, *urls: str, text_first: bool = True) -> httpx.Response:
    """A chat whose second message carries the images after two text parts."""
    parts = [{"type": "text", "text": "Look:"}, {"type": "text", "text": "here"}] \
        if text_first else []
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    body = {"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "system", "content": "You describe images."},
        {"role": "user", "content": parts}]}
    return httpx.post(f"{server.api}/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def error(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    return err


@pytest.fixture(scope="module")
def strict(tmp_path_factory) -> Iterator[RunningServer]:
    """A server with small image limits and remote fetching switched on."""
    srv = start_server(tmp_path_factory.mktemp("images"), "--parallel", "2", env={
        "BASTION_FETCH_REMOTE_IMAGES": "true", "BASTION_MAX_IMAGE_BYTES": "4000",
        "BASTION_MAX_IMAGE_PIXELS": "250000", "BASTION_MAX_IMAGES_PER_REQUEST": "2",
        "BASTION_REMOTE_IMAGE_TIMEOUT": "3"})
    yield srv
    stop_server(srv)


@pytest.mark.parametrize("fmt,mime,frames", [("PNG", "image/png", 1), ("JPEG", "image/jpeg", 1),
                                              ("WEBP", "image/webp", 1), ("GIF", "image/gif", 3),
                                              ("WEBP", "image/webp", 3)])
def test_valid_images_reach_the_model_check(server: RunningServer, fmt: str, mime: str,
                                            frames: int) -> None:
    """Each allowed format decodes (animated ones to their first frame); the bundled model has
    no vision, which is then the only complaint, naming the first image part."""
    err = error(ask(server, png_data_uri(fmt=fmt, mime=mime, frames=frames)))
    assert err["code"] == "model_not_supported" and err["param"] == "messages[1].content[2]"
    assert "does not support image input" in err["message"]


@pytest.mark.parametrize("url,code,fragment", [
    ("data:image/png;base64,@@@@", "invalid_image", "not valid base64"),
    ("data:image/png,rawbytes", "invalid_image", "data:image/png;base64,<data>"),
    ("data:image/bmp;base64," + base64.b64encode(image_bytes("BMP")).decode(),
     "unsupported_image_format", "unsupported image type 'image/bmp'"),
    ("data:image/png;base64," + base64.b64encode(image_bytes("BMP")).decode(),
     "unsupported_image_format", "not an image in a supported format"),
    ("data:image/png;base64," + base64.b64encode(image_bytes("PNG", (64, 64))[:60]).decode(),
     "invalid_image", "could not be decoded"),
    ("http://example.com/cat.png", "invalid_image", "data: URI or an https:// URL"),
    ("file:///etc/passwd", "invalid_image", "data: URI or an https:// URL"),
    ("https://example.com/cat.png", "remote_images_disabled", "does not fetch remote images"),
])
def test_bad_images(server: RunningServer, url: str, code: str, fragment: str) -> None:
    err = error(ask(server, png_data_uri(), url))
    assert err["param"] == "messages[1].content[3]"  # the second image is the bad one
    assert err["code"] == code and fragment in err["message"], err


def test_decompression_bomb_is_refused_from_its_header(server: RunningServer) -> None:
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (12000, 12000)).save(out, format="PNG")  # 144 MP in a tiny file
    bomb = out.getvalue()
    assert len(bomb) < 20_000  # 432 MB of pixels once decoded to RGB
    err = error(ask(server, "data:image/png;base64," + base64.b64encode(bomb).decode()))
    assert err["code"] == "image_too_large" and err["param"] == "messages[1].content[2]"
    assert "12000x12000" in err["message"] and "16777216 pixels" in err["message"]


def test_byte_and_count_limits(strict: RunningServer) -> None:
    import os

    from PIL import Image

    noisy = Image.frombytes("RGB", (60, 60), os.urandom(60 * 60 * 3))
    out = io.BytesIO()
    noisy.save(out, format="PNG")
    big = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    err = error(ask(strict, big))
    assert err["code"] == "image_too_large" and "4000 bytes" in err["message"]
    err = error(ask(strict, png_data_uri(), png_data_uri(), png_data_uri()))
    assert err["code"] == "too_many_images" and err["param"] == "messages[1].content[4]"
    assert "At most 2 images" in err["message"]


@pytest.mark.parametrize("url,address", [
    ("https://127.0.0.1/cat.png", "127.0.0.1"),
    ("https://169.254.169.254/latest/meta-data/iam/", "169.254.169.254"),
    ("https://localhost:8443/cat.png", "127.0.0.1"),
    ("https://[::1]/cat.png", "::1"),
    ("https://10.1.2.3/cat.png", "10.1.2.3"),
    ("https://[::ffff:169.254.169.254]/", "169.254.169.254"),
    ("https://0.0.0.0/", "0.0.0.0"),
    ("https://[64:ff9b::a9fe:a9fe]/", "169.254.169.254"),   # NAT64
    ("https://[2002:a9fe:a9fe::1]/", "169.254.169.254"),    # 6to4
    ("https://[::a9fe:a9fe]/", "::a9fe:a9fe"),              # IPv4-compatible
    ("https://[fec0::1]/", "fec0::1"),                      # site-local
])
def test_internal_addresses_are_never_fetched(strict: RunningServer, url: str,
                                              address: str) -> None:
    """Checked on the resolved address: `localhost` is refused as 127.0.0.1."""
    err = error(ask(strict, url))
    assert err["code"] == "image_url_forbidden" and err["param"] == "messages[1].content[2]"
    assert f"resolves to {address}" in err["message"]
    assert "Traceback" not in strict.log()
