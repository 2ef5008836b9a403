"""Serving benchmark: an async client for any OpenAI-compatible server (ember, SGLang, vLLM, llama.cpp).

    python -m ember.bench_serving --base-url http://127.0.0.1:30000 --model qwen2.5-coder-0.5b \\
        --dataset-name chat --num-prompts 32 --output-len 128 --max-concurrency 8
    python -m ember.bench_serving --launch "ember serve --model-path smollm2-135m" \\
        --model smollm2-135m --dataset-name random --random-input-len 256 --random-output-len 128

Workloads (all fixed by --seed):
  random         random-token prompts of exact input/output lengths (built with the model's tokenizer;
                 /v1/completions)
  shared-prefix  a shared system prompt + different questions (exercises the prefix cache; /v1/completions)
  chat           the bundled chat prompt set benchmarks/prompts.json (/v1/chat/completions)

Output lengths are forced with max_tokens + ignore_eos + min_tokens (turn off with --no-ignore-eos for
servers that reject them). Requests are streamed; TTFT is the time to the first content chunk, the
inter-token latency (ITL) the gaps between later chunks. Requests arrive as a Poisson process
(--request-rate, default inf: all at once) and/or are capped at --max-concurrency in flight.

`main(argv)` and `add_cli_args(parser)` are what `ember bench` hooks; `run_benchmark(args)` returns
the result dict (also written by --output-json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "add_cli_args", "run_benchmark", "RequestSpec", "RequestOutput", "sample_random_requests",
           "sample_shared_prefix_requests", "sample_chat_requests", "calculate_metrics", "get_tokenizer"]

DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "prompts.json"
PERCENTILES = (50, 90, 99)


# --------------------------------------------------------------------------------------- workloads

@dataclass
class RequestSpec:
    """One request of a workload. `prompt` is text (completions) or a message list (chat)."""
    prompt: str | list[dict[str, str]]
    prompt_len: int
    output_len: int
    api: str = "completions"  # "completions" or "chat"


def get_tokenizer(name_or_path: str):
    """A transformers tokenizer: a bundled ember alias (e.g. qwen2.5-coder-0.5b), a local dir, or a hub id."""
    from transformers import AutoTokenizer

    path = name_or_path
    if not os.path.isdir(path):
        try:
            from ember.loader.bundled import canonical_alias

            if canonical_alias(name_or_path) is not None:
                from ember.loader import resolve_model_dir

                path = str(resolve_model_dir(name_or_path))
        except ImportError:
            pass
    return AutoTokenizer.from_pretrained(path)


_WORDLIKE = re.compile(r"^ [a-zA-Z]{2,}$")


def _safe_vocab(tokenizer) -> list[int]:
    """Token ids that decode to a space + letters (e.g. " house"): text made of them tokenizes back to
    the same ids under byte-level BPE and SentencePiece tokenizers, so prompt lengths come out exact."""
    cache = getattr(tokenizer, "_ember_bench_safe_vocab", None)
    if cache is not None:
        return cache
    special = set(tokenizer.all_special_ids)
    ids = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        s = tokenizer.decode([i])
        if _WORDLIKE.match(s) and tokenizer.encode(s, add_special_tokens=False) == [i]:
            ids.append(i)
    if len(ids) < 100:  # exotic tokenizer: fall back to any non-special token
        ids = [i for i in range(len(tokenizer)) if i not in special]
    try:
        tokenizer._ember_bench_safe_vocab = ids
    except Exception:
        pass
    return ids


def _exact_text(tokenizer, rng: random.Random, vocab: list[int], n: int, prefix_ids: list[int] = ()) -> str:
    """Random text that tokenizes (without special tokens) to exactly n tokens after prefix_ids."""
    target = len(prefix_ids) + n
    prefix = tokenizer.decode(list(prefix_ids)) if prefix_ids else ""
    ids = [rng.choice(vocab) for _ in range(n)]
    for _ in range(20):
        text = tokenizer.decode(ids)
        got = len(tokenizer.encode(prefix + text, add_special_tokens=False))
        if got == target:
            return text
        if got > target:
            ids = ids[: max(0, len(ids) - (got - target))]
        else:
            ids = ids + [rng.choice(vocab) for _ in range(target - got)]
    raise RuntimeError(f"could not build a prompt of exactly {n} tokens with this tokenizer")


def _lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> list[int]:
    """n lengths uniform in [mean * range_ratio, mean] (range_ratio 1: all equal to mean)."""
    lo = max(1, int(mean * range_ratio))
    if lo >= mean:
        return [mean] * n
    return [int(x) for x in rng.integers(lo, mean + 1, size=n)]


def sample_random_requests(tokenizer, num_prompts: int, input_len: int, output_len: int,
                           range_ratio: float = 1.0, seed: int = 1) -> list[RequestSpec]:
    """Random-token prompts of exact lengths (counted without special tokens)."""
    nrng = np.random.default_rng(seed)
    in_lens = _lengths(nrng, input_len, range_ratio, num_prompts)
    out_lens = _lengths(nrng, output_len, range_ratio, num_prompts)
    rng = random.Random(seed)
    vocab = _safe_vocab(tokenizer)
    return [RequestSpec(_exact_text(tokenizer, rng, vocab, il), il, ol, "completions")
            for il, ol in zip(in_lens, out_lens)]


def sample_shared_prefix_requests(tokenizer, num_prompts: int, system_prompt_len: int, question_len: int,
                                  output_len: int, num_groups: int = 1, seed: int = 1) -> list[RequestSpec]:
    """`num_groups` random system prompts of system_prompt_len tokens, each followed by different
    random questions of question_len tokens; requests of the groups are interleaved."""
    rng = random.Random(seed)
    vocab = _safe_vocab(tokenizer)
    systems = [_exact_text(tokenizer, rng, vocab, system_prompt_len) for _ in range(max(1, num_groups))]
    out = []
    for i in range(num_prompts):
        sys_text = systems[i % len(systems)]
        sys_ids = tokenizer.encode(sys_text, add_special_tokens=False)
        q = _exact_text(tokenizer, rng, vocab, question_len, prefix_ids=sys_ids)
        out.append(RequestSpec(sys_text + q, system_prompt_len + question_len, output_len, "completions"))
    return out


def load_chat_prompts(path: str | os.PathLike | None = None) -> list[list[dict[str, str]]]:
    """The bundled chat prompt set: a JSON list of strings (user turns) or of message lists."""
    p = Path(path) if path else DEFAULT_PROMPTS_FILE
    data = json.loads(p.read_text())
    if isinstance(data, dict):
        data = data.get("prompts", [])
    out = []
    for item in data:
        if isinstance(item, str):
            out.append([{"role": "user", "content": item}])
        elif isinstance(item, dict) and "messages" in item:
            out.append(item["messages"])
        elif isinstance(item, dict) and "prompt" in item:
            out.append([{"role": "user", "content": item["prompt"]}])
        else:
            out.append(list(item))
    return out


def chat_prompt_len(tokenizer, messages: list[dict[str, str]]) -> int:
    """Prompt tokens of a chat request after the model's chat template (generation prompt included)."""
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)
    except Exception:
        return sum(len(tokenizer.encode(m.get("content") or "", add_special_tokens=False)) for m in messages)


