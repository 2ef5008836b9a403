"""The floor: a minimal OpenAI-compatible server around Hugging Face `transformers` `generate`,
one request at a time (an asyncio lock serializes them; no batching, no prefix cache).

    python benchmarks/hf_server.py --model qwen2.5-coder-0.5b --port 8001

It runs in ember's own venv on purpose: the same torch (2.13 CPU) and transformers versions as ember,
on the same float32 weights (the HF directory ember converted from the GGUF), so the difference to ember
is the serving engine alone. Routes: /health, /v1/models, /v1/completions, /v1/chat/completions
(streaming with usage, temperature/top_p, max_tokens, ignore_eos, min_tokens).
"""

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_dir(model: str) -> str:
    if os.path.isdir(model):
        return model
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from ember.loader import resolve_model_dir

    return str(resolve_model_dir(model))


def build_app(model_dir: str, served_name: str, threads: int):
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    lock = asyncio.Lock()
    app = FastAPI()

    class QueueStreamer(BaseStreamer):
        """Pushes each new token id into an asyncio queue (generate calls put() from its thread)."""

        def __init__(self, loop, queue):
            self.loop, self.queue, self.first = loop, queue, True

        def put(self, value):
            if self.first:  # generate() first puts the prompt
                self.first = False
                return
            for t in value.reshape(-1).tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, int(t))

        def end(self):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def gen_kwargs(body: dict) -> dict:
        max_new = int(body.get("max_tokens") or 16)
        min_new = int(body.get("min_tokens") or 0)
        if body.get("ignore_eos"):
            min_new = max_new
        temp = float(body.get("temperature") if body.get("temperature") is not None else 1.0)
        kw = dict(max_new_tokens=max_new, min_new_tokens=min_new or None, pad_token_id=tok.pad_token_id
                  if tok.pad_token_id is not None else tok.eos_token_id)
        if temp > 0:
            kw.update(do_sample=True, temperature=temp, top_p=float(body.get("top_p") or 1.0))
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    async def generate(prompt_ids: list[int], kw: dict):
        """Async iterator of new token ids; the whole generation holds the lock (one request at a time)."""
        async with lock:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            streamer = QueueStreamer(loop, queue)
            inp = torch.tensor([prompt_ids])

            def run():
                try:
                    with torch.inference_mode():
                        model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), streamer=streamer, **kw)
                except Exception:
                    streamer.end()
                    raise

            fut = loop.run_in_executor(None, run)
            while True:
                t = await queue.get()
                if t is None:
                    break
                yield t
            await fut

    @app.get("/health")
    async def health():
        return JSONResponse({})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "transformers"}]}

    async def handle(body: dict, chat: bool):
        if chat:
            ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            p = body["prompt"]
            ids = tok.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p)
        ids = list(ids)
        kw = gen_kwargs(body)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        eos = set(tok.all_special_ids)

        def chunk(text: str, finish=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish}
            return {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                    "model": served_name, "choices": [choice]}

        async def stream():
            out: list[int] = []
            sent = ""
            first = True
            async for t in generate(ids, kw):
                out.append(t)
                text = tok.decode([x for x in out if x not in eos])
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 character: wait for the next token
                if len(text) > len(sent) or first:
                    yield f"data: {json.dumps(chunk(text[len(sent):], first=first))}\n\n"
                    sent, first = text, False
            finish = "length" if len(out) >= kw["max_new_tokens"] else "stop"
            yield f"data: {json.dumps(chunk('', finish))}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": len(ids), "completion_tokens": len(out),
                         "total_tokens": len(ids) + len(out)}
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': served_name, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(stream(), media_type="text/event-stream")
        out = [t async for t in generate(ids, kw)]
        text = tok.decode([x for x in out if x not in eos])
        finish = "length" if len(out) >= kw["max_new_tokens"] else "stop"
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "finish_reason": finish})
        return {"id": rid, "object": obj, "created": created, "model": served_name, "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                          "total_tokens": len(ids) + len(out)}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(await request.json(), chat=True)

    return app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="ember alias or HF directory")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    import uvicorn

    app = build_app(resolve_dir(a.model), a.served_model_name or a.model, a.threads)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
