"""The memory plan a running server reports in /get_server_info is the one `ember serve --dry-run` prints for the
same model and flags (without loading it)."""
import subprocess
import sys

import requests


def test_server_info_has_the_dry_run_plan(smollm2_server, smollm2_model):
    info = requests.get(f"{smollm2_server.base_url}/get_server_info", timeout=30).json()
    plan = info["engine_stats"]["memory_plan"]
    assert plan["weight_bytes"] > 0 and plan["kv_bytes_per_token"]["full"] > 0
    flags = []  # the server's own flags that size the plan
    for name in ("dtype", "device", "cpu_kv_cache_gb", "max_total_tokens", "page_size", "max_running_requests",
                 "chunked_prefill_size", "context_length"):
        if info.get(name) is not None:
            flags += ["--" + name.replace("_", "-"), str(info[name])]
    dry = subprocess.run([sys.executable, "-m", "ember.cli", "serve", "--model-path", smollm2_model, "--dry-run",
                          *flags], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert f"({plan['weight_bytes']} bytes)" in dry.stdout
    assert f"{plan['kv_bytes_per_token']['full']} bytes/token" in dry.stdout
    assert f"tokens that fit: {plan['kv_tokens']['full']} " in dry.stdout


def test_a_default_server_runs_the_q4_gguf_on_w4a8_and_says_why(smollm2_server):
    """`make serve`-style start, no --quantization: the bundled SmolLM2 is a Q4_1 GGUF, so the CPU path is w4a8
    (issue 12: fast by default), reported by /get_server_info and logged with the reason."""
    info = requests.get(f"{smollm2_server.base_url}/get_server_info", timeout=30).json()
    path = info["engine_stats"]["weights_path"]
    assert path["quantization"] == "w4a8" and "Q4_1 GGUF" in path["reason"], path
    assert "weights: w4a8 (the weights came from a Q4_1 GGUF" in smollm2_server.log_path.read_text()
