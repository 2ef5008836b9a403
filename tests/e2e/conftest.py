"""Real servers for end-to-end tests: one subprocess per (model, flags) per test session, on a free
127.0.0.1 port, reused by every test that asks for it, stopped (whole process tree) at the end."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ember.utils import get_free_port, terminate_process

START_TIMEOUT_S = float(os.environ.get("EMBER_E2E_START_TIMEOUT", "900"))
# A small KV pool per server: several servers (and other tests) share a small CI machine.
COMMON_FLAGS = ["--log-level", "info", "--cpu-kv-cache-gb", "0.5"]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def openai(self, **kw):
        import openai
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "EMPTY", max_retries=0,
                             timeout=kw.pop("timeout", 300), **kw)

    def async_openai(self, **kw):
        import openai
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "EMPTY", max_retries=0,
                                  timeout=kw.pop("timeout", 300), **kw)

    def stats(self) -> dict:
        import requests
        r = requests.get(f"{self.base_url}/get_server_info", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()["engine_stats"]

    def assert_alive(self) -> None:
        import requests
        assert self.proc.poll() is None, f"server died:\n{self.log()[-4000:]}"
        assert requests.get(f"{self.base_url}/health", timeout=30).status_code == 200


def _server_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_test_process() -> None:
    """In the server child: get SIGTERM from the kernel if the test process dies (no stray servers)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def start_server(args: list[str], log_dir: Path, name: str, api_key: str | None = None,
                 env: dict | None = None) -> Server:
    """Start `python -m ember.launch_server ARGS` and wait for /health; raises with the log on failure.
    `env`: extra environment variables (e.g. the engine's test hooks)."""
    import requests
    port = get_free_port()
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "ember.launch_server", *args, *COMMON_FLAGS, "--host", "127.0.0.1",
           "--port", str(port)]
    if api_key:
        cmd += ["--api-key", api_key]
    log = open(log_path, "w")
    # ember's data directory (default file storage) per server, not the user's home
    env = {"EMBER_DATA_DIR": str(log_dir / f"{name}-data"), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**_server_env(), **env},
                            start_new_session=True,
                            preexec_fn=_die_with_test_process)
    server = Server(proc, port, log_path, api_key)
    server.extra["data_dir"] = Path(env["EMBER_DATA_DIR"])
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {name} exited with {proc.returncode}:\n{server.log()[-6000:]}")
        try:
            if requests.get(f"{server.base_url}/health", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    terminate_process(proc)
    raise RuntimeError(f"server {name} not ready after {START_TIMEOUT_S}s:\n{server.log()[-6000:]}")


class _Servers:
    """Session registry: one server per key, started on first use, all stopped at session end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.servers: dict[str, Server] = {}
        self.failed: dict[str, str] = {}

    def get(self, key: str, args: list[str], api_key: str | None = None) -> Server:
        if key in self.failed:
            pytest.fail(f"server {key} failed to start earlier:\n{self.failed[key]}")
        if key not in self.servers:
            try:
                self.servers[key] = start_server(args, self.log_dir, key, api_key)
            except RuntimeError as e:
                self.failed[key] = str(e)
                raise
        return self.servers[key]

    def stop(self, key: str) -> None:
        server = self.servers.pop(key, None)
        if server is not None:
            terminate_process(server.proc)

    def stop_all(self) -> None:
        for key in list(self.servers):
            self.stop(key)


_REGISTRY: list[_Servers] = []


@pytest.fixture(scope="session")
def e2e_servers(tmp_path_factory):
    reg = _Servers(tmp_path_factory.mktemp("e2e-logs"))
    _REGISTRY.append(reg)
    yield reg
    reg.stop_all()
    _REGISTRY.remove(reg)


_E2E_DIR = Path(__file__).parent
# server fixture -> registry key
SERVER_FIXTURES = {"smollm2_server": "smollm2", "smollm2_special_server": "smollm2-special",
                   "smollm2_think_server": "smollm2-think", "qwen_server": "qwen",
                   "smollm2_files_server": "smollm2-files"}
_LAST_USER: dict[str, str] = {}  # registry key -> nodeid of the last test that uses it


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        for fixture, key in SERVER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                _LAST_USER[key] = item.nodeid


def pytest_runtest_teardown(item, nextitem):
    """Stop each server after the last test that uses it, and all of them when the run leaves
    tests/e2e: they hold memory that other tests (and other servers) need."""
    leaving = nextitem is None or _E2E_DIR not in Path(str(nextitem.fspath)).parents
    for reg in _REGISTRY:
        if leaving:
            reg.stop_all()
            continue
        for key, nodeid in _LAST_USER.items():
            if nodeid == item.nodeid:
                reg.stop(key)


def _model_arg(request, fixture: str, alias: str) -> str:
    """The model dir from the shared fixture (tests/conftest.py) when there is one, else the alias."""
    try:
        return str(request.getfixturevalue(fixture))
    except pytest.FixtureLookupError:
        return alias


@pytest.fixture(scope="session")
def smollm2_model(request) -> str:
    return _model_arg(request, "smollm2_dir", "smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_server(e2e_servers, smollm2_model) -> Server:
    """SmolLM2-135M-Instruct, default flags (served name = the model path)."""
    return e2e_servers.get("smollm2", ["--model-path", smollm2_model, "--served-model-name", "smollm2"])


CUSTOM_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}### assistant:{% endif %}")


@pytest.fixture(scope="session")
def smollm2_special_server(e2e_servers, smollm2_model, tmp_path_factory) -> Server:
    """SmolLM2 with the flags the default server does not use: an API key, a tiny queue (one running,
    one waiting, the rest get 503), a reasoning parser, and a chat template from a file."""
    template = tmp_path_factory.mktemp("template") / "template.jinja"
    template.write_text(CUSTOM_TEMPLATE)
    server = e2e_servers.get("smollm2-special", [
        "--model-path", smollm2_model, "--max-running-requests", "1", "--max-queued-requests", "1",
        "--reasoning-parser", "deepseek-r1", "--chat-template", str(template)], api_key="sk-ember-test")
    server.extra["template"] = CUSTOM_TEMPLATE
    return server


# ChatML whose assistant turn opens a thinking block, like Step-3.5's template (no switch to turn it off)
THINK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


@pytest.fixture(scope="session")
def smollm2_think_server(e2e_servers, smollm2_model, tmp_path_factory) -> Server:
    """SmolLM2 as a thinking model: the template opens `<think>` and --reasoning-parser qwen3-thinking."""
    template = tmp_path_factory.mktemp("think-template") / "think.jinja"
    template.write_text(THINK_TEMPLATE)
    return e2e_servers.get("smollm2-think", ["--model-path", smollm2_model, "--reasoning-parser", "qwen3-thinking",
                                             "--chat-template", str(template)])


FILES_MAX_BYTES = 64 * 1024


@pytest.fixture(scope="session")
def smollm2_files_server(e2e_servers, smollm2_model, tmp_path_factory) -> Server:
    """SmolLM2 with a Files API directory of its own (the test reads it), a small upload limit
    (--file-max-bytes 64 KiB) and an API key."""
    storage = tmp_path_factory.mktemp("files")
    server = e2e_servers.get("smollm2-files", [
        "--model-path", smollm2_model, "--file-storage-path", str(storage),
        "--file-max-bytes", str(FILES_MAX_BYTES)], api_key="sk-ember-files")
    server.extra.update(storage=storage, max_bytes=FILES_MAX_BYTES)
    return server


@pytest.fixture(scope="session")
def qwen_server(e2e_servers) -> Server:
    """The bundled default model (Qwen2.5-Coder-0.5B-Instruct): no --model-path, as a user starts it, with
    the seed deployments' --tool-call-parser (qwen25, the parser the model type gets by default too)."""
    return e2e_servers.get("qwen", ["--tool-call-parser", "qwen25"])
