"""Tokenization and chat templates in the API process (the engine never sees user text formats)."""
from __future__ import annotations

import copy
import json
from functools import lru_cache


class PromptError(ValueError):
    """A prompt the server cannot turn into tokens (answered with 400). param: the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class TokenizerManager:
    def __init__(self, tokenizer, context_length: int, vocab_size: int, chat_template: str | None = None,
                 model_type: str | None = None):
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.vocab_size = int(vocab_size)
        self.chat_template = chat_template
        self.model_type = model_type
        self._token_text = lru_cache(maxsize=65536)(self._decode_one)

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _decode_one(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def token_text(self, tid: int) -> str:
        return self._token_text(int(tid))

    def count_tokens(self, text: str) -> int:
        if not text:
            return 0
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def check_token_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise PromptError(f"{param} is empty", param)
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise PromptError(f"{param} contains token id {t!r} outside the vocabulary "
                                  f"(size {self.vocab_size})", param)

    # ------------------------------------------------------------------ chat
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template or getattr(self.tokenizer, "chat_template", None))

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    template_kwargs: dict | None = None) -> str:
        """Apply the chat template; returns the prompt text. Raises PromptError for bad conversations."""
        if not self.has_chat_template:
            raise PromptError("this model has no chat template; start the server with --chat-template "
                              "or use /v1/completions", "messages")
        msgs = normalize_messages(messages)
        kwargs = dict(template_kwargs or {})
        try:
            out = self.tokenizer.apply_chat_template(
                msgs, tools=tools or None, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, **kwargs)
        except PromptError:
            raise
        except Exception as e:  # noqa: BLE001 - template errors (raise_exception, bad roles) are user errors
            raise PromptError(f"could not apply the chat template: {e}", "messages") from e
        if not isinstance(out, str):  # some versions return a list for batched input
            out = out[0] if isinstance(out, list) and out and isinstance(out[0], str) else str(out)
        return out

    def encode_chat(self, prompt_text: str) -> list[int]:
        # The template already holds the special tokens (BOS, role markers).
        return self.encode(prompt_text, add_special_tokens=False)


def _text_of_content(content, role: str):
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text"):
                texts.append(part.get("text") or "")
            elif kind is None:
                raise PromptError(f"a {role} message content part has no 'type'", "messages")
            else:
                raise PromptError(f"content parts of type {kind!r} are not supported by this model "
                                  f"(text only)", "messages")
        return "\n".join(texts)
    raise PromptError(f"a {role} message has content of type {type(content).__name__}", "messages")


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: text content, tool-call arguments as dicts."""
    out = []
    for m in messages:
        m = copy.deepcopy(m)
        role = m.get("role")
        if role == "developer":
            m["role"] = role = "system"
        m["content"] = _text_of_content(m.get("content"), role)
        if m["content"] is None:
            m["content"] = ""
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                call = dict(call)
                fn = dict(call.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        pass  # leave it as text: the template may print it
                call["function"] = fn
                calls.append(call)
            m["tool_calls"] = calls
        else:
            m.pop("tool_calls", None)
        # drop None-valued optional keys: templates test `if message.name` etc.
        for k in [k for k, v in m.items() if v is None and k not in ("content",)]:
            del m[k]
        out.append(m)
    return out