def sample_chat_requests(tokenizer, num_prompts: int, output_len: int, seed: int = 1,
                         dataset_path: str | None = None) -> list[RequestSpec]:
    """num_prompts chat requests from the prompt set, in a seeded order (cycling when more are asked)."""
    prompts = load_chat_prompts(dataset_path)
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    out = []
    for i in range(num_prompts):
        msgs = prompts[order[i % len(order)]]
        out.append(RequestSpec(msgs, chat_prompt_len(tokenizer, msgs), output_len, "chat"))
    return out


def build_workload(args, tokenizer) -> list[RequestSpec]:
    name = args.dataset_name
    if name == "random":
        reqs = sample_random_requests(tokenizer, args.num_prompts, args.random_input_len,
                                      args.output_len or args.random_output_len, args.random_range_ratio, args.seed)
    elif name == "shared-prefix":
        reqs = sample_shared_prefix_requests(tokenizer, args.num_prompts, args.shared_prefix_len,
                                             args.question_len, args.output_len or args.random_output_len,
                                             args.num_prefix_groups, args.seed)
    elif name == "chat":
        reqs = sample_chat_requests(tokenizer, args.num_prompts, args.output_len or args.random_output_len,
                                    args.seed, args.dataset_path)
    else:
        raise ValueError(f"unknown dataset {name!r}")
    if args.endpoint != "auto":
        for r in reqs:
            if args.endpoint == "chat" and r.api == "completions":
                r.prompt, r.api = [{"role": "user", "content": r.prompt}], "chat"
            elif args.endpoint == "completions" and r.api == "chat":
                r.prompt = tokenizer.apply_chat_template(r.prompt, add_generation_prompt=True, tokenize=False)
                r.api = "completions"
    return reqs


