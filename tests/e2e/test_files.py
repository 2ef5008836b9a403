"""The OpenAI Files API (/v1/files) on real servers through the official openai SDK, as seed 004 uses it
(`client.files.create(file=open(...), purpose="storage")`, then `stepfile://<id>`), and the file store
with its reference resolver at unit level."""
from __future__ import annotations

import io
import json
import time

import openai
import pytest
import requests
from PIL import Image

from ember.api.file_store import (
    FileNotFound, FileStore, FileTooLarge, is_file_reference, parse_file_reference, read_file_reference,
    resolve_file_reference,
)


def _png(tmp_path, color=(200, 30, 60), size=(24, 16)):
    path = tmp_path / "sample.png"
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------- the default server
def test_create_retrieve_content_delete(smollm2_server):
    client = smollm2_server.openai()
    data = bytes(range(256)) * 7 + b"\x00\r\n--not-a-boundary--\r\n"
    f = client.files.create(file=("blob.bin", data), purpose="user_data")
    assert f.id.startswith("file-") and f.object == "file" and f.status == "processed"
    assert f.bytes == len(data) and f.filename == "blob.bin" and f.purpose == "user_data"
    assert abs(f.created_at - time.time()) < 120

    got = client.files.retrieve(f.id)
    assert got.model_dump() == f.model_dump()
    content = client.files.content(f.id)
    assert content.content == data
    assert content.response.headers["content-type"] == "application/octet-stream"

    deleted = client.files.delete(f.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (f.id, "file", True)
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as e:
            call(f.id)
        assert f.id in e.value.body["message"]
    assert f.id not in [x.id for x in client.files.list()]


def test_png_upload_as_in_seed_004(smollm2_server, tmp_path):
    client = smollm2_server.openai()
    path = _png(tmp_path)
    f = client.files.create(file=open(path, "rb"), purpose="storage")
    assert (f.filename, f.purpose, f.bytes) == ("sample.png", "storage", path.stat().st_size)
    r = requests.get(f"{smollm2_server.base_url}/v1/files/{f.id}/content", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == path.read_bytes()
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (24, 16) and img.getpixel((3, 3)) == (200, 30, 60)
    client.files.delete(f.id)


def test_list_order_purpose_filter_and_pages(smollm2_server):
    client = smollm2_server.openai()
    a = client.files.create(file=("a.txt", b"first"), purpose="batch")
    b = client.files.create(file=("b.txt", b"second"), purpose="assistants")
    c = client.files.create(file=("c.jsonl", b'{"x": 1}\n'), purpose="batch")
    try:
        ids = [x.id for x in client.files.list()]  # newest first, as OpenAI lists
        assert ids.index(c.id) < ids.index(b.id) < ids.index(a.id)
        batch = [x.id for x in client.files.list(purpose="batch")]
        assert c.id in batch and a.id in batch and b.id not in batch
        assert [x.id for x in client.files.list(purpose="batch", order="asc")] == batch[::-1]
        # the SDK pages with limit/after until has_more is false
        page = client.files.list(purpose="batch", limit=1)
        assert len(page.data) == 1 and page.has_more
        assert [x.id for x in page] == batch  # auto-pagination walks every page
        raw = requests.get(f"{smollm2_server.base_url}/v1/files", params={"purpose": "assistants"}, timeout=30).json()
        assert raw["object"] == "list" and b.id in [x["id"] for x in raw["data"]]
        assert raw["has_more"] is False and raw["first_id"] == raw["data"][0]["id"]
    finally:
        for f in (a, b, c):
            client.files.delete(f.id)


def _multipart(*parts: bytes, boundary: bytes = b"xyz") -> dict:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"
    return dict(data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"})


FILE_PART = b'Content-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nabc'
PURPOSE_PART = b'Content-Disposition: form-data; name="purpose"\r\n\r\nstorage'


def _storage_listing(server) -> list[str]:
    root = server.extra["data_dir"] / "files"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_bad_uploads_are_400(smollm2_server):
    url = f"{smollm2_server.base_url}/v1/files"
    before = _storage_listing(smollm2_server)
    cases = [
        (_multipart(FILE_PART, FILE_PART, PURPOSE_PART), "file", "one file per request"),
        (_multipart(b'Content-Disposition: form-data; name="file"\r\n\r\nabc', PURPOSE_PART), "file",
         "no filename"),
        (_multipart(FILE_PART, b'Content-Disposition: form-data; name="notes"\r\n\r\n' + b"n" * 70_000,
                    PURPOSE_PART), None, "form fields"),
        (_multipart(b"Content-Type: text/plain\r\n\r\nabc", PURPOSE_PART), None, "no name"),
        (dict(files={"purpose": (None, "storage")}), "file", "Missing required parameter: 'file'"),
        (dict(files={"file": ("x.txt", b"abc")}), "purpose", "Missing required parameter: 'purpose'"),
        (dict(files={"file": ("x.txt", b"abc"), "purpose": (None, "pictures")}), "purpose", "Invalid value"),
        (dict(files={"file": ("x.txt", b""), "purpose": (None, "storage")}), "file", "File is empty"),
        (dict(json={"file": "abc", "purpose": "storage"}), "file", "multipart/form-data"),
        (dict(data=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc",
              headers={"Content-Type": "multipart/form-data; boundary=xyz"}), "file", "incomplete"),
    ]
    for kwargs, param, message in cases:
        r = requests.post(url, timeout=30, **kwargs)
        assert r.status_code == 400, (kwargs, r.text)
        err = r.json()["error"]
        assert err["param"] == param and message in err["message"], (kwargs, err)
    client = smollm2_server.openai()
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.txt", b"abc"), purpose="not-a-purpose")
    r = requests.get(f"{url}/file-doesnotexist/content", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    assert _storage_listing(smollm2_server) == before  # no partial file of any refused upload


def test_client_gone_mid_upload_leaves_no_partial_file(smollm2_server):
    """A client that sends half of a 4 MiB file part and closes the connection: the partial file is
    removed and the server keeps serving."""
    import socket
    before = _storage_listing(smollm2_server)
    head = (b"--xyz\r\n" + FILE_PART[:-3] + b"x" * (2 << 20))
    with socket.create_connection(("127.0.0.1", smollm2_server.port)) as sock:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=xyz\r\n"
                     + f"Content-Length: {len(head) + (2 << 20)}\r\n\r\n".encode() + head)
        deadline = time.monotonic() + 60  # until the server has created the partial file
        while time.monotonic() < deadline and not any(n.endswith(".part") for n in _storage_listing(smollm2_server)):
            time.sleep(0.05)
        assert any(n.endswith(".part") for n in _storage_listing(smollm2_server)), "the upload never started"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _storage_listing(smollm2_server) != before:
        time.sleep(0.1)
    assert _storage_listing(smollm2_server) == before
    smollm2_server.assert_alive()


# ---------------------------------------------------------------------------- storage path, limit, API key
def test_size_limit_is_413(smollm2_files_server):
    server = smollm2_files_server
    client = server.openai()
    limit = server.extra["max_bytes"]
    ok = client.files.create(file=("exact.bin", b"a" * limit), purpose="storage")
    assert ok.bytes == limit
    for size in (limit + 1, 4 * 1024 * 1024):  # just over, and far over (the rest of the body is dropped)
        with pytest.raises(openai.APIStatusError) as e:
            client.files.create(file=("big.bin", b"b" * size), purpose="storage")
        assert e.value.status_code == 413 and str(limit) in e.value.body["message"]
    server.assert_alive()
    # nothing of the refused uploads is left behind
    assert sorted(p.name for p in server.extra["storage"].iterdir()) == [ok.id, f"{ok.id}.json"]
    assert [x.id for x in client.files.list()] == [ok.id]
    client.files.delete(ok.id)
    assert list(server.extra["storage"].iterdir()) == []


def test_api_key_covers_files(smollm2_files_server):
    url = f"{smollm2_files_server.base_url}/v1/files"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.post(url, files={"file": ("x", b"x"), "purpose": (None, "storage")}, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert requests.get(url, headers=smollm2_files_server.headers, timeout=30).status_code == 200


def test_stepfile_reference_resolves_from_the_storage_path(smollm2_files_server, tmp_path):
    """The seed's flow: upload with purpose="storage", refer to it as stepfile://<id>. The files the server
    wrote (bytes + JSON sidecar) are read back by a fresh FileStore on the same directory, as a restarted
    server reads them."""
    server = smollm2_files_server
    client = server.openai()
    path = _png(tmp_path, color=(10, 120, 250))
    f = client.files.create(file=open(path, "rb"), purpose="storage")
    storage = server.extra["storage"]
    meta = json.loads((storage / f"{f.id}.json").read_text())
    assert meta["id"] == f.id and meta["content_type"] == "image/png"

    store = FileStore(storage, server.extra["max_bytes"])
    assert [x.to_openai() for x in store.list()] == [f.model_dump()]
    data, content_type = read_file_reference(store, f"stepfile://{f.id}")
    assert data == path.read_bytes() and content_type == "image/png"
    assert read_file_reference(store, f.id)[0] == data  # a bare file id
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (10, 120, 250)

    client.files.delete(f.id)
    with pytest.raises(FileNotFound):
        resolve_file_reference(FileStore(storage, 1), f"stepfile://{f.id}")


# ---------------------------------------------------------------------------- unit level: store and resolver
def test_reference_parsing():
    assert parse_file_reference("stepfile://file-abc123") == "file-abc123"
    assert parse_file_reference("file-abc_12-3") == "file-abc_12-3"
    assert parse_file_reference(" stepfile://file-abc/ ") == "file-abc"
    for ref in ("https://example.com/a.png", "data:image/png;base64,AAAA", "stepfile://../etc/passwd",
                "stepfile://file-../../x", "file-", "file-a/b", "abc", "", None):
        assert parse_file_reference(ref) is None, ref
    assert is_file_reference("stepfile://whatever") and is_file_reference("file-abc")
    assert not is_file_reference("https://example.com/file-abc") and not is_file_reference("data:,x")


def test_store_persists_limits_and_cleans_up(tmp_path):
    root = tmp_path / "files"
    store = FileStore(root, max_bytes=10)
    up = store.new_upload("photo.jpg", "application/octet-stream")
    up.write(b"12345")
    up.write(b"67890")
    stored = up.commit("vision")
    assert stored.content_type == "image/jpeg"  # guessed from the name when the upload says octet-stream
    too_big = store.new_upload("big.bin")
    with pytest.raises(FileTooLarge):
        too_big.write(b"x" * 11)
    too_big.discard()
    (root / ".file-cut0short.part").write_bytes(b"partial")  # a stop in the middle of an upload
    (root / "file-orphan.json").write_text('{"id": "file-orphan"}')  # metadata without its data
    again = FileStore(root, max_bytes=10)  # a restart on the same directory
    assert [f.to_openai() for f in again.list()] == [stored.to_openai()]
    assert read_file_reference(again, f"stepfile://{stored.id}") == (b"1234567890", "image/jpeg")
    assert not (root / ".file-cut0short.part").exists()
    assert again.delete(stored.id) and not again.delete(stored.id)
    with pytest.raises(FileNotFound):
        resolve_file_reference(again, stored.id)
    assert root.is_dir()


def test_default_store_is_under_the_data_dir(tmp_path, monkeypatch):
    """Without --file-storage-path files go to files/ under ember's data directory ($EMBER_DATA_DIR, else
    $XDG_DATA_HOME/ember, else ~/.local/share/ember) and stay there for the next store."""
    from ember.api.file_store import default_file_storage_path
    monkeypatch.delenv("EMBER_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_file_storage_path() == tmp_path / "xdg" / "ember" / "files"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_file_storage_path() == tmp_path / "home" / ".local" / "share" / "ember" / "files"
    monkeypatch.setenv("EMBER_DATA_DIR", str(tmp_path / "data"))
    store = FileStore(None, max_bytes=10)
    assert store.root == tmp_path / "data" / "files"
    up = store.new_upload("a.txt")
    up.write(b"hi")
    stored = up.commit("storage")
    assert read_file_reference(FileStore(None, max_bytes=10), f"stepfile://{stored.id}") == (b"hi", "text/plain")


def _files_app(tmp_path, monkeypatch, **args):
    """The files routes in-process (no model), storing under tmp_path/data."""
    from types import SimpleNamespace

    from fastapi import FastAPI

    from ember.api.files_routes import router
    from ember.server_args import ServerArgs

    from ember.api.errors import APIError, error_response

    monkeypatch.setenv("EMBER_DATA_DIR", str(tmp_path / "data"))
    app = FastAPI()
    app.state.ember = SimpleNamespace(args=ServerArgs(**args))
    app.include_router(router)
    app.add_exception_handler(APIError, lambda request, e: error_response(e.message, e.status, e.param))
    return app


def test_default_store_survives_the_app(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    with TestClient(_files_app(tmp_path, monkeypatch, file_max_bytes=1000)) as client:
        r = client.post("/v1/files", files={"file": ("a.txt", b"hello"), "purpose": (None, "storage")})
        assert r.status_code == 200, r.text
    with TestClient(_files_app(tmp_path, monkeypatch, file_max_bytes=1000)) as client:  # a new server
        assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [r.json()["id"]]
        assert client.get(f"/v1/files/{r.json()['id']}/content").content == b"hello"


def test_full_disk_is_413_and_leaves_nothing(tmp_path, monkeypatch):
    """A write that fails with ENOSPC (a full disk) answers 413 and removes the partial file."""
    import errno

    from fastapi.testclient import TestClient

    from ember.api import file_store

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_store.Upload, "write", full)
    with TestClient(_files_app(tmp_path, monkeypatch, file_max_bytes=10**6)) as client:
        r = client.post("/v1/files", files={"file": ("a.txt", b"x" * 5000), "purpose": (None, "storage")})
        assert r.status_code == 413, r.text
        assert "storage" in r.json()["error"]["message"]
        assert list((tmp_path / "data" / "files").iterdir()) == []


# ---------------------------------------------------------------------------- uploads next to streams
def _stream_gaps(server) -> list[float]:
    """Inter-token gaps (s) of one streamed chat completion, the first few (prefill) left out."""
    stamps = []
    with requests.post(f"{server.base_url}/v1/chat/completions", stream=True, timeout=300, json={
            "model": "m", "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 40,
            "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return gaps[3:]


def test_a_100mib_upload_leaves_streams_undisturbed(smollm2_server):
    """While a 100 MiB upload streams in, a concurrent token stream's median inter-token gap stays within
    2x of its gap alone (the upload is parsed and written on a worker thread, not on the event loop)."""
    import statistics
    import threading

    size, chunk = 100 << 20, 1 << 20
    boundary = "soakboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nstorage\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    streaming = threading.Event()
    result = {}

    def body():
        yield head
        block = b"\x01" * chunk
        for i in range(size // chunk - 1):
            yield block
            if streaming.is_set():
                time.sleep(0.05)  # about 20 MiB/s while the stream is measured
        while streaming.is_set():  # the last MiB only once the stream ended: the upload spans all of it
            time.sleep(0.05)
        yield block
        yield tail

    def upload():
        result["r"] = requests.post(f"{smollm2_server.base_url}/v1/files", data=body(), timeout=600, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})

    solo = statistics.median(_stream_gaps(smollm2_server))
    streaming.set()
    t = threading.Thread(target=upload)
    t.start()
    during = statistics.median(_stream_gaps(smollm2_server))
    still_uploading = t.is_alive()
    streaming.clear()
    t.join(600)
    solo_after = statistics.median(_stream_gaps(smollm2_server))
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == size
    requests.delete(f"{smollm2_server.base_url}/v1/files/{r.json()['id']}", timeout=60)
    assert still_uploading, "the upload ended before the stream: nothing was measured"
    assert during <= 2 * max(solo, solo_after), (during, solo, solo_after)
