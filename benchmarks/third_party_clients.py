"""Real third-party clients completing a tool call against ember (issue 19, acceptance 5). Run by hand.

Clients (none of them is an ember dependency; they live outside the project's .venv):

- LiteLLM: ``litellm.completion(model="openai/<served name>", api_base=.../v1, tools=[get_weather])``
- LangChain: ``langchain_openai.ChatOpenAI(base_url=.../v1).bind_tools([get_weather]).invoke(...)``
- OpenCode (npm ``opencode-ai``): a temp project dir holding ``opencode.json`` with ember as an
  OpenAI-compatible provider (``"npm": "@ai-sdk/openai-compatible"``, ``baseURL`` = ember), a primary agent
  allowed only the built-in ``read`` tool, and a file ``secret.txt``; ``opencode run --format json`` is asked
  to read the file and say the word in it. It passes when the turn ran the ``read`` tool on that file
  (a ``tool_use`` event, completed) and the model's follow-up request carried the tool result back.

Install the clients once (separate venv and npm prefix)::

    python3 -m venv /tmp/clients-venv && /tmp/clients-venv/bin/pip install litellm langchain-openai
    npm install --prefix /tmp/opencode-prefix opencode-ai
    # opencode installs @ai-sdk/openai-compatible itself (from the npm registry) on its first run

Run (starts ember itself unless --base-url points at a running one)::

    export OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
    .venv/bin/python benchmarks/third_party_clients.py            # all three clients
    .venv/bin/python benchmarks/third_party_clients.py --clients litellm langchain \\
        --base-url http://127.0.0.1:30123                          # against a running server

The server it starts is ``python -m ember.launch_server --tool-call-parser qwen25 --served-model-name qwen
--host 127.0.0.1 --port 30123`` (the bundled Qwen2.5-Coder-0.5B-Instruct, the default model). Every client
talks to ember through a small recording proxy (stdlib, in this process), so the exact HTTP requests and
responses each client sent and got are kept. Temperature 0 everywhere; the model is 0.5B, so the tasks are
single-tool and unambiguous.

Outputs, in benchmarks/results/third_party_clients/: ``<client>.json`` (the client's raw output, the checks,
and the recorded HTTP exchanges) and ``summary.json`` (pass/fail per client, versions, wall time).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "results" / "third_party_clients"
EMBER_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
WEATHER_PROMPT = "What is the weather in Paris right now? Use the get_weather tool."
SYSTEM = "You are a helpful assistant. When a tool result is given, answer the user in one plain sentence using it."
SECRET_WORD = "pelican"

# ----------------------------------------------------------------------------------------------------------
# Child mode: run inside the clients venv (no ember import there).


def _child_litellm(base_url: str, model: str) -> dict:
    import litellm

    resp = litellm.completion(
        model=f"openai/{model}", api_base=f"{base_url}/v1", api_key="sk-ember",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": WEATHER_PROMPT}],
        tools=[WEATHER_TOOL], temperature=0,
        max_tokens=128)
    msg = resp.choices[0].message
    calls = [{"id": c.id, "name": c.function.name, "arguments": json.loads(c.function.arguments)}
             for c in (msg.tool_calls or [])]
    # Second leg: feed the tool result back and get the final answer.
    follow = None
    if calls:
        resp2 = litellm.completion(
            model=f"openai/{model}", api_base=f"{base_url}/v1", api_key="sk-ember", temperature=0, max_tokens=64,
            tools=[WEATHER_TOOL], tool_choice="none",  # the 0.5B model calls the tool again otherwise
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": WEATHER_PROMPT},
                      msg.model_dump() if hasattr(msg, "model_dump") else dict(msg),
                      {"role": "tool", "tool_call_id": calls[0]["id"],
                       "content": json.dumps({"city": "Paris", "temp_c": 18, "sky": "sunny"})}])
        follow = resp2.choices[0].message.content
    return {"version": litellm.version if hasattr(litellm, "version") else _dist_version("litellm"),
            "raw_response": resp.model_dump(), "finish_reason": resp.choices[0].finish_reason,
            "tool_calls": calls, "followup_answer": follow}


def _child_langchain(base_url: str, model: str) -> dict:
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        return json.dumps({"city": city, "temp_c": 18, "sky": "sunny"})

    llm = ChatOpenAI(model=model, base_url=f"{base_url}/v1", api_key="sk-ember", temperature=0, max_tokens=128)
    bound = llm.bind_tools([get_weather])
    msgs = [SystemMessage(SYSTEM), HumanMessage(WEATHER_PROMPT)]
    ai = bound.invoke(msgs)
    calls = [{"id": c["id"], "name": c["name"], "arguments": c["args"]} for c in ai.tool_calls]
    follow = None
    if ai.tool_calls:
        msgs += [ai, ToolMessage(get_weather.invoke(ai.tool_calls[0]["args"]), tool_call_id=ai.tool_calls[0]["id"])]
        # tool_choice "none" on the answer leg: the 0.5B model calls the tool again otherwise
        follow = llm.bind_tools([get_weather], tool_choice="none").invoke(msgs).content
    # Streaming: tool-call chunks must merge into the same call.
    streamed = None
    for chunk in bound.stream([SystemMessage(SYSTEM), HumanMessage(WEATHER_PROMPT)]):
        streamed = chunk if streamed is None else streamed + chunk
    stream_calls = [{"name": c["name"], "arguments": c["args"]} for c in (streamed.tool_calls if streamed else [])]
    return {"version": {"langchain-openai": _dist_version("langchain-openai"),
                        "langchain-core": _dist_version("langchain-core")},
            "raw_response": ai.model_dump(), "invalid_tool_calls": ai.invalid_tool_calls,
            "tool_calls": calls, "stream_tool_calls": stream_calls, "followup_answer": follow}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def child_main(which: str, base_url: str, model: str) -> int:
    fn = {"litellm": _child_litellm, "langchain": _child_langchain}[which]
    try:
        out = {"ok": True, **fn(base_url, model)}
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        import traceback
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    print("@@RESULT@@" + json.dumps(out, default=str))
    return 0


# ----------------------------------------------------------------------------------------------------------
# Recording proxy: forwards to ember and keeps every exchange (request body, status, response body/stream).


class Recorder:
    def __init__(self, upstream: str):
        self.upstream = upstream.replace("http://", "").rstrip("/")
        self.exchanges: list[dict] = []
        self.lock = threading.Lock()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _forward(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                host, _, port = rec.upstream.partition(":")
                conn = http.client.HTTPConnection(host, int(port or 80), timeout=900)
                hdrs = {k: v for k, v in self.headers.items()
                        if k.lower() not in ("host", "content-length", "connection", "accept-encoding")}
                t0 = time.time()
                conn.request(self.command, self.path, body=body, headers=hdrs)
                r = conn.getresponse()
                ex = {"method": self.command, "path": self.path, "request_headers": {
                    k: v for k, v in hdrs.items() if k.lower() in ("content-type", "user-agent", "accept")},
                    "request_body": _maybe_json(body), "status": r.status,
                    "response_headers": dict(r.getheaders())}
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                data = b""
                while True:
                    chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
                    if not chunk:
                        break
                    data += chunk
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                self.close_connection = True
                ex["seconds"] = round(time.time() - t0, 2)
                text = data.decode("utf-8", "replace")
                if "text/event-stream" in (r.getheader("content-type") or ""):
                    ex["response_sse"] = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
                else:
                    ex["response_body"] = _maybe_json(data)
                with rec.lock:
                    rec.exchanges.append(ex)

            do_GET = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _maybe_json(b: bytes):
    try:
        return json.loads(b)
    except Exception:  # noqa: BLE001
        return b.decode("utf-8", "replace")


# ----------------------------------------------------------------------------------------------------------
# Runners (parent side).


def run_python_client(which: str, python: str, rec: Recorder, model: str, timeout: int) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # litellm: no fetch of its cost map from GitHub
    p = subprocess.run([python, __file__, "--child", which, "--base-url", rec.url, "--model", model],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("@@RESULT@@")), None)
    out = json.loads(line[len("@@RESULT@@"):]) if line else {"ok": False, "error": f"no result (rc {p.returncode})"}
    out["stderr_tail"] = p.stderr[-3000:]
    calls = out.get("tool_calls") or []
    checks = {
        "tool_call_returned": bool(calls),
        "name_is_get_weather": bool(calls) and calls[0]["name"] == "get_weather",
        "arguments_parsed_with_city_paris": bool(calls) and isinstance(calls[0]["arguments"], dict)
        and "paris" in str(calls[0]["arguments"].get("city", "")).lower(),
        # the tool result ({"temp_c": 18, "sky": "sunny"}) fed back and used in the answer
        "followup_answer_uses_tool_result": any(w in (out.get("followup_answer") or "").lower()
                                                for w in ("18", "sunny")),
    }
    if which == "litellm":
        checks["finish_reason_tool_calls"] = out.get("finish_reason") == "tool_calls"
    if which == "langchain":
        sc = out.get("stream_tool_calls") or []
        checks["stream_tool_call_merged"] = len(sc) == 1 and sc[0]["name"] == "get_weather" \
            and "paris" in str(sc[0]["arguments"].get("city", "")).lower()
        checks["no_invalid_tool_calls"] = not out.get("invalid_tool_calls")
    out["checks"] = checks
    out["passed"] = bool(out.get("ok")) and all(checks.values())
    return out


def run_opencode(opencode: str, rec: Recorder, model: str, timeout: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ember-opencode-"))
    proj = work / "project"
    home = work / "home"
    proj.mkdir()
    home.mkdir()
    (proj / "secret.txt").write_text(f"The secret word is {SECRET_WORD}.\n")
    config = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {"ember": {
            "npm": "@ai-sdk/openai-compatible", "name": "ember",
            "options": {"baseURL": f"{rec.url}/v1", "apiKey": "sk-ember"},
            "models": {model: {"name": f"ember {model}", "tool_call": True, "temperature": True,
                               "limit": {"context": 32768, "output": 512}}}}},
        "model": f"ember/{model}",
        "small_model": f"ember/{model}",
        "share": "disabled",
        "autoupdate": False,
        "agent": {"reader": {
            "description": "Reads files to answer questions.", "mode": "primary", "temperature": 0,
            "steps": 3,  # after that opencode asks for a text answer (the 0.5B model re-reads the file otherwise)
            "prompt": "You are a helpful assistant working in a project directory. To see a file, call the read "
                      "tool once with its absolute path. When a tool result shows the file's content, do not "
                      "call any tool again: answer the user's question in one short sentence.",
            "tools": {"*": False, "read": True}}},
    }
    (proj / "opencode.json").write_text(json.dumps(config, indent=2))
    # A private HOME/XDG tree: nothing from the user's opencode config or auth, a fresh plugin cache.
    env = {**os.environ, "PWD": str(proj), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_DATA_HOME": str(home / ".local/share"), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_STATE_HOME": str(home / ".local/state"),
           "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1",
           "OPENCODE_DISABLE_SHARE": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
           "OPENCODE_DISABLE_CLAUDE_CODE": "1", "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1"}
    prompt = f"Read the file {proj / 'secret.txt'} and tell me the secret word in it."
    cmd = [opencode, "run", "--model", f"ember/{model}", "--agent", "reader", "--format", "json",
           "--print-logs", "--log-level", "INFO", prompt]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    events = []
    for ln in stdout.splitlines():
        try:
            events.append(json.loads(ln))
        except ValueError:
            events.append({"raw": ln})
    tool_events = [e for e in events if e.get("type") == "tool_use"]
    read_done = [e for e in tool_events
                 if (e.get("part") or {}).get("tool") == "read"
                 and ((e.get("part") or {}).get("state") or {}).get("status") == "completed"]
    text = " ".join(((e.get("part") or {}).get("text") or "") for e in events if e.get("type") == "text")
    chat_reqs = [x for x in rec.exchanges if x["path"].endswith("/chat/completions")]
    tool_result_sent = any(
        isinstance(x.get("request_body"), dict)
        and any(m.get("role") == "tool" for m in x["request_body"].get("messages", [])) for x in chat_reqs)
    checks = {
        "exit_code_0": rc == 0,
        "chat_requests_reached_ember": bool(chat_reqs),
        "no_4xx_5xx_from_ember": all(x["status"] < 400 for x in rec.exchanges),
        "read_tool_completed": bool(read_done),
        "read_tool_on_secret_txt": any("secret.txt" in json.dumps((e["part"]["state"] or {}).get("input"))
                                       for e in read_done),
        "tool_result_sent_back_to_model": tool_result_sent,
    }
    shutil.rmtree(work, ignore_errors=True)
    return {"version": _opencode_version(opencode), "command": cmd, "cwd": str(proj), "opencode.json": config,
            "returncode": rc, "seconds": round(time.time() - t0, 1), "events": events,
            "final_text": text, "mentions_secret_word": SECRET_WORD in text.lower(),
            "stderr_tail": stderr[-12000:], "checks": checks, "passed": all(checks.values())}


def _opencode_version(opencode: str) -> str | None:
    try:
        return subprocess.run([opencode, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def _one_entry_per_index(exchange: dict) -> bool:
    for data in exchange.get("response_sse") or []:
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        for ch in chunk.get("choices") or []:
            idx = [c.get("index") for c in (ch.get("delta") or {}).get("tool_calls") or []]
            if len(idx) != len(set(idx)):
                return False
    return True


def wait_ready(base_url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001
            pass
        time.sleep(3)
    raise TimeoutError(f"ember at {base_url} not ready after {timeout}s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", nargs="+", default=["litellm", "langchain", "opencode"])
    ap.add_argument("--base-url", help="a running ember (else one is started on --port)")
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--model", default="qwen", help="served model name")
    ap.add_argument("--clients-python", default="/tmp/clients-venv/bin/python")
    ap.add_argument("--opencode", default="/tmp/opencode-prefix/node_modules/.bin/opencode")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per client")
    ap.add_argument("--out-dir", default=str(OUT_DIR))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child_main(a.child, a.base_url, a.model)

    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    server = None
    base_url = a.base_url
    server_cmd = None
    if not base_url:
        base_url = f"http://127.0.0.1:{a.port}"
        server_cmd = [str(EMBER_PYTHON), "-m", "ember.launch_server", "--tool-call-parser", "qwen25",
                      "--served-model-name", a.model, "--host", "127.0.0.1", "--port", str(a.port)]
        log = open(out_dir / "ember_server.log", "w")
        server = subprocess.Popen(server_cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"})
    summary = {"base_url": base_url, "server_command": server_cmd, "model": a.model, "clients": {}}
    try:
        wait_ready(base_url, 600)
        for which in a.clients:
            rec = Recorder(base_url)
            t0 = time.time()
            print(f"== {which}", flush=True)
            try:
                if which == "opencode":
                    if not shutil.which(a.opencode):
                        res = {"passed": False, "error": f"opencode not found at {a.opencode}"}
                    else:
                        res = run_opencode(a.opencode, rec, a.model, a.timeout)
                else:
                    res = run_python_client(which, a.clients_python, rec, a.model, a.timeout)
            except Exception as e:  # noqa: BLE001
                res = {"passed": False, "error": f"{type(e).__name__}: {e}"}
            finally:
                rec.close()
            res["http_exchanges"] = rec.exchanges
            # the streamed tool-call shape: one entry per call index in each chunk, as OpenAI sends them
            res.setdefault("checks", {})["sse_one_tool_call_entry_per_index_per_chunk"] = all(
                _one_entry_per_index(x) for x in rec.exchanges)
            res["passed"] = bool(res.get("passed")) and res["checks"]["sse_one_tool_call_entry_per_index_per_chunk"]
            res["wall_seconds"] = round(time.time() - t0, 1)
            (out_dir / f"{which}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
            summary["clients"][which] = {k: res.get(k) for k in ("passed", "checks", "version", "error",
                                                                  "tool_calls", "wall_seconds")}
            summary["clients"][which]["http_statuses"] = [f'{x["method"]} {x["path"]} {x["status"]}'
                                                          for x in rec.exchanges]
            print(json.dumps(summary["clients"][which], indent=1, default=str), flush=True)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    summary["all_passed"] = all(c.get("passed") for c in summary["clients"].values())
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print("all passed" if summary["all_passed"] else "SOME FAILED", flush=True)
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
