"""A test double for the engine: `ScriptedEngineClient` answers every request by replaying a fixed list of
text pieces (one TokenOut per piece), so the real API app (routes, templates, parsers, SSE) can be
tested on an exact model output without a model. Used only by the parsing tests of tests/e2e."""
from __future__ import annotations

import asyncio
import time

from ember.engine.engine_process import EngineReady
from ember.engine.io_struct import ControlOut, GenerateReq, TokenOut
from ember.server_args import ServerArgs

# ChatML; the assistant turn opens a thinking block unless the request turns thinking off (GLM/Qwen3 style)
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}")
# ChatML whose assistant turn always opens a thinking block (Step-3.5 style: no switch)
ALWAYS_THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


class _Replay:
    """The TokenOuts of one request (the interface of engine_client.RequestStream)."""

    def __init__(self, outs: list[TokenOut]):
        self.outs = list(outs)
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenOut:
        if self.closed or not self.outs:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        return self.outs.pop(0)

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.close()


class ScriptedEngineClient:
    """Stands in for EngineClient. `pieces`: the output text, split as the engine would stream it.
    Every GenerateReq is kept in `requests` (to check the prompt and the sampling params)."""

    def __init__(self, tokenizer, server_args: ServerArgs, pieces: list[str], finish_reason: str = "stop"):
        self.server_args = server_args
        self.tokenizer = tokenizer
        self.pieces = list(pieces)
        self.finish_reason = finish_reason
        self.requests: list[GenerateReq] = []
        self.info = EngineReady(tokenizer=tokenizer, model_dir="scripted", context_length=4096,
                                vocab_size=len(tokenizer), model_type="scripted",
                                stats={"total_pages": 256, "page_size": 16})
        self.failed = None
        self.stats: dict = {}
        self.on_fatal = None
        self.proc = None
        self._ready: asyncio.Event | None = None

    async def start(self) -> None:
        self._ready = asyncio.Event()
        self._ready.set()

    is_ready = True
    alive = True
    num_outstanding = 0

    def queue_length_estimate(self, incoming: int = 0) -> int:
        return 0

    def generate(self, req: GenerateReq) -> _Replay:
        self.requests.append(req)
        outs, n = [], 0
        eos = self.tokenizer.eos_token_id
        for i, piece in enumerate(self.pieces):
            ids = self.tokenizer.encode(piece, add_special_tokens=False)
            n += len(ids)
            last = i == len(self.pieces) - 1
            outs.append(TokenOut(rid=req.rid, new_token_ids=ids, text_delta=piece, finished=last,
                                 finish_reason=self.finish_reason if last else None,
                                 matched_stop=eos if last and self.finish_reason == "stop" else None,
                                 prompt_tokens=len(req.input_ids), completion_tokens=n))
        return _Replay(outs)

    def abort(self, rid: str) -> None:
        pass

    def active_rids(self) -> list[str]:
        return []

    async def control(self, kind: str, timeout: float = 30.0) -> ControlOut:
        return ControlOut(cid=kind, ok=True, data={})

    def shutdown(self, timeout: float = 5.0) -> None:
        pass


class ScriptedServer:
    """The real API app on a ScriptedEngineClient, driven in-process (starlette TestClient).
    Use as a context manager; `.client` is an httpx client, `.openai()` the official SDK on it."""

    def __init__(self, pieces: list[str], chat_template: str | None = THINKING_TEMPLATE, **server_args):
        from tests.tiny_models import byte_level_tokenizer
        from ember.api.app import create_app
        self.engine = ScriptedEngineClient(byte_level_tokenizer(), ServerArgs(**server_args), pieces)
        self.app = create_app(self.engine.server_args, self.engine, chat_template=chat_template)
        self.client = None

    def __enter__(self) -> "ScriptedServer":
        from fastapi.testclient import TestClient
        self.client = TestClient(self.app).__enter__()
        deadline = time.monotonic() + 10
        while self.client.get("/health").status_code != 200:  # the tokenizer is set up by a startup task
            assert time.monotonic() < deadline, "the scripted server did not become ready"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.client.__exit__(*exc)

    def openai(self):
        import openai
        return openai.OpenAI(base_url="http://testserver/v1", api_key="EMPTY", http_client=self.client,
                             max_retries=0)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def prompt_text(self, k: int = -1) -> str:
        """The prompt of the k-th request the engine got, as text."""
        return self.tokenizer.decode(self.engine.requests[k].input_ids, skip_special_tokens=False)
