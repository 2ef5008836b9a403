"""The OpenAI Files API: POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content.

Uploads are parsed as they stream in (python-multipart's push parser) and written straight to the store's
directory, so a file of --file-max-bytes never sits in memory; past the limit the rest of the body is read
and dropped and the answer is 413. Parsing and writing run on a worker thread, about 1 MiB at a time, so
a large upload does not stall the event loop that streams tokens to other clients. Any failure (bad
multipart, a client gone mid-upload, a full disk) removes the partial file. Storage: file_store.py.
"""
from __future__ import annotations

import errno
import logging
import re
from urllib.parse import unquote

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.requests import ClientDisconnect

from ember.api.errors import APIError
from ember.api.file_store import PURPOSES, FileStore, FileTooLarge, StoredFile, Upload

logger = logging.getLogger("ember.files")


router = APIRouter()

WRITE_BATCH_BYTES = 1 << 20  # body chunks handed to the worker thread together
MAX_FIELD_BYTES = 64 * 1024  # all text fields of one upload together (purpose, expires_after, ...)
_FILENAME_STAR = re.compile(rb"filename\*\s*=\s*([A-Za-z0-9_-]+)'[^']*'([^;\s]+)", re.I)


def file_store(app) -> FileStore:
    """The server's file store, created on first use (--file-storage-path, or ember's data directory)."""
    store = getattr(app.state, "file_store", None)
    if store is None:
        args = app.state.ember.args
        try:
            store = FileStore(args.file_storage_path, args.file_max_bytes)
        except OSError as e:
            raise APIError(f"The file storage directory cannot be used: {e}", 500) from e
        app.state.file_store = store
        logger.info("file storage: %s", store.root)
    return store


def _get(request: Request, file_id: str) -> StoredFile:
    stored = file_store(request.app).get(file_id)
    if stored is None:
        raise APIError(f"No such File object: {file_id}", 404, "id")
    return stored


