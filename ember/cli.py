"""The `ember` command line: `ember serve ...` (more subcommands, e.g. `bench`, plug in below).

The serve flags are built from the ServerArgs dataclass in one place (`add_server_args`), with SGLang's
flag names; `python -m ember.launch_server` takes the same flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from ember.server_args import ServerArgs

logger = logging.getLogger("ember.cli")

# One help string per ServerArgs field (a test checks that every field has one).
HELP: dict[str, str] = {
    "model_path": "Model to serve: a local directory (HF layout), a .gguf file, a hub id, or a bundled "
                  "alias such as smollm2-135m. Default: the bundled Qwen2.5-Coder-0.5B-Instruct.",
    "served_model_name": "Name listed by /v1/models and reported in responses (default: the model path).",
    "tokenizer_path": "Tokenizer to use if not the model's own.",
    "host": "Host to listen on (0.0.0.0 for all interfaces).",
    "port": "Port to listen on.",
    "api_key": "If set, every route but /health requires `Authorization: Bearer <key>`.",
    "dtype": "Weight and activation dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.",
    "device": "Device to run on: auto, cpu or cuda.",
    "context_length": "Maximum context length (default: from the model config).",
    "mem_fraction_static": "Fraction of GPU memory for weights and KV cache (GPU only).",
    "cpu_kv_cache_gb": "KV cache budget in GiB on CPU.",
    "max_total_tokens": "Cap the KV cache at this many tokens (overrides the memory budgets).",
    "page_size": "Tokens per KV cache page.",
    "max_running_requests": "Maximum number of requests decoding at once.",
    "max_queued_requests": "Maximum number of waiting requests; beyond it requests get 503 (default: no limit).",
    "chunked_prefill_size": "Maximum prompt tokens prefilled in one step (long prompts are chunked).",
    "max_prefill_tokens": "Maximum prompt tokens prefilled in one step over all requests (caps --chunked-prefill-size).",
    "disable_radix_cache": "Disable prefix caching.",
    "tp_size": "Tensor parallel size (only 1 is implemented today).",
    "ep_size": "Expert parallel size (only 1 is implemented today).",
    "dp_size": "Data parallel size (only 1 is implemented today).",
    "tool_call_parser": "Parser that turns model output into OpenAI tool_calls (e.g. qwen25, step3p5, glm47). "
                        "Default for Qwen2 models: qwen25 when a request has tools.",
    "reasoning_parser": "Parser that separates reasoning into `reasoning_content` (e.g. qwen3, deepseek-r1, step3p5).",
    "chat_template": "Chat template: a path to a Jinja file, or the template text itself "
                     "(default: the tokenizer's own).",
    "trust_remote_code": "Allow custom model/tokenizer code from the model repository (passed to transformers).",
    "disable_cuda_graph": "Disable CUDA graphs (a no-op on CPU).",
    "log_level": "Logging level: debug, info, warning, error, critical.",
    "speculative_algorithm": "Speculative decoding algorithm (EAGLE, EAGLE3, NEXTN, STANDALONE, NGRAM; not implemented yet).",
    "speculative_draft_model_path": "Draft model for speculative decoding (not implemented yet).",
    "speculative_num_steps": "Speculative decoding: draft steps per verify (not implemented yet).",
    "speculative_eagle_topk": "Speculative decoding: EAGLE top-k branching (not implemented yet).",
    "speculative_num_draft_tokens": "Speculative decoding: draft tokens per verify (not implemented yet).",
    "enable_multi_layer_eagle": "Multi-layer EAGLE / MTP drafting (not implemented yet).",
    "quantization": "CPU quantization: int8 or int4 (weight-only), w8a8_int8 (int8 weights and activations, "
                    "fastest for batched decode), w4a8 (4-bit group weights x int8 activations on ember's "
                    "VNNI kernel, fastest at batch 1); default: none, exact weights.",
    "disable_fused_decode": "Run w4a8 decode steps of Llama-family models through torch ops instead of the "
                            "fused C++ decode step (for comparison; both compute the same layers).",
    "sampling_defaults": "Where unset sampling fields of OpenAI requests come from: `model` (the model's "
                         "generation_config.json, the default) or `openai` (temperature 1, top_p 1, ...).",
    "random_seed": "Random seed for sampling.",
    "num_threads": "Torch threads on CPU (default: all cores).",
    "file_storage_path": "Directory for files uploaded through /v1/files, kept across restarts "
                         "(default: a temporary directory, removed when the server stops).",
    "file_max_bytes": "Largest file /v1/files accepts, in bytes (larger uploads get 413).",
}

CHOICES: dict[str, list[str]] = {
    "log_level": ["debug", "info", "warning", "error", "critical"],
    "device": ["auto", "cpu", "cuda"],
    "quantization": ["int8", "int4", "w8a8_int8", "w4a8"],
    "sampling_defaults": ["model", "openai"],
}

# Flags that are accepted (SGLang users pass them) but not implemented yet: starting with them fails.
SPECULATIVE_FIELDS = ("speculative_algorithm", "speculative_draft_model_path", "speculative_num_steps",
                      "speculative_eagle_topk", "speculative_num_draft_tokens", "enable_multi_layer_eagle")


# ServerArgs fields the engine does not use yet: giving one explicitly is an error, not silently ignored.
# (Remove a name here when the engine implements it.)
NOT_IMPLEMENTED_WHEN_GIVEN: tuple[str, ...] = ()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation) -> tuple[type, bool]:
    """(base type, optional) of a field annotation (a string under `from __future__ import annotations`)."""
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.split("|")]
        optional = "None" in parts
        parts = [p for p in parts if p != "None"]
        table = {"int": int, "float": float, "str": str, "bool": bool}
        return table.get(parts[0], str), optional
    args = typing.get_args(annotation)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) != len(args)
    return annotation, False


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Add one flag per ServerArgs field. Defaults are SUPPRESSed so we know which flags were given."""
    group = parser.add_argument_group("server arguments")
    for f in dataclasses.fields(ServerArgs):
        typ, _ = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = HELP.get(f.name) or f"{f.name.replace('_', ' ')} (ServerArgs.{f.name})"
        if typ is bool:
            if default:
                group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=f"{help_text} (default: on)")
            else:
                group.add_argument(_flag(f.name), action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        kwargs = dict(type=typ, default=argparse.SUPPRESS, help=f"{help_text} (default: {default})",
                      dest=f.name)
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
            kwargs["type"] = str.lower
        group.add_argument(_flag(f.name), **kwargs)


def server_args_from_namespace(ns: argparse.Namespace) -> tuple[ServerArgs, set[str]]:
    """ServerArgs from parsed flags, and the set of field names the user gave explicitly."""
    names = ServerArgs.field_names()
    given = {k: v for k, v in vars(ns).items() if k in names}
    return ServerArgs(**given), set(given)


def check_server_args(args: ServerArgs, given: set[str] | None = None) -> list[str]:
    """Errors for flags that are accepted but not implemented yet. Logs flags that are no-ops here."""
    given = given if given is not None else set()
    errors = []
    for name in ("tp_size", "ep_size", "dp_size"):
        value = getattr(args, name)
        if value is not None and value != 1:
            errors.append(f"{_flag(name)} {value} is not implemented yet: ember runs on a single device today "
                          f"(leave it at 1)")
    for name in SPECULATIVE_FIELDS:
        value = getattr(args, name)
        if value not in (None, False):
            shown = "" if value is True else f" {value}"
            errors.append(f"{_flag(name)}{shown} is not implemented yet: speculative decoding is not "
                          f"supported (remove the speculative flags)")
    for name in NOT_IMPLEMENTED_WHEN_GIVEN:
        if name in given:
            errors.append(f"{_flag(name)} is not implemented yet (remove it)")
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        errors.append(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    if args.max_running_requests is not None and args.max_running_requests < 1:
        errors.append(f"--max-running-requests must be >= 1, got {args.max_running_requests}")
    if not 0 < args.port < 65536:
        errors.append(f"--port must be in 1..65535, got {args.port}")
    if args.context_length is not None and args.context_length < 1:
        errors.append(f"--context-length must be >= 1, got {args.context_length}")
    if args.file_max_bytes < 1:
        errors.append(f"--file-max-bytes must be >= 1, got {args.file_max_bytes}")
    if args.file_storage_path is not None:
        path = os.path.expanduser(args.file_storage_path)
        if os.path.exists(path) and not os.path.isdir(path):
            errors.append(f"--file-storage-path {args.file_storage_path} exists and is not a directory")
    # (no torch here: the API process stays small; the engine process validates --dtype / --device)
    device = args.device
    if device == "auto":
        device = "cuda" if os.path.exists("/dev/nvidiactl") else "cpu"
    if device == "cpu":
        if args.disable_cuda_graph:
            logger.info("--disable-cuda-graph is a no-op on CPU (there are no CUDA graphs)")
        if "mem_fraction_static" in given:
            logger.info("--mem-fraction-static is a no-op on CPU (the KV cache uses --cpu-kv-cache-gb)")
    return errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="ember: a small LLM serving engine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    serve = sub.add_parser("serve", help="Start the OpenAI-compatible HTTP server.",
                           description="Start the OpenAI-compatible and native (SGLang /generate) HTTP server.")
    serve.add_argument("model", nargs="?", default=None,
                       help="Model to serve (same as --model-path; optional).")
    add_server_args(serve)
    serve.set_defaults(func=_cmd_serve)
    from ember.bench_serving import add_cli_args as add_bench_args
    bench = sub.add_parser("bench", help="Benchmark an OpenAI-compatible server (ours or a peer).",
                           description="Serving benchmark: throughput, TTFT and inter-token latency.")
    add_bench_args(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def _cmd_bench(ns: argparse.Namespace) -> int:
    from ember.bench_serving import run_from_args
    return run_from_args(ns)


def parse_serve_args(argv: list[str], prog: str = "ember serve") -> tuple[ServerArgs, set[str]]:
    """Parse serve flags (used by `ember serve` and `python -m ember.launch_server`)."""
    parser = argparse.ArgumentParser(prog=prog, description="Start the ember HTTP server.")
    add_server_args(parser)
    ns = parser.parse_args(argv)
    return server_args_from_namespace(ns)


def _cmd_serve(ns: argparse.Namespace) -> int:
    args, given = server_args_from_namespace(ns)
    if ns.model is not None:
        if "model_path" in given and args.model_path != ns.model:
            print(f"ember serve: error: model given twice ({ns.model!r} and --model-path {args.model_path!r})",
                  file=sys.stderr)
            return 2
        args.model_path = ns.model
        given.add("model_path")
    from ember.launch_server import run_server
    return run_server(args, given)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return ns.func(ns) or 0


if __name__ == "__main__":
    sys.exit(main())
