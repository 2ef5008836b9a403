"""Uploaded files for the OpenAI Files API (`/v1/files`), kept on disk.

One directory holds per file its bytes (`<id>`) and a JSON sidecar of metadata (`<id>.json`), so a
restarted server lists the same files and `stepfile://` ids keep working. The directory is
`--file-storage-path`, by default `files/` under ember's data directory: `$EMBER_DATA_DIR`, else
`$XDG_DATA_HOME/ember`, else `~/.local/share/ember` (`default_file_storage_path`). Uploads are written to `.<id>.part` as they arrive and renamed when complete; nothing
here holds a whole file in memory. No FastAPI here: the routes live in files_routes.py, and other code
(image / video inputs) turns a reference into bytes with `resolve_file_reference`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("ember.files")

# Every purpose the OpenAI API knows (uploads and outputs), plus StepFun's "storage" (seed 004).
PURPOSES = ("assistants", "assistants_output", "batch", "batch_output", "fine-tune", "fine-tune-results",
            "vision", "user_data", "evals", "storage")
STEPFILE_SCHEME = "stepfile://"
_FILE_ID = re.compile(r"file-[A-Za-z0-9_-]{1,64}")
DEFAULT_CONTENT_TYPE = "application/octet-stream"


def ember_data_dir() -> Path:
    """Where ember keeps data that outlives a server (uploaded files)."""
    if os.environ.get("EMBER_DATA_DIR"):
        return Path(os.environ["EMBER_DATA_DIR"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "ember"


def default_file_storage_path() -> Path:
    return ember_data_dir() / "files"


class FileTooLarge(Exception):
    pass


class FileNotFound(LookupError):
    pass


@dataclass
class StoredFile:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    content_type: str
    path: Path
    created_ns: int = 0  # for a stable order among files created in the same second

    def to_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": None}

    def sidecar(self) -> dict:
        return {**self.to_openai(), "content_type": self.content_type, "created_ns": self.created_ns}

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


def parse_file_reference(ref: str) -> str | None:
    """The file id in `stepfile://<id>` or a bare `file-…` id; None if `ref` is neither."""
    if not isinstance(ref, str):
        return None
    ref = ref.strip()
    if ref.startswith(STEPFILE_SCHEME):
        ref = ref[len(STEPFILE_SCHEME):].strip("/")
    elif not ref.startswith("file-"):
        return None
    return ref if _FILE_ID.fullmatch(ref) else None


def is_file_reference(ref: str) -> bool:
    """True for `stepfile://…` and bare `file-…` references (to be answered from the store)."""
    return isinstance(ref, str) and (ref.strip().startswith(STEPFILE_SCHEME) or parse_file_reference(ref) is not None)


def resolve_file_reference(store: "FileStore", ref: str) -> StoredFile:
    """The stored file a reference names; FileNotFound (a LookupError) for a bad reference or unknown id."""
    file_id = parse_file_reference(ref)
    if file_id is None:
        raise FileNotFound(f"not a file reference: {ref!r} (expected stepfile://<file id> or a file-… id)")
    stored = store.get(file_id)
    if stored is None:
        raise FileNotFound(f"no such file: {file_id}")
    return stored


def read_file_reference(store: "FileStore", ref: str) -> tuple[bytes, str]:
    """(bytes, content type) of the file a `stepfile://<id>` or `file-…` reference names."""
    stored = resolve_file_reference(store, ref)
    return stored.read_bytes(), stored.content_type


def guess_content_type(filename: str, given: str | None) -> str:
    """The upload's own content type unless it is missing or generic; else a guess from the name."""
    given = (given or "").split(";")[0].strip().lower()
    if given and given != DEFAULT_CONTENT_TYPE:
        return given
    import mimetypes
    return mimetypes.guess_type(filename)[0] or DEFAULT_CONTENT_TYPE


class Upload:
    """One upload in progress: bytes go to `.<id>.part` in the store; commit() publishes the file."""

    def __init__(self, store: "FileStore", filename: str, content_type: str | None):
        self.store = store
        self.id = "file-" + secrets.token_hex(12)
        self.filename = filename
        self.content_type = content_type
        self.size = 0
        self.tmp_path = store.root / f".{self.id}.part"
        self._f = open(self.tmp_path, "wb")

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.store.max_bytes:
            raise FileTooLarge(f"the file is larger than the limit of {self.store.max_bytes} bytes")
        self._f.write(data)
        self.size += len(data)

    def commit(self, purpose: str) -> StoredFile:
        self._f.close()
        now_ns = time.time_ns()
        stored = StoredFile(id=self.id, bytes=self.size, created_at=now_ns // 1_000_000_000,
                            filename=self.filename, purpose=purpose,
                            content_type=guess_content_type(self.filename, self.content_type),
                            path=self.store.root / self.id, created_ns=now_ns)
        os.replace(self.tmp_path, stored.path)
        try:
            self.store._add(stored)
        except BaseException:
            stored.path.unlink(missing_ok=True)
            raise
        return stored

    def discard(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


class FileStore:
    """The files of one directory. Blocking file I/O: the routes call it from a worker thread."""

    def __init__(self, root: str | os.PathLike | None, max_bytes: int):
        self.max_bytes = max_bytes
        self.root = Path(root if root is not None else default_file_storage_path()).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, StoredFile] = {}
        self._load()

    def _load(self) -> None:
        for part in self.root.glob(".file-*.part"):  # uploads cut short by a stop
            part.unlink(missing_ok=True)
        for sidecar in self.root.glob("file-*.json"):
            try:
                meta = json.loads(sidecar.read_text())
                file_id = meta["id"]
                path = self.root / file_id
                if not _FILE_ID.fullmatch(file_id) or sidecar.name != f"{file_id}.json" or not path.is_file():
                    raise ValueError("no data file beside it")
                stored = StoredFile(id=file_id, bytes=path.stat().st_size, created_at=int(meta["created_at"]),
                                    filename=str(meta.get("filename") or file_id), purpose=str(meta["purpose"]),
                                    content_type=str(meta.get("content_type") or DEFAULT_CONTENT_TYPE),
                                    path=path, created_ns=int(meta.get("created_ns") or meta["created_at"] * 10**9))
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("ignoring file metadata %s: %s", sidecar, e)
                continue
            self._files[stored.id] = stored

    def new_upload(self, filename: str, content_type: str | None = None) -> Upload:
        return Upload(self, filename, content_type)

    def _add(self, stored: StoredFile) -> None:
        sidecar = self.root / f"{stored.id}.json"
        tmp = self.root / f".{stored.id}.json.part"
        tmp.write_text(json.dumps(stored.sidecar()))
        os.replace(tmp, sidecar)
        self._files[stored.id] = stored

    def get(self, file_id: str) -> StoredFile | None:
        return self._files.get(file_id)

    def list(self, purpose: str | None = None) -> list[StoredFile]:
        """Files in creation order (oldest first), optionally of one purpose."""
        files = sorted(self._files.values(), key=lambda f: (f.created_ns, f.id))
        return [f for f in files if purpose is None or f.purpose == purpose]

    def delete(self, file_id: str) -> bool:
        stored = self._files.pop(file_id, None)
        if stored is None:
            return False
        (self.root / f"{file_id}.json").unlink(missing_ok=True)
        stored.path.unlink(missing_ok=True)
        return True