# ---------------------------------------------------------------------------------------- requests

@dataclass
class RequestOutput:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0  # output tokens (server usage if reported, else re-tokenized text)
    expected_output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between content chunks after the first
    start_time: float = 0.0
    generated_text: str = ""
    usage_reported: bool = False
    error: str = ""


def _payload(spec: RequestSpec, args) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.served_model_name or args.model,
        "max_tokens": spec.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.top_p is not None:
        body["top_p"] = args.top_p
    if args.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = spec.output_len
    if spec.api == "chat":
        body["messages"] = spec.prompt
    else:
        body["prompt"] = spec.prompt
    if args.extra_request_body:
        body.update(json.loads(args.extra_request_body))
    return body


async def send_request(client, base_url: str, spec: RequestSpec, args, pbar=None,
                       api_key: str | None = None) -> RequestOutput:
    """Send one streamed request and time it."""
    url = base_url + ("/v1/chat/completions" if spec.api == "chat" else "/v1/completions")
    out = RequestOutput(prompt_len=spec.prompt_len, expected_output_len=spec.output_len)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text_parts: list[str] = []
    st = time.perf_counter()
    out.start_time = st
    last = st
    try:
        async with client.stream("POST", url, json=_payload(spec, args), headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {body[:500]}")
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise RuntimeError(f"server error: {chunk['error']}")
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    out.output_len = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens"):
                        out.prompt_len = int(usage["prompt_tokens"])
                    out.usage_reported = True
                text = ""
                for choice in chunk.get("choices") or []:
                    if spec.api == "chat":
                        delta = choice.get("delta") or {}
                        text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                    else:
                        text += choice.get("text") or ""
                if text:
                    now = time.perf_counter()
                    if not text_parts:
                        out.ttft = now - st
                    else:
                        out.itl.append(now - last)
                    last = now
                    text_parts.append(text)
        out.latency = time.perf_counter() - st
        out.generated_text = "".join(text_parts)
        if not out.usage_reported:
            out.output_len = len(args._tokenizer.encode(out.generated_text, add_special_tokens=False)) \
                if getattr(args, "_tokenizer", None) is not None else len(text_parts)
        out.success = bool(text_parts) or out.output_len > 0
        if not out.success:
            out.error = "empty response"
    except Exception as e:  # noqa: BLE001 - any failure is recorded on the request
        out.latency = time.perf_counter() - st
        out.error = f"{type(e).__name__}: {e}"
    if pbar is not None:
        pbar.update(1)
    return out


async def _request_stream(specs: list[RequestSpec], rate: float, seed: int):
    """Yield the requests spaced by exponential gaps (a Poisson process of `rate` per second)."""
    rng = np.random.default_rng(seed)
    for spec in specs:
        yield spec
        if rate == float("inf"):
            continue
        await asyncio.sleep(float(rng.exponential(1.0 / rate)))


async def _run_requests(base_url: str, specs: list[RequestSpec], args, rate: float, max_concurrency: int | None,
                        show_progress: bool) -> tuple[list[RequestOutput], float]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout, connect=60.0)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    pbar = None
    if show_progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=len(specs), desc="requests", file=sys.stderr)

    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        async def one(spec):
            if sem is None:
                return await send_request(client, base_url, spec, args, pbar, args.api_key)
            async with sem:
                return await send_request(client, base_url, spec, args, pbar, args.api_key)

        start = time.perf_counter()
        tasks = []
        async for spec in _request_stream(specs, rate, args.seed):
            tasks.append(asyncio.create_task(one(spec)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if pbar is not None:
        pbar.close()
    return list(outputs), duration


# ----------------------------------------------------------------------------------------- metrics

def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean/median/p90/p99/std/max of values (seconds) in ms; zeros when empty."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0, "std": 0.0, "max": 0.0}
    a = np.asarray(values, dtype=np.float64) * scale
    return {"mean": float(a.mean()), "median": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "std": float(a.std()), "max": float(a.max())}


def calculate_metrics(outputs: list[RequestOutput], duration: float) -> dict[str, Any]:
    """Aggregate metrics of one run. Latencies in ms; throughputs per second of `duration`.

    TPOT is per request (latency - ttft) / (output_len - 1); ITL pools every chunk gap of every request.
    """
    ok = [o for o in outputs if o.success]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_len for o in ok)
    tpots = [(o.latency - o.ttft) / (o.output_len - 1) for o in ok if o.output_len > 1]
    itls = [g for o in ok for g in o.itl]
    m: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "input_throughput": total_in / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "concurrency": sum(o.latency for o in ok) / duration if duration > 0 else 0.0,
        "output_len_mismatches": sum(1 for o in ok if o.expected_output_len and o.output_len != o.expected_output_len),
    }
    for name, vals in (("ttft", [o.ttft for o in ok]), ("itl", itls), ("tpot", tpots),
                       ("e2e_latency", [o.latency for o in ok])):
        for k, v in _stats(vals).items():
            m[f"{k}_{name}_ms"] = v
    errors = [o.error for o in outputs if not o.success]
    if errors:
        m["errors"] = sorted(set(errors))[:10]
    return m


