"""The `ember serve` / `python -m ember.launch_server` command line and the launch helpers (no model)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from ember.cli import build_parser, check_server_args, parse_serve_args
from ember.server_args import ServerArgs
from ember.utils import _normalize_base_url, _split_command, launch_server_cmd, terminate_process

SGLANG_FLAGS = ["--model-path", "--served-model-name", "--host", "--port", "--api-key", "--tp-size", "--ep-size",
                "--dp-size", "--mem-fraction-static", "--context-length", "--max-running-requests",
                "--chunked-prefill-size", "--dtype", "--tool-call-parser", "--reasoning-parser",
                "--speculative-algorithm", "--speculative-num-steps", "--speculative-eagle-topk",
                "--speculative-num-draft-tokens", "--enable-multi-layer-eagle", "--max-queued-requests",
                "--trust-remote-code", "--disable-cuda-graph", "--log-level", "--chat-template"]


def test_help_documents_every_flag():
    r = subprocess.run([sys.executable, "-m", "ember.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    for f in dataclasses.fields(ServerArgs):
        assert "--" + f.name.replace("_", "-") in r.stdout
    for flag in SGLANG_FLAGS:
        assert flag in r.stdout


def test_parse_flags_into_server_args():
    args, given = parse_serve_args([
        "--model-path", "m", "--served-model-name", "s", "--host", "0.0.0.0", "--port", "8000", "--api-key", "k",
        "--mem-fraction-static", "0.7", "--context-length", "4096", "--max-running-requests", "8",
        "--chunked-prefill-size", "512", "--dtype", "float32", "--tool-call-parser", "qwen25",
        "--reasoning-parser", "qwen3", "--max-queued-requests", "3", "--trust-remote-code",
        "--disable-cuda-graph", "--log-level", "WARNING", "--chat-template", "chatml"])
    assert args == ServerArgs(model_path="m", served_model_name="s", host="0.0.0.0", port=8000, api_key="k",
                              mem_fraction_static=0.7, context_length=4096, max_running_requests=8,
                              chunked_prefill_size=512, dtype="float32", tool_call_parser="qwen25",
                              reasoning_parser="qwen3", max_queued_requests=3, trust_remote_code=True,
                              disable_cuda_graph=True, log_level="warning", chat_template="chatml")
    assert "mem_fraction_static" in given and "page_size" not in given
    assert check_server_args(args, given) == []
    # the positional model of `ember serve MODEL`
    ns = build_parser().parse_args(["serve", "smollm2-135m", "--port", "1234"])
    assert ns.model == "smollm2-135m" and ns.port == 1234


def test_unimplemented_flags_are_errors():
    # tree drafts (topk > 1) are served; the draft token count must fit the tree's candidates (SGLang's topk needs it)
    assert check_server_args(ServerArgs(speculative_algorithm="EAGLE", speculative_eagle_topk=2)) == []
    errors = check_server_args(ServerArgs(speculative_algorithm="EAGLE", speculative_num_steps=1, speculative_eagle_topk=2,
                                          speculative_num_draft_tokens=5))
    assert any("--speculative-num-draft-tokens 5 exceeds the tree's candidates plus the root (3" in e for e in errors), errors
    # seed 000's speculative flags as written are accepted (SGLang's constraints hold)
    assert check_server_args(ServerArgs(speculative_algorithm="EAGLE", speculative_num_steps=3, speculative_eagle_topk=1,
                                        speculative_num_draft_tokens=4, enable_multi_layer_eagle=True)) == []
    for bad, needle in ((ServerArgs(speculative_algorithm="STANDALONE"), "needs --speculative-draft-model-path"),
                        (ServerArgs(speculative_algorithm="MEDUSA"), "--speculative-algorithm must be one of"),
                        (ServerArgs(speculative_num_steps=3), "--speculative-num-steps needs --speculative-algorithm"),
                        (ServerArgs(speculative_algorithm="NGRAM", speculative_num_draft_tokens=1), ">= 2"),
                        (ServerArgs(speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=0),
                         "--speculative-ngram-max-bfs-breadth must be >= 1"),
                        (ServerArgs(speculative_algorithm="NGRAM", speculative_ngram_min_match_window_size=5,
                                    speculative_ngram_max_match_window_size=2), "1 <= min <= max")):
        assert any(needle in e for e in check_server_args(bad)), (bad, check_server_args(bad))


SEED_000_TP4 = ("--model-path /models/Step-3.5-Flash --host 0.0.0.0 --port 8000 --tp-size 4 --tool-call-parser step3 "
                "--reasoning-parser step3 --trust-remote-code --mem-fraction-static 0.8 --disable-cuda-graph")
SEED_001_TP8 = ("--model-path /models/GLM-4.7-Flash --host 0.0.0.0 --port 8000 --tp-size 8 --ep-size 8 "
                "--tool-call-parser glm47 --reasoning-parser glm45 --mem-fraction-static 0.8 "
                "--served-model-name glm-4.7-flash --trust-remote-code")


def test_seed_parallel_flags_parse():
    """Seeds 000 and 001 launch with --tp-size 4|8 and --ep-size 8, and their EAGLE flags."""
    args, given = parse_serve_args(SEED_000_TP4.split())
    assert (args.tp_size, args.ep_size, args.trust_remote_code, args.mem_fraction_static) == (4, 1, True, 0.8)
    assert check_server_args(args, given) == []
    args, given = parse_serve_args(SEED_001_TP8.split())
    assert (args.tp_size, args.ep_size) == (8, 8) and check_server_args(args, given) == []
    # with the seeds' speculative flags too: accepted (speculation is skipped with a warning at tp > 1 for now)
    spec = (" --speculative-algorithm EAGLE --speculative-num-steps 3 --speculative-eagle-topk 1 "
            "--speculative-num-draft-tokens 4 --enable-multi-layer-eagle")
    for cmd in (SEED_000_TP4, SEED_001_TP8):
        args, given = parse_serve_args((cmd + spec).split())
        assert check_server_args(args, given) == [] and args.tp_size > 1
    args, given = parse_serve_args("--tp-size 2 --nnodes 2 --node-rank 1 --dist-init-addr 10.0.0.1:5000 "
                                   "--base-gpu-id 2".split())
    assert (args.nnodes, args.node_rank, args.dist_init_addr, args.base_gpu_id) == (2, 1, "10.0.0.1:5000", 2)
    assert check_server_args(args, given) == []
    for bad, needle in ((ServerArgs(tp_size=4, ep_size=3), "--ep-size 3 must divide --tp-size 4"),
                        (ServerArgs(tp_size=2, nnodes=2), "--dist-init-addr"),
                        (ServerArgs(tp_size=3, nnodes=2, dist_init_addr="h:1"), "--nnodes 2 must divide"),
                        (ServerArgs(node_rank=1), "--node-rank must be in 0..0")):
        assert any(needle in e for e in check_server_args(bad)), (bad, check_server_args(bad))


@pytest.mark.parametrize("flags, needle", [
    (["--tp-size", "4", "--ep-size", "8"], "--ep-size 8 must divide --tp-size 4"),
    (["--dp-size", "0"], "--dp-size must be >= 1"),
    (["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "1", "--speculative-eagle-topk", "4",
      "--speculative-num-draft-tokens", "8"], "--speculative-num-draft-tokens 8 exceeds the tree's candidates"),
    (["--enable-multi-layer-eagle"], "--enable-multi-layer-eagle needs --speculative-algorithm"),
    (["--tool-call-parser", "nope"], "--tool-call-parser 'nope'"),
    (["--reasoning-parser", "nope"], "--reasoning-parser 'nope'"),
    (["--chat-template", "/no/such/template.jinja"], "--chat-template"),
])
def test_unimplemented_flags_fail_at_start(flags, needle):
    r = subprocess.run([sys.executable, "-m", "ember.cli", "serve", *flags], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert needle in r.stderr, r.stderr


def test_launch_server_cmd_port_handling(tmp_path):
    script = tmp_path / "echo_args.py"
    script.write_text("import sys, time; print(sys.argv[1:], flush=True); time.sleep(30)")
    # port given: replaces the command's own --port
    proc, port = launch_server_cmd(f"python {script} --host 0.0.0.0 --port 8000", port=8123)
    try:
        assert port == 8123
        assert proc.args[-2:] == ["--port", "8123"] or "8123" in proc.args
        assert "8000" not in proc.args and proc.args[0] == sys.executable
    finally:
        terminate_process(proc)
    assert proc.poll() is not None
    # no port: a free one is appended
    proc, port = launch_server_cmd(f"python3 {script} \\\n --log-level warning")
    try:
        assert proc.args[-2:] == ["--port", str(port)] and port > 0
        assert "\\" not in " ".join(proc.args)
    finally:
        terminate_process(proc)
    # no port argument but the command has one: it is used
    proc, port = launch_server_cmd(f"python {script} --port 8124")
    try:
        assert port == 8124
    finally:
        terminate_process(proc)


def test_split_and_normalize():
    assert _split_command("python3 -m x \\\n --a b")[1:] == ["-m", "x", "--a", "b"]
    assert _normalize_base_url("https://:8000") == "http://127.0.0.1:8000"
    assert _normalize_base_url("http://0.0.0.0:8000/") == "http://127.0.0.1:8000"
    assert _normalize_base_url("http://localhost:30000") == "http://localhost:30000"


def test_messages_for_the_template():
    from ember.frontend.tokenizer_manager import PromptError, normalize_messages
    msgs = normalize_messages([
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok", "name": None},
    ])
    assert msgs[0] == {"role": "system", "content": "a\nb"}
    assert msgs[1]["content"] == "" and msgs[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert "name" not in msgs[2]
    with pytest.raises(PromptError, match="image_url"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}])


def test_forced_tool_output():
    from ember.frontend.output_processor import ForcedToolOutput, forced_tool_schema
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert forced_tool_schema(tools, "f") == {"type": "object"}
    assert forced_tool_schema(tools, None)["minItems"] == 1 and "maxItems" not in forced_tool_schema(tools, None)
    assert forced_tool_schema(tools, None, parallel=False)["maxItems"] == 1  # parallel_tool_calls=false
    o = ForcedToolOutput(None)
    o.feed('[{"name": "f", "parameters": {"a": 1}}]')
    d = o.finish()
    assert [c.name for c in d.tool_calls] == ["f"] and o.tool_calls[0]["arguments"] == '{"a": 1}'
    o = ForcedToolOutput("f")
    first = o.feed('{"a"')
    o.feed(": 1}")
    o.finish()
    assert first.tool_calls[0].name == "f" and first.tool_calls[0].id
    assert o.tool_calls[0]["arguments"] == '{"a": 1}'
