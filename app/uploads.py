"""Multipart uploads streamed straight into the blob store.

Starlette's form parser would spool the whole body before the route runs; this
reads the request stream chunk by chunk, hashes and writes the `file` part to a
pending blob as it arrives, and stops at the size limit instead of after it.
"""
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import (
    MultipartParser,
    MultipartState,
    parse_options_header,
)
from starlette.requests import ClientDisconnect

from app.problems import Problem
from store.blobs import BlobStore, PendingBlob, TooLarge
from store.errors import RejectedInput

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_FIELD_BYTES = 1024 * 1024
MAX_FIELDS = 16  # every form this API takes has fewer
MAX_FIELDS_TOTAL_BYTES = 2 * MAX_FIELD_BYTES
# Boundaries and part headers (python-multipart takes at most 8 headers of 4 KiB a part) and what trails the closing
# boundary: the body may exceed the file and the fields by this.
FRAMING_BYTES = (MAX_FIELDS + 1) * 64 * 1024


# Pending files of the uploads this process is receiving or ingesting. uvicorn cancels the requests still
# running when its graceful shutdown times out, then re-raises the signal, which ends the process before a
# cancelled request's cleanup can run: the app's shutdown drops these files instead.
_in_flight: set[PendingBlob] = set()


def discard_uploads_in_flight() -> int:
    """Remove the pending file of every upload still in flight; returns how many there were."""
    blobs = list(_in_flight)
    for blob in blobs:
        blob.discard()
    _in_flight.clear()
    return len(blobs)


@dataclass
class Upload:
    """Text fields of the form, and the `file` part as a finished pending blob (or None)."""

    fields: dict[str, str] = field(default_factory=dict)
    file: PendingBlob | None = None
    filename: str = ""

    def discard(self) -> None:
        if self.file is not None:
            self.file.discard()
            _in_flight.discard(self.file)


def _too_large(limit: int) -> Problem:
    return Problem(413, f"The upload is larger than the limit of {limit} bytes.", slug="too-large")


async def receive_upload(request: Request, blobs: BlobStore, max_bytes: int) -> Upload:
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise Problem(415, "Send multipart/form-data with a `file` part.", slug="unsupported-media-type")
    max_body_bytes = max_bytes + MAX_FIELDS_TOTAL_BYTES + FRAMING_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise _too_large(max_bytes)

    upload = Upload()
    part: dict[str, Any] = {}
    text_parts = {"count": 0, "bytes": 0}  # text fields are held in memory: bounded in number and bytes
    header_field, header_value = bytearray(), bytearray()

    def on_part_begin() -> None:
        part.clear()
        part["headers"] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        part["headers"][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition"))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        part["name"] = name
        if name == "file" and b"filename" in disposition:
            if upload.file is not None:
                raise Problem(422, "Send exactly one `file` part.", slug="validation")
            upload.filename = disposition[b"filename"].decode("utf-8", "replace")
            upload.file = blobs.pending(max_bytes)
            _in_flight.add(upload.file)
            part["sink"] = upload.file
        else:
            text_parts["count"] += 1
            if text_parts["count"] > MAX_FIELDS:
                raise Problem(413, f"More than {MAX_FIELDS} form fields.", slug="too-large")
            part["buffer"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if "sink" in part:
            part["sink"].write(data[start:end])
        else:
            part["buffer"].extend(data[start:end])
            text_parts["bytes"] += end - start
            if len(part["buffer"]) > MAX_FIELD_BYTES:
                raise Problem(413, f"Form field {part['name']!r} is over {MAX_FIELD_BYTES} bytes.", slug="too-large")
            if text_parts["bytes"] > MAX_FIELDS_TOTAL_BYTES:
                raise Problem(413, f"The form fields hold more than {MAX_FIELDS_TOTAL_BYTES} bytes.",
                              slug="too-large")

    def on_part_end() -> None:
        if "buffer" in part:
            try:
                upload.fields[part["name"]] = part["buffer"].decode("utf-8")
            except UnicodeDecodeError:
                raise Problem(422, f"Form field {part['name']!r} is not UTF-8 text.", slug="validation") from None

    callbacks = {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    }
    received = 0
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body_bytes:  # past the file, the fields and their framing (a chunked body has no length)
                raise TooLarge
            parser.write(chunk)
        parser.finalize()
        if parser.state != MultipartState.END:
            raise FormParserError("the body ends before the closing boundary")
        if upload.file is not None:
            upload.file.finish()
    except TooLarge:
        upload.discard()
        raise _too_large(max_bytes) from None
    except FormParserError as exc:  # MultipartParseError and a boundary the parser refuses (over 256 bytes)
        upload.discard()
        raise Problem(400, f"Malformed multipart body: {exc}", slug="malformed-body") from None
    except ClientDisconnect:
        # Nobody is left to answer: a 4xx keeps it out of the unhandled-error log (the send is dropped).
        upload.discard()
        log.info("the client went away during its upload; its partial file was dropped")
        raise Problem(400, "The client disconnected before the body was complete.",
                      slug="client-disconnected") from None
    except BaseException:
        upload.discard()
        raise
    return upload


async def ingest_upload(request: Request, blobs: BlobStore, max_bytes: int, ingest: Callable[[Upload], T],
                        admit: Callable[[int], None] | None = None) -> T:
    """Stream the upload in, run ingest on it in a thread, and always remove what ingest did not keep.

    admit(1), when given, runs before the body is read: an owner with no room left is refused
    without streaming anything.
    """
    if admit is not None:
        await run_in_threadpool(admit, 1)
    upload = await receive_upload(request, blobs, max_bytes)
    try:
        return await run_in_threadpool(ingest, upload)
    except RejectedInput as exc:
        raise Problem(exc.status, exc.detail, title=exc.title, slug=exc.slug) from None
    finally:
        upload.discard()


def multipart_body(properties: dict[str, dict], required: list[str]) -> dict[str, Any]:
    """OpenAPI requestBody for a streamed multipart route (FastAPI cannot infer it from Request)."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": required}}}}}


FILE_PROPERTY = {"type": "string", "format": "binary"}
