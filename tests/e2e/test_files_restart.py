"""Files outlive the server on the default storage (no --file-storage-path): a file uploaded before a
restart is listed, downloadable and resolvable as stepfile://<id> afterwards."""
from __future__ import annotations

from ember.api.file_store import FileStore, read_file_reference
from ember.utils import terminate_process
from tests.e2e.conftest import start_server


def test_restart_keeps_files_on_the_default_storage(tmp_path, monkeypatch):
    data_dir = tmp_path / "ember-data"
    env = {"EMBER_DATA_DIR": str(data_dir)}  # ember's data directory, as ~/.local/share/ember would be
    payload = b"kept across restarts\x00\xff" * 100
    first = start_server(["--model-path", "smollm2-135m"], tmp_path, "files-before", env=env)
    try:
        f = first.openai().files.create(file=("notes.bin", payload), purpose="storage")
    finally:
        terminate_process(first.proc)
    assert first.proc.returncode == 0

    second = start_server(["--model-path", "smollm2-135m"], tmp_path, "files-after", env=env)
    try:
        client = second.openai()
        assert f.id in [x.id for x in client.files.list()]
        assert client.files.retrieve(f.id).model_dump() == f.model_dump()
        assert client.files.content(f.id).content == payload
        monkeypatch.setenv("EMBER_DATA_DIR", str(data_dir))  # the resolver on the same default storage
        assert read_file_reference(FileStore(None, 1 << 20), f"stepfile://{f.id}")[0] == payload
        client.files.delete(f.id)
    finally:
        terminate_process(second.proc)
