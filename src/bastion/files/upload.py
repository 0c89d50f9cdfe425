"""Multipart uploads streamed straight to disk: never held whole in memory, cut off with a 413
as soon as they pass the size limit.

What does stay in memory is bounded too: at most MAX_PARTS parts, each text field at most
MAX_FIELD_BYTES and all of them together at most MAX_FIELDS_BYTES, each part's headers at
most MAX_HEADER_BYTES; header bytes count toward the upload's size limit like data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from bastion.errors import InvalidRequestError, PayloadTooLargeError
from bastion.files.store import BlobStore

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS_BYTES = 128 * 1024  # every text field together (the forms here have a handful)
MAX_PARTS = 64                 # text fields and files together
MAX_HEADER_BYTES = 16 * 1024   # one part's headers


@dataclass
class UploadedFile:
    filename: str
    temp: Path
    size: int = 0


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def discard(self) -> None:
        for f in self.files.values():
            f.temp.unlink(missing_ok=True)


def _disposition(headers: dict[bytes, bytes]) -> tuple[str, str | None]:
    _, opts = parse_options_header(headers.get(b"content-disposition", b""))
    name = opts.get(b"name")
    if name is None:
        raise InvalidRequestError("A multipart part has no name.")
    filename = opts.get(b"filename")
    return name.decode("utf-8", "replace"), (filename.decode("utf-8", "replace")
                                             if filename is not None else None)


async def receive_upload(request: Request, store: BlobStore, limit: int) -> Upload:
    """Parse a multipart/form-data body: text fields into memory (small), file parts into
    temporary files of the blob store. The caller commits or discards the files."""
    ctype, opts = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or b"boundary" not in opts:
        raise InvalidRequestError("This endpoint takes multipart/form-data (a 'file' part and "
                                  "form fields).", code="invalid_content_type")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLargeError(f"The upload is {length} bytes; the limit is {limit} bytes.")

    upload = Upload()
    headers: dict[bytes, bytes] = {}
    header_name = bytearray()
    header_value = bytearray()
    current: dict[str, object] = {}
    sink: list[BinaryIO | None] = [None]
    total = [0]
    parts = [0]
    field_bytes = [0]
    header_bytes = [0]

    def count(n: int) -> None:
        total[0] += n
        if total[0] > limit:
            raise PayloadTooLargeError(f"The upload is larger than the limit of {limit} bytes.")

    def count_header(n: int) -> None:
        count(n)
        header_bytes[0] += n
        if header_bytes[0] > MAX_HEADER_BYTES:
            raise PayloadTooLargeError(f"A multipart part's headers are over "
                                       f"{MAX_HEADER_BYTES} bytes.")

    def on_part_begin() -> None:
        headers.clear()
        current.clear()
        header_bytes[0] = 0
        parts[0] += 1
        if parts[0] > MAX_PARTS:
            raise PayloadTooLargeError(f"The form has more than {MAX_PARTS} parts.")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        count_header(end - start)
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        count_header(end - start)
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        name, filename = _disposition(headers)
        current["name"] = name
        if filename is not None:
            if name in upload.files:
                raise InvalidRequestError(f"The file part '{name}' was sent twice.", param=name)
            part = UploadedFile(filename=filename, temp=store.new_temp())
            upload.files[name] = part
            current["file"] = part
            sink[0] = open(part.temp, "wb")
        else:
            current["value"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        count(len(chunk))
        if "file" in current:
            sink[0].write(chunk)  # type: ignore[union-attr]
            current["file"].size += len(chunk)  # type: ignore[attr-defined]
        else:
            value: bytearray = current["value"]  # type: ignore[assignment]
            value.extend(chunk)
            if len(value) > MAX_FIELD_BYTES:
                raise InvalidRequestError(f"The form field '{current['name']}' is too long.",
                                          param=str(current["name"]))
            field_bytes[0] += len(chunk)
            if field_bytes[0] > MAX_FIELDS_BYTES:
                raise PayloadTooLargeError(f"The form's text fields are over "
                                           f"{MAX_FIELDS_BYTES} bytes together.")

    def on_part_end() -> None:
        if sink[0] is not None:
            sink[0].close()
            sink[0] = None
        elif "value" in current:
            upload.fields[str(current["name"])] = bytes(current["value"]).decode(  # type: ignore[arg-type]
                "utf-8", "replace")

    parser = MultipartParser(opts[b"boundary"], {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except Exception as exc:
        if sink[0] is not None:
            sink[0].close()
        upload.discard()
        if isinstance(exc, (InvalidRequestError, PayloadTooLargeError)):
            raise
        raise InvalidRequestError(f"The multipart body could not be parsed: {exc}",
                                  code="invalid_multipart") from exc
    return upload
