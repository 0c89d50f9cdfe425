"""/v1/files: uploads streamed to disk and validated, scoped to the caller's organisation."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ADMIN_KEY, RunningServer, make_tenant, start_server, stop_server
from ftdata import duck_examples, write_jsonl

LIMIT = 200_000


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    s = start_server(tmp_path_factory.mktemp("files"), "--parallel", "2", "--no-worker",
                     env={"BASTION_MAX_FILE_BYTES": str(LIMIT)})
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def sdk(srv: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.api, api_key=ADMIN_KEY, max_retries=0)


def leftovers(srv: RunningServer) -> list[Path]:
    partial = srv.data_dir / "files" / ".partial"
    return list(partial.iterdir()) if partial.exists() else []


def test_upload_list_retrieve_download_delete(sdk: openai.OpenAI, tmp_path: Path,
                                              srv: RunningServer) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", duck_examples(10))
    created = sdk.files.create(file=open(path, "rb"), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (
        path.stat().st_size, "train.jsonl", "fine-tune", "processed")
    assert created.id in [f.id for f in sdk.files.list().data]
    assert created.id in [f.id for f in sdk.files.list(purpose="fine-tune").data]
    assert created.id not in [f.id for f in sdk.files.list(purpose="batch").data]
    assert sdk.files.retrieve(created.id) == created
    assert sdk.files.content(created.id).content == path.read_bytes()
    stored = srv.data_dir / "files"
    assert any(p.name == created.id for p in stored.rglob("file-*"))
    deleted = sdk.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted is True
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.files.retrieve(created.id)
    assert exc.value.body["code"] == "file_not_found"
    assert not any(p.name == created.id for p in stored.rglob("file-*"))
    assert leftovers(srv) == []


def test_prompt_completion_format(sdk: openai.OpenAI, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4"},
                                               {"prompt": "3+3=", "completion": " 6"}])
    assert sdk.files.create(file=open(path, "rb"), purpose="fine-tune").bytes == path.stat().st_size


def test_list_pagination(sdk: openai.OpenAI, tmp_path: Path) -> None:
    org, key = make_tenant(sdk.base_url.__str__().rstrip("/"), permissions=("training",))
    own = openai.OpenAI(base_url=str(sdk.base_url), api_key=key["key"], max_retries=0)
    path = write_jsonl(tmp_path / "t.jsonl", duck_examples(2))
    ids = [own.files.create(file=open(path, "rb"), purpose="fine-tune").id for _ in range(3)]
    first = own.files.list(limit=2)
    assert [f.id for f in first.data] == ids[::-1][:2] and first.has_more
    rest = own.files.list(limit=2, after=first.data[-1].id)
    assert [f.id for f in rest.data] == ids[:1] and not rest.has_more
    assert [f.id for f in own.files.list(order="asc").data] == ids


LONG = "word " * 3000
BAD = [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     '{"messages": [\n', "line 2: invalid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"text": "hello"}\n', "line 2: missing 'messages'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: no assistant message"),
    ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
     "line 1: messages[0] has unknown role 'wizard'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
     '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
     + json.dumps({"messages": [{"role": "user", "content": LONG},
                                {"role": "assistant", "content": "ok"}]}) + "\n",
     "line 3: the example is 30"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
     '{"prompt": "a", "completion": "b"}\n', "line 2: the line is in prompt_completion format"),
    ('[1, 2]\n', "line 1: each line must be a JSON object"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n',
     "line 1: messages[0].content must be a string"),
    ('\n\n', "it contains no examples"),
]


@pytest.mark.parametrize("content,problem", BAD)
def test_bad_training_file(sdk: openai.OpenAI, srv: RunningServer, tmp_path: Path,
                           content: str, problem: str) -> None:
    before = [f.id for f in sdk.files.list().data]
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.files.create(file=open(path, "rb"), purpose="fine-tune")
    body = exc.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == "file"
    assert body["code"] == "invalid_file_format"
    assert problem in body["message"], body["message"]
    assert [f.id for f in sdk.files.list().data] == before
    assert leftovers(srv) == []


def test_too_long_names_the_limit(sdk: openai.OpenAI, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": [
        {"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}]}])
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.files.create(file=open(path, "rb"), purpose="fine-tune")
    assert ("too long for the base model 'gemma-3-270m', which takes at most 2048 tokens"
            in exc.value.body["message"])


def test_other_purposes_are_stored_unvalidated(sdk: openai.OpenAI, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not json at all")
    assert sdk.files.create(file=open(path, "rb"), purpose="batch").purpose == "batch"


def test_size_limit_is_413(srv: RunningServer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "big.jsonl", duck_examples(96) * 20)
    assert path.stat().st_size > LIMIT
    before = httpx.get(f"{srv.api}/files", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    sdk = openai.OpenAI(base_url=srv.api, api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as exc:
        sdk.files.create(file=open(path, "rb"), purpose="fine-tune")
    assert exc.value.status_code == 413
    assert exc.value.body["type"] == "invalid_request_error"
    assert str(LIMIT) in exc.value.body["message"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        data = path.read_bytes()
        boundary = b"xyzzy"
        yield (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
               b"fine-tune\r\n--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
               b'filename="big.jsonl"\r\n\r\n')
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]
        yield b"\r\n--" + boundary + b"--\r\n"

    r = httpx.post(f"{srv.api}/files", content=chunks(),
                   headers={"Authorization": f"Bearer {ADMIN_KEY}",
                            "Content-Type": "multipart/form-data; boundary=xyzzy"})
    assert r.status_code == 413, r.text
    after = httpx.get(f"{srv.api}/files", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert after == before
    assert leftovers(srv) == []


@pytest.mark.parametrize("fields,param", [({}, "purpose"), ({"purpose": "fun"}, "purpose"),
                                          ({"purpose": "fine-tune", "nofile": True}, "file")])
def test_bad_form(srv: RunningServer, fields: dict, param: str) -> None:
    files = None if fields.pop("nofile", False) else {"file": ("a.jsonl", b"{}")}
    r = httpx.post(f"{srv.api}/files", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                   data=fields, files=files or {"other": ("x", b"")})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_json_body_is_refused(srv: RunningServer) -> None:
    r = httpx.post(f"{srv.api}/files", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                   json={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"


def test_files_are_private_to_their_organisation(sdk: openai.OpenAI, srv: RunningServer,
                                                 tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", duck_examples(3))
    mine = sdk.files.create(file=open(path, "rb"), purpose="fine-tune")
    _, key = make_tenant(srv.api, permissions=("training",))
    other = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
    assert mine.id not in [f.id for f in other.files.list().data]
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError) as exc:
            call(mine.id)
        assert exc.value.body == {"message": f"No such File object: {mine.id}",
                                  "type": "invalid_request_error", "code": "file_not_found",
                                  "param": "file_id"}
    assert sdk.files.retrieve(mine.id).id == mine.id


def test_training_permission_is_required(srv: RunningServer, tmp_path: Path) -> None:
    _, key = make_tenant(srv.api, permissions=("inference",))
    client = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.files.create(file=open(write_jsonl(tmp_path / "t.jsonl", duck_examples(2)), "rb"),
                            purpose="fine-tune")
    assert "'training'" in exc.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError):
        client.files.list()


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"xyzzy") -> bytes:
    """A raw multipart body of (headers, data) parts, so a test can send what a client
    library would refuse to build."""
    out = b""
    for headers, data in parts:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def text_field(name: str, value: bytes) -> tuple[bytes, bytes]:
    return f'Content-Disposition: form-data; name="{name}"'.encode(), value


def post_raw(srv: RunningServer, body: bytes) -> httpx.Response:
    """Streamed without a Content-Length, so only the parser's own counting can refuse it."""
    def chunks():
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    return httpx.post(f"{srv.api}/files", content=chunks(), timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}",
                               "Content-Type": "multipart/form-data; boundary=xyzzy"})


