"""The FastAPI app of the API process: state, auth, error handlers, lifespan (engine connection)."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sys
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.api.errors import APIError, anthropic_error_body, error_body, error_response, validation_message
from ember.api.shutdown import DrainMiddleware, Lifecycle
from ember.engine.engine_client import EngineClient
from ember.engine.sampling_params import model_sampling_defaults
from ember.frontend.tokenizer_manager import TokenizerManager
from ember.server_args import ServerArgs
from ember.utils import display_host

logger = logging.getLogger("ember.server")


class ServerState:
    """What every route needs: the args, the engine client, the tokenizer manager (after ready)."""

    def __init__(self, args: ServerArgs, engine: EngineClient, chat_template: str | None = None):
        self.args = args
        self.engine = engine
        self.chat_template = chat_template
        self.tm: TokenizerManager | None = None
        self.groups: dict[str, list[str]] = {}  # request id -> engine rids (for /abort_request)
        self.created = int(time.time())
        self.sampling_defaults: dict = {}  # for OpenAI request fields left unset (--sampling-defaults)

    @property
    def ready(self) -> bool:
        return self.tm is not None and self.engine.is_ready

    def require_ready(self) -> None:
        if self.engine.failed is not None:
            raise APIError(f"The engine is not running: {self.engine.failed.error}", 503)
        if not self.ready:
            raise APIError("The server is starting: the model is still loading. Retry shortly.", 503)

    @property
    def kv_capacity(self) -> int | None:
        """Tokens the KV cache holds (one request cannot be longer)."""
        stats = self.engine.info.stats if self.engine.info else {}
        try:
            return int(stats["total_pages"]) * int(stats["page_size"])
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def model_type(self) -> str | None:
        return self.engine.info.model_type if self.engine.info else None

    @property
    def served_model_name(self) -> str:
        if self.args.served_model_name:
            return self.args.served_model_name
        if self.args.model_path:
            return self.args.model_path
        try:  # no --model-path: the bundled default model, by its alias
            from ember.loader.bundled import DEFAULT_MODEL
            return DEFAULT_MODEL
        except ImportError:
            return self.engine.info.model_dir if self.engine.info is not None else "default"

    def model_card(self) -> dict:
        name = self.served_model_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "ember", "root": name,
                "parent": None, "max_model_len": self.tm.context_length if self.tm else None}

    def on_engine_ready(self) -> None:
        info = self.engine.info
        self.tm = TokenizerManager(info.tokenizer, info.context_length, info.vocab_size,
                                   chat_template=self.chat_template, model_type=info.model_type)
        if self.args.sampling_defaults == "model":
            self.sampling_defaults = model_sampling_defaults(info.model_dir)
            if self.sampling_defaults:
                logger.info("sampling defaults from the model's generation_config.json: %s", self.sampling_defaults)


class AuthMiddleware:
    """Pure ASGI middleware (no buffering of streams): Bearer api key on every route but /health."""
    OPEN_PATHS = {"/health", "/", "/chat"}  # the chat page is static; its API calls carry the key

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        token = b""
        if auth[:7].lower() == b"bearer ":
            token = auth[7:].strip()
        elif headers.get(b"x-api-key"):
            token = headers[b"x-api-key"].strip()
        if token and hmac.compare_digest(token, self.expected):
            return await self.app(scope, receive, send)
        if scope["path"].startswith("/v1/messages"):  # the Anthropic-style API answers in its own shape
            body = json.dumps(anthropic_error_body("Invalid or missing API key: send `x-api-key: <key>` or "
                                                   "`Authorization: Bearer <key>`.", 401)).encode()
        else:
            body = json.dumps(error_body("Invalid or missing API key: send `Authorization: Bearer <key>`.",
                                         401, None, "AuthenticationError")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def create_app(args: ServerArgs, engine: EngineClient, chat_template: str | None = None,
               lifecycle: Lifecycle | None = None) -> FastAPI:
    """`lifecycle`: the in-flight counter and draining flag the graceful shutdown shares with the app."""
    state = ServerState(args, engine, chat_template)
    lifecycle = lifecycle or Lifecycle()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        waiter = asyncio.create_task(_announce_when_ready(app, state))
        try:
            yield
        finally:
            waiter.cancel()

    app = FastAPI(title="ember", version=_version(), lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.ember = state
    app.state.uvicorn_server = None

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.status >= 500:
            logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return error_response(exc.message, exc.status, exc.param, exc.err_type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        return error_response(message, exc.status_code, None, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(f"Internal server error: {type(exc).__name__}: {exc}", 500)

    from ember.api.chat_page import router as chat_router
    from ember.api.metrics import MetricsCollector
    from ember.api.metrics import router as metrics_router
    from ember.api.responses_routes import router as responses_router
    from ember.api.files_routes import router as files_router
    from ember.api.anthropic_routes import router as anthropic_router
    from ember.api.native_routes import router as native_router
    from ember.api.openai_routes import router as openai_router
    app.include_router(openai_router)
    app.include_router(native_router)
    app.include_router(anthropic_router)
    app.include_router(files_router)
    app.include_router(responses_router)
    app.include_router(metrics_router)
    engine.metrics = MetricsCollector(state.served_model_name)  # fed by serving.MergedOutputs
    app.include_router(chat_router)
    if args.api_key:
        app.add_middleware(AuthMiddleware, api_key=args.api_key)
    app.add_middleware(DrainMiddleware, lifecycle=lifecycle)  # outermost: draining answers before auth
    app.state.lifecycle = lifecycle
    return app


async def _announce_when_ready(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    await engine._ready.wait()
    if engine.failed is not None:
        return
    try:
        state.on_engine_ready()
    except Exception as e:  # noqa: BLE001
        logger.error("could not set up the tokenizer: %s", e, exc_info=True)
        if engine.on_fatal:
            engine.on_fatal(f"could not set up the tokenizer: {e}")
        return
    server = app.state.uvicorn_server
    while server is not None and not server.started:
        await asyncio.sleep(0.05)
    args = state.args
    url = f"http://{display_host(args.host)}:{args.port}"
    logger.info("model %s loaded (context length %d)", state.served_model_name, state.tm.context_length)
    # Printed whatever the log level, so scripts and users always see it.
    print(f"ember server ready at {url}", file=sys.stderr, flush=True)


def _version() -> str:
    try:
        import ember
        return ember.__version__
    except Exception:  # noqa: BLE001
        return "0"
