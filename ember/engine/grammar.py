"""Structured output with xgrammar: JSON (any / by schema), regex and EBNF constraints.

Grammars compile on a worker thread (the engine loop never waits on a compile) and are cached by their
source, so a repeated schema costs nothing. Each constrained request owns a GrammarMatcher that yields a
token bitmask per step and advances on each sampled token.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ember.engine.sampling_params import SamplingParams
from ember.host_to_device import to_device


def grammar_key(sp: SamplingParams) -> tuple[str, str] | None:
    if sp.json_schema is not None:
        return ("json", sp.json_schema)
    if sp.regex is not None:
        return ("regex", sp.regex)
    if sp.ebnf is not None:
        return ("ebnf", sp.ebnf)
    return None


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self._compiler = None
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-grammar")

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.eos_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def _compile(self, key):
        kind, source = key
        compiler = self._get_compiler()
        if kind == "json":
            if source in ("", "{}", "object", '{"type": "object"}') or source is None:
                return compiler.compile_builtin_json_grammar()
            return compiler.compile_json_schema(source, any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(source)
        return compiler.compile_grammar(source)

    def submit(self, sp: SamplingParams) -> Future | None:
        """Start compiling (or reuse) the request's grammar; None when it has no constraint."""
        key = grammar_key(sp)
        if key is None:
            return None
        with self._lock:
            fut = self._cache.get(key)
            if fut is None or (fut.done() and fut.exception() is not None):
                fut = self._pool.submit(self._compile, key)
                self._cache[key] = fut
        return fut

    @staticmethod
    def matcher(compiled):
        import xgrammar as xgr
        return xgr.GrammarMatcher(compiled)

    def bitmask(self, matchers: list) -> tuple[torch.Tensor, list[int]] | None:
        """A packed bitmask for the rows that have a matcher (others untouched)."""
        import xgrammar as xgr
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        mask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(mask, i)
        return mask, rows

    @staticmethod
    def apply(logits: torch.Tensor, bitmask: tuple[torch.Tensor, list[int]]) -> None:
        import xgrammar as xgr
        mask, rows = bitmask
        xgr.apply_token_bitmask_inplace(logits, to_device(mask, logits.device), indices=rows)


def schema_to_str(schema) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)
