"""The built-in chat page at `/` and `/chat`: one static HTML file (ember/api/static/chat.html), no build step.
It calls this server's own /v1/models and /v1/chat/completions (streamed) from the browser."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()
PAGE = Path(__file__).with_name("static") / "chat.html"
PATHS = ("/", "/chat")  # open without the API key: the page holds no data; its API calls carry the key


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
@router.get("/chat", include_in_schema=False, response_class=HTMLResponse)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