class _FormError(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class _UploadForm:
    """python-multipart callbacks: the part named `file` streams into an Upload, other parts are short
    text fields."""

    def __init__(self, store: FileStore, boundary: bytes):
        import python_multipart
        self.store = store
        self.upload: Upload | None = None
        self.fields: dict[str, str] = {}
        self._field_bytes = 0
        self._headers: dict[bytes, bytes] = {}
        self._name = self._value = b""
        self._part_name: str | None = None
        self._part_data = bytearray()
        self._in_file = False
        self.parser = python_multipart.MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data_cb,
            "on_part_end": self._part_end, "on_end": self._end})
        self.ended = False

    def write(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def discard(self) -> None:
        if self.upload is not None:
            self.upload.discard()
            self.upload = None

    # callbacks
    def _part_begin(self) -> None:
        self._headers = {}
        self._part_name = None
        self._part_data = bytearray()
        self._in_file = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.strip().lower()] = self._value.strip()
        self._name = self._value = b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header
        disposition = self._headers.get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise _FormError("A multipart part has no name in its Content-Disposition header.")
        self._part_name = options[b"name"].decode("utf-8", "replace")
        if self._part_name != "file":
            return
        if self.upload is not None:
            raise _FormError("Send one file per request.", "file")
        if not options.get(b"filename") and not _FILENAME_STAR.search(disposition):
            raise _FormError("The `file` part has no filename in its Content-Disposition header.", "file")
        self._in_file = True
        self.upload = self.store.new_upload(_filename(disposition, options),
                                            self._headers.get(b"content-type", b"").decode("latin-1"))

    def _part_data_cb(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.upload.write(data[start:end])
            return
        self._field_bytes += end - start
        if self._field_bytes > MAX_FIELD_BYTES:
            raise _FormError(f"The form fields besides `file` are longer than {MAX_FIELD_BYTES} bytes.")
        self._part_data += data[start:end]

    def _part_end(self) -> None:
        if not self._in_file and self._part_name is not None:
            self.fields[self._part_name] = self._part_data.decode("utf-8", "replace")
        self._in_file = False

    def _end(self) -> None:
        self.ended = True


def _filename(disposition: bytes, options: dict) -> str:
    m = _FILENAME_STAR.search(disposition)
    if m:  # RFC 5987: filename*=UTF-8''%C3%A9t%C3%A9.png
        name = unquote(m.group(2).decode("latin-1"), encoding=m.group(1).decode() or "utf-8", errors="replace")
    else:
        name = options.get(b"filename", b"").decode("utf-8", "replace")
        # browsers and httpx escape these three in a quoted filename (HTML5 form encoding)
        name = name.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
    name = re.split(r"[/\\]", name)[-1].strip()
    return name or "file"


@router.post("/v1/files")
async def create_file(request: Request):
    from python_multipart.multipart import parse_options_header
    store = file_store(request.app)
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise APIError("Upload a file as multipart/form-data with a `file` part and a `purpose` field.", 400, "file")
    form = _UploadForm(store, params[b"boundary"])
    error: Exception | None = None

    def write(data: bytes) -> Exception | None:
        try:
            form.write(data)
        except Exception as e:  # noqa: BLE001 - FileTooLarge, _FormError, OSError, the parser's own errors
            return e
        return None

    pending, size = [], 0
    try:
        # After an error the rest of the body is still read (and dropped), so the client gets the answer
        # instead of a broken connection while it is still sending.
        async for chunk in request.stream():
            if error is None and chunk:
                pending.append(chunk)
                size += len(chunk)
                if size >= WRITE_BATCH_BYTES:
                    error = await to_thread.run_sync(write, b"".join(pending))
                    pending, size = [], 0
        if error is None and pending:
            error = await to_thread.run_sync(write, b"".join(pending))
        if error is None and not form.ended:
            error = _FormError("The multipart body is incomplete (no closing boundary).", "file")
    except ClientDisconnect:  # the client went away: drop the partial file (nobody reads an answer)
        await to_thread.run_sync(form.discard)
        raise APIError("The client disconnected during the upload.", 400, "file") from None
    except BaseException:
        form.discard()
        raise
    if error is not None:
        await to_thread.run_sync(form.discard)
    if isinstance(error, FileTooLarge):
        raise APIError(f"File too large: the limit is {store.max_bytes} bytes (--file-max-bytes).", 413, "file")
    if isinstance(error, _FormError):
        raise APIError(error.message, 400, error.param)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        logger.error("could not store an upload in %s: %s", store.root, error)
        raise APIError(f"Not enough storage for the file: {error.strerror}. Try a smaller file or later.", 413,
                       "file")
    if isinstance(error, OSError):
        logger.error("could not store an upload in %s: %s", store.root, error)
        raise APIError(f"Could not store the file: {error}", 500)
    if error is not None:
        raise APIError(f"Invalid multipart body: {error}", 400, "file")
    try:
        purpose = form.fields.get("purpose", "").strip()
        if form.upload is None:
            raise APIError("Missing required parameter: 'file'.", 400, "file")
        if not purpose:
            raise APIError("Missing required parameter: 'purpose'.", 400, "purpose")
        if purpose not in PURPOSES:
            raise APIError(f"Invalid value for 'purpose': {purpose!r}. Supported values are: "
                           f"{', '.join(repr(p) for p in PURPOSES)}.", 400, "purpose")
        if form.upload.size == 0:
            raise APIError("File is empty.", 400, "file")
        stored = await to_thread.run_sync(form.upload.commit, purpose)
    except OSError as e:
        await to_thread.run_sync(form.discard)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise APIError(f"Not enough storage for the file: {e.strerror}.", 413, "file") from e
        raise APIError(f"Could not store the file: {e}", 500) from e
    except BaseException:
        form.discard()
        raise
    return stored.to_openai()


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None, limit: int = 10000, order: str = "desc",
                     after: str | None = None):
    if not 1 <= limit <= 10000:
        raise APIError(f"Invalid value for 'limit': {limit} (1 to 10000).", 400, "limit")
    if order not in ("asc", "desc"):
        raise APIError(f"Invalid value for 'order': {order!r} (asc or desc).", 400, "order")
    files = file_store(request.app).list(purpose or None)
    if order == "desc":
        files.reverse()
    if after:
        ids = [f.id for f in files]
        files = files[ids.index(after) + 1:] if after in ids else []
    page = files[:limit]
    return {"object": "list", "data": [f.to_openai() for f in page],
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
            "has_more": len(files) > limit}


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, file_id: str):
    return _get(request, file_id).to_openai()


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str):
    stored = _get(request, file_id)
    return FileResponse(stored.path, media_type=stored.content_type, filename=stored.filename,
                        content_disposition_type="inline")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str):
    if not await to_thread.run_sync(file_store(request.app).delete, file_id):
        raise APIError(f"No such File object: {file_id}", 404, "id")
    return {"id": file_id, "object": "file", "deleted": True}