@pytest.mark.parametrize("case,parts,fragment", [
    ("many-fields", [text_field(f"f{i}", b"v") for i in range(2000)], "more than 64 parts"),
    ("fields-in-total", [text_field(f"f{i}", b"v" * 60_000) for i in range(3)],
     "text fields are over 131072 bytes together"),
    ("fat-headers", [(b'Content-Disposition: form-data; name="purpose"'
                      + b"".join(b"\r\nX-Pad-%d: " % i + b"p" * 4000 for i in range(5)),
                      b"fine-tune")], "headers are over 16384 bytes"),
])
def test_multipart_memory_is_bounded(srv: RunningServer, case: str, parts: list,
                                     fragment: str) -> None:
    """Text fields and part headers are held in memory: their count and bytes are capped
    (each case is under the upload's size limit, so only these caps can refuse it)."""
    body = multipart(parts + [(b'Content-Disposition: form-data; name="file"; '
                               b'filename="a.jsonl"', b"{}")])
    assert len(body) < LIMIT * 2
    r = post_raw(srv, body)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and fragment in err["message"], err
    assert leftovers(srv) == []


def test_header_bytes_count_toward_the_upload_limit(srv: RunningServer) -> None:
    """Many parts with fat headers but tiny data used to pass any byte count."""
    pad = b"".join(b"\r\nX-Pad-%d: " % i + b"p" * 3900 for i in range(4))
    parts = [(b'Content-Disposition: form-data; name="f%d"' % i + pad, b"") for i in range(60)]
    r = post_raw(srv, multipart(parts))
    assert r.status_code == 413, r.text
    assert f"limit of {LIMIT} bytes" in r.json()["error"]["message"]


def test_one_field_over_its_cap(srv: RunningServer) -> None:
    r = post_raw(srv, multipart([text_field("purpose", b"x" * 70_000)]))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "purpose"
