"""An organisation's uploads stay within a quota of models and bytes (issue 15, finding 5),
counted in the database, and two uploads racing for the last place cannot both have it: the
one part of test_upload_limits.py that the PostgreSQL pass runs."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from conftest import bearer, database_rows, make_tenant
from polling import wait_until
from test_upload_limits import alive, form, refused, upload
from test_upload_limits import srv, tiny  # noqa: F401  (the fixtures, found by name)


@pytest.mark.timeout(300)
def test_quota_of_models_and_bytes_per_organisation(srv, tiny) -> None:
    # a spark organisation keeps at most two uploaded models (its plan's quota)
    _, spark = make_tenant(srv.api, "spark", permissions=("models", "inference"),
                           name="spark-uploads")
    for name in ("s1", "s2"):
        r = upload(srv, spark["key"], name, form(tiny))
        assert r.status_code == 200, r.text
    r = upload(srv, spark["key"], "s3", form(tiny))
    err = refused(r, 403, "model_quota_exceeded", "2")
    assert err["type"] == "insufficient_quota"
    # refused before the body is read: a full quota answers at once, whatever the size
    r = httpx.post(f"{srv.api}/models", headers={**bearer(spark["key"]),
                   "Content-Type": "multipart/form-data; boundary=xyz"},
                   content=b"--xyz\r\n", timeout=30)
    refused(r, 403, "model_quota_exceeded")
    # deleting one frees its place
    assert httpx.delete(f"{srv.api}/models/s1", headers=bearer(spark["key"])).status_code == 200
    r = upload(srv, spark["key"], "s3", form(tiny))
    assert r.status_code == 200, r.text

    # the server's bytes quota (two and a half tiny models here) holds for every plan
    _, scale = make_tenant(srv.api, "scale", permissions=("models",), name="scale-uploads")
    for name in ("b1", "b2"):
        r = upload(srv, scale["key"], name, form(tiny))
        assert r.status_code == 200, r.text
    r = upload(srv, scale["key"], "b3", form(tiny))
    err = refused(r, 403, "model_storage_quota_exceeded", "bytes")
    assert err["param"] == "file"
    assert "b3" not in [m["id"] for m in httpx.get(f"{srv.api}/models",
                                                   headers=bearer(scale["key"])).json()["data"]]
    alive(srv)


def _multipart(model_id: str, files: dict) -> tuple[dict[str, str], bytes]:
    """The headers and body httpx would send for this upload."""
    request = httpx.Request("POST", "http://x/v1/models", files=files,
                            data={"model_id": model_id, "model_type": "causal-lm"})
    return {"Content-Type": request.headers["Content-Type"]}, request.read()


async def _held_upload(srv, key: str, model_id: str, files: dict, go: asyncio.Event,
                       *, length: bool = True) -> httpx.Response:
    """An upload whose body stops after its first kilobyte until `go` is set: an upload
    under way, as a large one over a slow link is."""
    headers, body = _multipart(model_id, files)
    if length:
        headers["Content-Length"] = str(len(body))

    async def chunks():
        yield body[:1024]
        await go.wait()
        yield body[1024:]

    async with httpx.AsyncClient(timeout=300) as client:
        return await client.post(f"{srv.api}/models", headers={**bearer(key), **headers},
                                 content=chunks())


def _claims(srv, org: str) -> list[dict]:
    return [r for r in database_rows(srv, "model_upload_reservations") if r["org_id"] == org]


def _wait_for_claims(srv, org: str, n: int) -> None:
    wait_until(lambda: _claims(srv, org), lambda rows: len(rows) == n, timeout=60,
               message=lambda rows: f"expected {n} claim(s) of {org}, saw {rows}")


@pytest.mark.timeout(300)
def test_racing_uploads_cannot_both_take_the_last_place(srv, tiny) -> None:
    """The check and the claim are one: while an upload holds the last place of the quota
    (models or bytes), another is refused at once, and whichever way two uploads race, one
    is recorded and the other gets the 403; a failed or abandoned upload frees its place."""
    org, spark = make_tenant(srv.api, "spark", permissions=("models", "inference"),
                             name="racing")
    key = spark["key"]
    assert upload(srv, key, "r1", form(tiny)).status_code == 200  # one place of two left

    async def held_then_other(held: str, other: str, **kw) -> tuple[httpx.Response, ...]:
        go = asyncio.Event()
        first = asyncio.create_task(_held_upload(srv, key, held, form(tiny), go, **kw))
        await asyncio.to_thread(_wait_for_claims, srv, org, 1)  # it holds the last place
        second = await asyncio.to_thread(upload, srv, key, other, form(tiny))
        go.set()
        return await first, second

    # 1. an upload under way holds the last place: the next one is refused before its body
    first, second = asyncio.run(held_then_other("r2", "r3"))
    err = refused(second, 403, "model_quota_exceeded", "1 upload(s) under way")
    assert err["type"] == "insufficient_quota"
    assert first.status_code == 200, first.text
    assert not _claims(srv, org)  # recorded: the claim became the model

    # 2. two uploads sent together for the last place: exactly one is recorded
    assert httpx.delete(f"{srv.api}/models/r2", headers=bearer(key)).status_code == 200

    async def together() -> list[httpx.Response]:
        return await asyncio.gather(*(asyncio.to_thread(upload, srv, key, name, form(tiny))
                                      for name in ("c1", "c2")))

    results = asyncio.run(together())
    assert sorted(r.status_code for r in results) == [200, 403], [r.text for r in results]
    loser = next(r for r in results if r.status_code == 403)
    assert loser.json()["error"]["type"] == "insufficient_quota"
    listed = {m["id"] for m in httpx.get(f"{srv.api}/models", headers=bearer(key)).json()["data"]}
    assert len({"c1", "c2"} & listed) == 1, listed
    winner = ({"c1", "c2"} & listed).pop()

    # 3. failed and abandoned uploads free their place: a refused model...
    assert httpx.delete(f"{srv.api}/models/{winner}", headers=bearer(key)).status_code == 200
    bad = json.loads((tiny / "config.json").read_text()) | {"num_hidden_layers": 50_000_000}
    refused(upload(srv, key, "bad", form(tiny, config=bad)), 400, "invalid_config")
    assert not _claims(srv, org)

    # ...and a client that goes away mid-body (the claim was held while it sent)
    async def abandoned() -> None:
        go = asyncio.Event()
        task = asyncio.create_task(_held_upload(srv, key, "gone", form(tiny), go))
        await asyncio.to_thread(_wait_for_claims, srv, org, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(abandoned())
    _wait_for_claims(srv, org, 0)
    r = upload(srv, key, "after", form(tiny))
    assert r.status_code == 200, r.text

    # 4. bytes: a scale organisation with room for one and a half more tiny models (the
    # server's bytes quota here); an upload under way without a Content-Length holds every
    # byte left, one with it holds its length: either way the other does not fit
    org_b, scale = make_tenant(srv.api, "scale", permissions=("models",), name="racing-bytes")
    key = scale["key"]
    assert upload(srv, key, "b1", form(tiny)).status_code == 200
    for n, length in enumerate((True, False)):
        async def held_bytes() -> tuple[httpx.Response, httpx.Response]:
            go = asyncio.Event()
            first = asyncio.create_task(_held_upload(srv, key, f"held{n}", form(tiny), go,
                                                     length=length))
            await asyncio.to_thread(_wait_for_claims, srv, org_b, 1)
            second = await asyncio.to_thread(upload, srv, key, f"other{n}", form(tiny))
            go.set()
            return await first, second

        first, second = asyncio.run(held_bytes())
        refused(second, 403, "model_storage_quota_exceeded")
        assert first.status_code == 200, first.text
        assert httpx.delete(f"{srv.api}/models/held{n}", headers=bearer(key)).status_code == 200
    alive(srv)
