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


def test_bad_uploads_are_400(smollm2_server):
    url = f"{smollm2_server.base_url}/v1/files"
    cases = [
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
    again.close()
    assert root.is_dir()  # a given directory stays

    temp = FileStore(None, max_bytes=10)
    assert temp.temporary and temp.root.is_dir()
    up = temp.new_upload("a.txt")
    up.write(b"hi")
    up.commit("storage")
    temp.close()
    assert not temp.root.exists()  # a temporary one is removed


def test_temporary_store_goes_when_the_app_stops():
    """Without --file-storage-path the files live in a temporary directory that the server's shutdown
    (the files router's lifespan) removes; the routes run here in-process, without a model."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ember.api.files_routes import router
    from ember.server_args import ServerArgs

    app = FastAPI()
    app.state.ember = SimpleNamespace(args=ServerArgs(file_max_bytes=1000))
    app.include_router(router)
    with TestClient(app) as client:
        r = client.post("/v1/files", files={"file": ("a.txt", b"hello"), "purpose": (None, "storage")})
        assert r.status_code == 200, r.text
        root = app.state.file_store.root
        assert app.state.file_store.temporary and (root / r.json()["id"]).read_bytes() == b"hello"
    assert not root.exists()
