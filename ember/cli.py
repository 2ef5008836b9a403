"""The `ember` command line: `ember serve ...` (more subcommands, e.g. `bench`, plug in below).

The serve flags are built from the ServerArgs dataclass (`ember.server_args.add_server_args`, with
SGLang's flag names); `python -m ember.launch_server` takes the same flags. Imports go one way:
cli -> launch_server -> server_args (no cycle; a test walks the imports).
"""
from __future__ import annotations

import argparse
import logging
import sys

from ember.launch_server import run_server
from ember.server_args import (  # noqa: F401 - the flag definitions live with ServerArgs; re-exported here
    CHOICES, HELP, SPECULATIVE_FIELDS, ServerArgs, add_server_args, check_server_args, parse_serve_args,
    server_args_from_namespace,
)

logger = logging.getLogger("ember.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="ember: a small LLM serving engine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    serve = sub.add_parser("serve", help="Start the OpenAI-compatible HTTP server.",
                           description="Start the OpenAI-compatible and native (SGLang /generate) HTTP server.")
    serve.add_argument("model", nargs="?", default=None,
                       help="Model to serve (same as --model-path; optional).")
    add_server_args(serve)
    serve.add_argument("--dry-run", action="store_true", default=False,
                       help="Print the memory plan (weight bytes, KV bytes per token per layer group, tokens that "
                            "fit) from the model's config.json alone, without loading weights, and exit.")
    serve.set_defaults(func=_cmd_serve)
    from ember.bench_serving import add_cli_args as add_bench_args
    bench = sub.add_parser("bench", help="Benchmark an OpenAI-compatible server (ours or a peer).",
                           description="Serving benchmark: throughput, TTFT and inter-token latency.")
    add_bench_args(bench)
    bench.set_defaults(func=_cmd_bench)
    download = sub.add_parser("download", help="Download a model from Hugging Face or ModelScope.",
                              description="Fetch a model's config, tokenizer and weights into the hub's cache "
                                          "(resumes partial downloads); `ember serve --model-path ORG/NAME` then "
                                          "finds it offline.")
    download.add_argument("repo_id", help="ORG/NAME on the hub")
    download.add_argument("--hub", choices=("huggingface", "modelscope"), default=None,
                          help="default: modelscope if EMBER_USE_MODELSCOPE/SGLANG_USE_MODELSCOPE is set, "
                               "else huggingface")
    download.add_argument("--revision", default=None)
    download.add_argument("--local-dir", default=None, help="a directory to put the files in, instead of the cache")
    download.set_defaults(func=_cmd_download)
    return parser


def _cmd_download(ns: argparse.Namespace) -> int:
    from ember.loader.hub import download, find_cached
    try:
        path = None if ns.local_dir else find_cached(ns.repo_id, ns.hub, ns.revision)
        path = path or download(ns.repo_id, ns.hub, ns.revision, ns.local_dir)
    except ValueError as e:
        print(f"ember download: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    from ember.bench_serving import run_from_args
    return run_from_args(ns)


def _cmd_serve(ns: argparse.Namespace) -> int:
    args, given = server_args_from_namespace(ns)
    if ns.model is not None:
        if "model_path" in given and args.model_path != ns.model:
            print(f"ember serve: error: model given twice ({ns.model!r} and --model-path {args.model_path!r})",
                  file=sys.stderr)
            return 2
        args.model_path = ns.model
        given.add("model_path")
    if getattr(ns, "dry_run", False):
        from ember.engine.memory_plan import plan_from_config
        from ember.loader import resolve_model_dir
        try:
            print(plan_from_config(resolve_model_dir(args.model_path), args).describe())
        except ValueError as e:
            print(f"ember serve: error: {e}", file=sys.stderr)
            return 2
        return 0
    return run_server(args, given)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return ns.func(ns) or 0


if __name__ == "__main__":
    sys.exit(main())
