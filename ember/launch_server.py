"""`python -m ember.launch_server --model-path ... --port ...` (SGLang's flag names).

Process layout: this (API) process runs FastAPI under uvicorn: routes, tokenization, chat templates and
output parsing. The engine process (multiprocessing "spawn") loads the model and runs the scheduler;
the two talk over ZMQ. /health answers 503 until the engine reports the model loaded.

SIGTERM / SIGINT drain the server (ember/api/shutdown.py) and exit 0. SGLang's helpers are importable from
here too (`from ember.launch_server import launch_server_cmd, wait_for_server`, as seed 001 does).
"""
from __future__ import annotations

import logging
import os
import sys
import threading

from ember.server_args import ServerArgs, check_server_args, parse_serve_args
from ember.utils import display_host, launch_server_cmd, terminate_process, wait_for_server

__all__ = ["run_server", "launch_server", "main", "launch_server_cmd", "wait_for_server", "terminate_process",
           "display_host"]

logger = logging.getLogger("ember.server")

LOG_FORMAT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=LOG_FORMAT,
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr, force=True)


def run_server(args: ServerArgs, given: set[str] | None = None) -> int:
    """Start the server and block until it stops. Returns the process exit code."""
    configure_logging(args.log_level)
    errors = check_server_args(args, given)
    if errors:
        for e in errors:
            print(f"ember: cannot start: {e}", file=sys.stderr, flush=True)
        return 2
    if args.node_rank > 0:  # a multi-node engine's other machines run only their ranks (no HTTP)
        from ember.distributed.launcher import run_worker_node
        return run_worker_node(args)

    import uvicorn

    from ember.api.app import create_app
    from ember.api.shutdown import GracefulServer, Lifecycle
    from ember.distributed.data_parallel import make_engine_client
    from ember.frontend.chat_template import load_chat_template_override

    try:
        chat_template = load_chat_template_override(args.chat_template)
        _check_parsers(args)
    except ValueError as e:
        print(f"ember: cannot start: {e}", file=sys.stderr, flush=True)
        return 2

    engine = make_engine_client(args)  # one EngineClient, or --dp-size replicas behind one
    state = {"exit_code": 0}
    lifecycle = Lifecycle()
    app = create_app(args, engine, chat_template=chat_template, lifecycle=lifecycle)
    # uvicorn's own grace only covers connections left after the drain (GracefulServer) ended
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                            log_level=args.log_level, access_log=args.log_level == "debug",
                            timeout_keep_alive=30, timeout_graceful_shutdown=5)
    server = GracefulServer(config, lifecycle, engine, args.graceful_shutdown_timeout)
    app.state.uvicorn_server = server

    def on_fatal(message: str) -> None:
        state["exit_code"] = 1
        print(f"ember: the server stops: {message}", file=sys.stderr, flush=True)
        server.should_exit = True

    engine.on_fatal = on_fatal
    engine.start_process()
    # Import the tokenizer classes while the engine loads the model (unpickling the tokenizer needs them).
    threading.Thread(target=_preimport, name="ember-preimport", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
    if not server.started and state["exit_code"] == 0:
        state["exit_code"] = 1  # e.g. the port was taken (uvicorn logged why)
    return state["exit_code"]


def _preimport() -> None:
    try:
        import transformers  # noqa: F401
        from transformers import PreTrainedTokenizerFast  # noqa: F401
    except Exception:  # noqa: BLE001
        pass


def _check_parsers(args: ServerArgs) -> None:
    """Fail at start on an unknown --tool-call-parser / --reasoning-parser name."""
    if not args.tool_call_parser and not args.reasoning_parser:
        return
    try:
        import ember.parsers as parsers
    except ImportError as e:  # pragma: no cover
        raise ValueError(f"output parsers are not available: {e}") from e
    if args.tool_call_parser:
        try:
            parsers.get_tool_call_parser(args.tool_call_parser, [])
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"--tool-call-parser {args.tool_call_parser!r}: {e}") from e
    if args.reasoning_parser:
        try:
            parsers.get_reasoning_parser(args.reasoning_parser)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"--reasoning-parser {args.reasoning_parser!r}: {e}") from e


def launch_server(args: ServerArgs) -> None:
    """Programmatic entry point (like sglang.srt.entrypoints.http_server.launch_server)."""
    code = run_server(args)
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    args, given = parse_serve_args(sys.argv[1:] if argv is None else argv, prog="python -m ember.launch_server")
    return run_server(args, given)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