def format_report(result: dict[str, Any]) -> str:
    m = result["metrics"]
    a = result["args"]
    w = 50
    lines = ["", "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(label, value, fmt="{:<10.2f}"):
        lines.append("{:<38} {}".format(label, fmt.format(value) if isinstance(value, (int, float)) else value))

    row("Backend / base URL:", result["base_url"], "{}")
    row("Dataset:", a["dataset_name"], "{}")
    row("Traffic request rate:", a["request_rate"], "{}")
    row("Max request concurrency:", a["max_concurrency"] if a["max_concurrency"] else "not set", "{}")
    row("Successful requests:", m["completed"], "{:<10}")
    row("Failed requests:", m["failed"], "{:<10}")
    row("Benchmark duration (s):", m["duration_s"])
    row("Total input tokens:", m["total_input_tokens"], "{:<10}")
    row("Total generated tokens:", m["total_output_tokens"], "{:<10}")
    row("Request throughput (req/s):", m["request_throughput"])
    row("Input token throughput (tok/s):", m["input_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_throughput"])
    row("Concurrency:", m["concurrency"])
    if "server_peak_rss_mb" in result:
        row("Server peak RSS (MiB, process tree):", result["server_peak_rss_mb"], "{:<10.0f}")
    for title, key, short in (("End-to-End Latency", "e2e_latency", "E2E Latency"), ("Time to First Token", "ttft", "TTFT"),
                              ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
                              ("Inter-Token Latency", "itl", "ITL")):
        lines.append("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {short} (ms):",
                m[f"{stat}_{key}_ms"])
    if m["output_len_mismatches"]:
        lines.append(f"note: {m['output_len_mismatches']} requests did not produce the requested output length "
                     f"(server ignored ignore_eos/min_tokens?)")
    if m.get("errors"):
        lines.append("errors: " + " | ".join(m["errors"]))
    lines.append("=" * w)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- server & main

class _RssSampler:
    """Samples the resident memory of a process tree (peak of the sum) in a background thread."""

    def __init__(self, pid: int, interval: float = 0.5):
        import threading

        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        try:
            import psutil
        except ImportError:
            return
        while not self._stop.is_set():
            try:
                p = psutil.Process(self.pid)
                procs = [p] + p.children(recursive=True)
                total = 0
                for q in procs:
                    try:
                        total += q.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except Exception:  # noqa: BLE001
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def _launch(cmd: str, port: int | None, log_path: str | None):
    """Start `cmd` with ember.utils.launch_server_cmd, its output going to log_path if given."""
    import shlex
    import shutil

    from ember.utils import launch_server_cmd

    first = shlex.split(cmd)[0] if cmd.strip() else ""
    if first and "/" not in first and shutil.which(first) is None:
        # e.g. "ember serve ..." from a venv that is not activated: use the script beside this interpreter
        beside = Path(sys.executable).parent / first
        if beside.exists():
            cmd = shlex.quote(str(beside)) + cmd.strip()[len(first):]
    if not log_path:
        return launch_server_cmd(cmd, port=port)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            return launch_server_cmd(cmd, port=port)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _wait_healthy(base_url: str, deadline: float, proc=None) -> None:
    """Wait until /health stops answering 503 (a loading model). wait_for_server also accepts a 200 from
    /v1/models, which some servers (ember included) give before the model is loaded."""
    import httpx

    while time.perf_counter() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode} before it was ready")
        try:
            r = httpx.get(base_url + "/health", timeout=5, trust_env=False)
            if r.status_code != 503:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {base_url} still loading at the launch timeout")


