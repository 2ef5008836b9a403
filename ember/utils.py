"""Helpers to start, wait for and stop a server from Python (the same names as SGLang's `sglang.utils`).

    from ember.utils import launch_server_cmd, wait_for_server, terminate_process
    proc, port = launch_server_cmd("python -m ember.launch_server --model-path smollm2-135m")
    wait_for_server(f"http://127.0.0.1:{port}")
    ...
    terminate_process(proc)
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

__all__ = ["launch_server_cmd", "wait_for_server", "terminate_process", "print_highlight", "get_free_port",
           "display_host"]


def display_host(host: str) -> str:
    """The host to show in a URL for a listen address (0.0.0.0 / :: mean this machine)."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1" if host != "::" else "[::1]"
    return f"[{host}]" if ":" in host else host


def get_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_PORT_RE = re.compile(r"(--port)(?:\s+|=)(\d+)")


def _split_command(cmd: str) -> list[str]:
    cmd = cmd.replace("\\\r\n", " ").replace("\\\n", " ")
    parts = shlex.split(cmd)
    # "python"/"python3" means the interpreter running this script (its venv), as a user expects.
    if parts and parts[0] in ("python", "python3"):
        parts[0] = sys.executable
    return parts


def launch_server_cmd(cmd: str, port: int | None = None, host: str | None = None) -> tuple[subprocess.Popen, int]:
    """Start a server command in the background; returns (process, port).

    port None: reuse the command's own `--port N`, or pick a free port and append `--port`.
    port given: it replaces any `--port N` in the command (or is appended).
    The server runs in its own session so `terminate_process` can kill its whole process tree.
    `host` is accepted for compatibility with SGLang's signature (the command's --host applies).
    """
    m = _PORT_RE.search(cmd)
    if port is None:
        if m:
            port = int(m.group(2))
        else:
            port = get_free_port()
            cmd = f"{cmd.rstrip()} --port {port}"
    else:
        if m:
            cmd = _PORT_RE.sub(f"--port {int(port)}", cmd)
        else:
            cmd = f"{cmd.rstrip()} --port {int(port)}"
    parts = _split_command(cmd)
    process = subprocess.Popen(parts, start_new_session=True)
    return process, int(port)


def _normalize_base_url(base_url: str) -> str:
    """Accept `http://:PORT` style URLs (an empty host means this machine)."""
    u = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
    host = u.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    scheme = u.scheme
    if not u.hostname and scheme == "https":
        scheme = "http"  # `https://:PORT` (a rendering of `http://localhost:PORT`)
    netloc = f"[{host}]" if ":" in host else host
    if u.port:
        netloc += f":{u.port}"
    return urlunsplit((scheme, netloc, u.path.rstrip("/"), "", ""))


def wait_for_server(base_url: str, timeout: float | None = None, process: subprocess.Popen | None = None,
                    api_key: str | None = None) -> None:
    """Block until the server at base_url answers /health (or /v1/models) with 200.

    Raises TimeoutError after `timeout` seconds (None: wait forever) and RuntimeError when `process`
    is given and exits first.
    """
    base = _normalize_base_url(base_url)
    if base.endswith("/v1"):
        base = base[:-3]
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key or 'None'}"}
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server process exited with code {process.returncode} before it was ready")
        for path in ("/health", "/v1/models"):
            try:
                req = urllib.request.Request(base + path, headers=headers)
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        print_highlight(
                            "NOTE: Typically, the server runs in a separate terminal.\n"
                            "In this notebook, we run the server and notebook code together, "
                            "so their outputs are combined.")
                        return
            except urllib.error.HTTPError as e:
                if e.code == 503:  # up but still loading the model: not ready, whatever /v1/models says
                    break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"server at {base} did not become ready within {timeout} s")
        time.sleep(0.5)


def _descendants(pid: int) -> list[int]:
    try:
        import psutil
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:
        pass
    # /proc fallback (Linux)
    children: dict[int, list[int]] = {}
    try:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return []
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def terminate_process(process: subprocess.Popen | int, timeout: float = 30.0) -> None:
    """Stop a server and every process it started.

    SIGTERM goes to the server process alone first: an ember server then drains (in-flight requests
    finish, up to its --graceful-shutdown-timeout) and stops its engine itself; signalling the engine
    first would fail those requests. After `timeout` seconds (or once the server exited), whatever is
    left of the tree gets SIGTERM, then SIGKILL.
    """
    pid = process if isinstance(process, int) else process.pid
    pids = [pid] + _descendants(pid)
    pgid = None
    try:
        pgid = os.getpgid(pid)
        if pgid != pid or pgid == os.getpgrp():
            pgid = None  # only kill a group that the server leads (start_new_session)
    except OSError:
        pass

    def wait(targets: list[int], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not isinstance(process, int):
                process.poll()
            if not any(_alive(p) for p in targets):
                return
            time.sleep(0.1)

    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass
    wait([pid], timeout)
    pids = list(dict.fromkeys(pids + (_descendants(pid) if _alive(pid) else [])))
    rest = [p for p in pids if _alive(p)]
    for p in reversed(rest):
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    if rest:
        wait(rest, 5.0)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    if not isinstance(process, int):
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def print_highlight(obj) -> None:
    """Print an object so it stands out from server logs (bold yellow on a terminal)."""
    text = str(obj)
    if sys.stdout.isatty():
        print(f"\033[1m\033[33m{text}\033[0m", flush=True)
    else:
        print(text, flush=True)
