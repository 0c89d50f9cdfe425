"""An organisation's uploads stay within a quota of models and bytes (issue 15, finding 5),
counted in the database: the one part of test_upload_limits.py that the PostgreSQL pass runs."""

from __future__ import annotations

import httpx
import pytest

from conftest import bearer, make_tenant
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