def _server_versions(base_url: str, api_key: str | None) -> dict[str, Any]:
    import httpx

    info: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for path in ("/v1/models", "/version", "/props"):
        try:
            r = httpx.get(base_url + path, headers=headers, timeout=5, trust_env=False)
            if r.status_code == 200:
                data = r.json()
                if path == "/v1/models":
                    info["served_models"] = [m.get("id") for m in data.get("data", [])]
                elif path == "/version":
                    info["version"] = data.get("version", data)
                else:
                    info["build_info"] = data.get("build_info")
        except Exception:  # noqa: BLE001
            pass
    return info


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed CLI args; returns the result dict (and writes --output-json)."""
    from ember.utils import terminate_process, wait_for_server

    random.seed(args.seed)
    np.random.seed(args.seed)
    proc = None
    base_url = args.base_url
    port = args.port
    t_launch = time.perf_counter()
    if args.launch:
        proc, port = _launch(args.launch, port, args.launch_log)
        base_url = f"http://{args.host}:{port}"
    if not base_url:
        base_url = f"http://{args.host}:{port or 30000}"
    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    try:
        tokenizer = get_tokenizer(args.tokenizer or args.model)
        args._tokenizer = tokenizer
        specs = build_workload(args, tokenizer)
        if args.launch:
            wait_for_server(base_url, timeout=args.launch_timeout, process=proc, api_key=args.api_key)
            _wait_healthy(base_url, t_launch + args.launch_timeout, proc)
            startup_s = time.perf_counter() - t_launch
        else:
            startup_s = None
        server_info = _server_versions(base_url, args.api_key)
        if not args.served_model_name and not args.model and server_info.get("served_models"):
            args.served_model_name = server_info["served_models"][0]

        rss = _RssSampler(proc.pid) if proc is not None else None
        if rss:
            rss.__enter__()
        try:
            if args.warmup_requests > 0:
                warm = []
                for i in range(args.warmup_requests):
                    s = specs[i % len(specs)]
                    warm.append(RequestSpec(s.prompt, s.prompt_len, min(s.output_len, args.warmup_output_len), s.api))
                print(f"Warm-up: {len(warm)} request(s)...", file=sys.stderr, flush=True)
                wouts, _ = asyncio.run(_run_requests(base_url, warm, args, float("inf"), None, False))
                bad = [o.error for o in wouts if not o.success]
                if bad:
                    raise RuntimeError(f"warm-up request failed: {bad[0]}")
            print(f"Benchmark: {len(specs)} requests, rate {args.request_rate}, "
                  f"max concurrency {args.max_concurrency}", file=sys.stderr, flush=True)
            outputs, duration = asyncio.run(_run_requests(base_url, specs, args, args.request_rate,
                                                          args.max_concurrency, not args.disable_tqdm))
        finally:
            if rss:
                rss.__exit__()
    finally:
        if proc is not None:
            terminate_process(proc)

    metrics = calculate_metrics(outputs, duration)
    saved_args = {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v)
                  for k, v in vars(args).items() if not k.startswith("_") and k != "func"}
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "base_url": base_url,
        "args": saved_args,
        "server": server_info,
        "prompt_len_min": min(s.prompt_len for s in specs),
        "prompt_len_max": max(s.prompt_len for s in specs),
        "metrics": metrics,
    }
    if startup_s is not None:
        result["server_startup_s"] = startup_s
    if rss is not None and rss.peak:
        result["server_peak_rss_mb"] = rss.peak / 2**20
    if args.output_details:
        result["requests"] = [asdict(o) for o in outputs]
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark flags to `parser` (used by `ember bench` and `python -m ember.bench_serving`)."""
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default=None, help="Server URL, e.g. http://127.0.0.1:30000 (default: --host/--port).")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=None, help="Server port (default 30000; with --launch: a free port).")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer token (default $OPENAI_API_KEY).")
    g.add_argument("--model", default=None,
                   help="Model name sent in requests and, unless --tokenizer, used to load the tokenizer "
                        "(an ember alias like qwen2.5-coder-0.5b, a local dir or a hub id).")
    g.add_argument("--served-model-name", default=None, help="Model name sent in requests if not --model.")
    g.add_argument("--tokenizer", default=None, help="Tokenizer to build prompts with (default: --model).")
    g.add_argument("--launch", default=None, metavar="CMD",
                   help="Start this server command first (via ember.utils.launch_server_cmd; --port is added "
                        "or replaced) and stop it after the run.")
    g.add_argument("--launch-timeout", type=float, default=900.0, help="Seconds to wait for a launched server.")
    g.add_argument("--launch-log", default=None, help="Write the launched server's output to this file.")

    w = parser.add_argument_group("workload")
    w.add_argument("--dataset-name", choices=["random", "shared-prefix", "chat"], default="random")
    w.add_argument("--dataset-path", default=None, help="Chat prompt file (default: benchmarks/prompts.json).")
    w.add_argument("--num-prompts", type=int, default=32, help="Number of requests.")
    w.add_argument("--output-len", type=int, default=None,
                   help="Output tokens per request (any workload; overrides --random-output-len).")
    w.add_argument("--random-input-len", type=int, default=256)
    w.add_argument("--random-output-len", type=int, default=128)
    w.add_argument("--random-range-ratio", type=float, default=1.0,
                   help="Lengths are uniform in [len * ratio, len] (1.0: exact lengths).")
    w.add_argument("--shared-prefix-len", type=int, default=1000, help="Tokens of the shared system prompt.")
    w.add_argument("--question-len", type=int, default=32, help="Tokens of each question after the shared prompt.")
    w.add_argument("--num-prefix-groups", type=int, default=1, help="Number of distinct shared system prompts.")
    w.add_argument("--endpoint", choices=["auto", "completions", "chat"], default="auto",
                   help="API to use (auto: chat for the chat workload, completions otherwise).")
    w.add_argument("--seed", type=int, default=1)

    r = parser.add_argument_group("traffic and sampling")
    r.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Requests per second, Poisson arrivals (default inf: all sent at once).")
    r.add_argument("--max-concurrency", type=int, default=None, help="At most this many requests in flight.")
    r.add_argument("--warmup-requests", type=int, default=1, help="Untimed requests sent (together) first.")
    r.add_argument("--warmup-output-len", type=int, default=16, help="Output tokens of each warm-up request.")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-p", type=float, default=None)
    r.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="Force the output length with ignore_eos + min_tokens (default on).")
    r.add_argument("--extra-request-body", default=None, metavar="JSON",
                   help="JSON object merged into every request body.")
    r.add_argument("--request-timeout", type=float, default=3600.0, help="Seconds per request.")

    o = parser.add_argument_group("output")
    o.add_argument("--output-json", default=None, metavar="FILE", help="Write the result (args + metrics) here.")
    o.add_argument("--output-details", action="store_true", help="Include per-request timings in the JSON.")
    o.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="ember bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    """Run with already-parsed args (for a subcommand whose parser got add_cli_args); prints the report."""
    if not args.model and not args.tokenizer:
        try:
            from ember.loader.bundled import DEFAULT_MODEL
            args.model = DEFAULT_MODEL
        except ImportError:
            print("error: --model or --tokenizer is required", file=sys.stderr)
            return 2
    result = run_benchmark(args)
    print(format_report(result))
    return 0 if result["metrics"]["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
