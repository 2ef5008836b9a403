"""Continuous batching over the paged KV pool. Pure Python over plain data: no tensors, no model.

Every step builds one batch: first the running requests (each decoding request contributes one token,
a request in the middle of a chunked prefill contributes its next chunk), then newly admitted waiting
requests, until the token budget (`chunked_prefill_size`) or `max_running_requests` is reached. Pages are
allocated before the step; when the pool is short we first evict unused prefix-cache pages, then preempt
the most recently admitted request (its KV is dropped and recomputed later, its output so far is kept).

Sliding-window layers ("swa" group) only keep the window: pages a request has moved a window past go back to
the pool, or, when they belong to the prefix cache, are just unlocked (the tree keeps them until evicted).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ember.engine.kv_pool import PageAllocator
from ember.engine.radix_cache import RadixCache
from ember.engine.request import Req


@dataclass
class ScheduledBatch:
    reqs: list[Req]
    extend_lens: list[int]  # tokens each request runs this step (starting at its kv_len)

    def without(self, drop: list[bool]) -> ScheduledBatch | None:
        """The batch less the requests marked in `drop` (None if that leaves none)."""
        keep = [i for i, d in enumerate(drop) if not d]
        if len(keep) == len(self.reqs):
            return self
        return ScheduledBatch([self.reqs[i] for i in keep], [self.extend_lens[i] for i in keep]) if keep else None


class Scheduler:
    def __init__(self, allocators: dict[str, PageAllocator], page_size: int, *, window: int | None = None,
                 radix: RadixCache | None = None, max_running: int = 64, chunk_size: int = 2048):
        self.allocators = allocators
        self.page_size = page_size
        self.window = window  # sliding window of the "swa" group
        self.radix = radix
        if radix is not None and "swa" in allocators and radix.swa_allocator is not allocators["swa"]:
            raise ValueError("the prefix cache of a sliding-window model must hold the swa pool too")
        self.max_running = max_running
        self.chunk_size = chunk_size
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.total_preemptions = 0

    # ---------------------------------------------------------------- queue
    def add(self, req: Req) -> None:
        for g in self.allocators:
            req.page_tables.setdefault(g, [])
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, rid: str) -> Req | None:
        """Take a request out (abort), returning its pages. None if unknown."""
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                self.release(req)
                return req
        for req in self.running:
            if req.rid == rid:
                self.running.remove(req)
                self.release(req)
                return req
        return None

    def finish(self, req: Req) -> None:
        """A finished request leaves the batch; its full pages go to the prefix cache."""
        self.running.remove(req)
        if self.radix is not None:
            self.radix.insert(req.token_ids[:req.kv_len], req.page_tables["full"], req.prefix_nodes,
                              swa_pages=req.page_tables.get("swa"))
            for g in req.page_tables:
                req.page_tables[g] = []
            req.prefix_nodes = []
        self.release(req)

    def cache_prefix(self, req: Req) -> None:
        """Share a running request's computed full pages through the prefix cache right away, so requests
        arriving while it still runs (a common system prompt) reuse them."""
        if self.radix is not None and req.kv_len >= (len(req.prefix_nodes) + 1) * self.page_size:
            req.prefix_nodes = self.radix.insert(req.token_ids[:req.kv_len], req.page_tables["full"],
                                                 req.prefix_nodes, keep=True, swa_pages=req.page_tables.get("swa"))

    def release(self, req: Req) -> None:
        """Free every page the request owns and unlock the cached prefix it used."""
        shared = len(req.prefix_nodes)
        for g, table in req.page_tables.items():
            if g == "swa":  # the swa pages of the cached prefix still inside the window: unlock only
                for node, page in zip(req.prefix_nodes, table):
                    if page:
                        self.radix.unlock_swa(node)
            self.allocators[g].free(table[shared:])
            req.page_tables[g] = []
        if self.radix is not None and req.prefix_nodes:
            self.radix.unlock(req.prefix_nodes)
        req.prefix_nodes = []
        req.kv_len = 0

    # ---------------------------------------------------------------- pages
    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _release_out_of_window(self, req: Req) -> None:
        """Sliding-window layers only look back `window` tokens: free pages entirely behind that."""
        table = req.page_tables.get("swa")
        if table is None or self.window is None:
            return
        first_needed = max(0, req.kv_len - self.window + 1)
        shared = len(req.prefix_nodes)
        # released pages are a leading run of the table: walk back from the window's edge to the last one
        i = min(first_needed // self.page_size, len(table)) - 1
        while i >= 0 and table[i]:
            if i < shared:
                self.radix.unlock_swa(req.prefix_nodes[i])  # the prefix cache keeps the page
            else:
                self.allocators["swa"].free([table[i]])
            table[i] = 0
            i -= 1

    def _try_alloc(self, req: Req, upto: int) -> bool:
        """Give req pages for positions < upto in every group; all-or-nothing."""
        need = {g: self.pages_needed(upto) - len(req.page_tables[g]) for g in self.allocators}
        if any(n > self.allocators[g].num_free for g, n in need.items()):
            if self.radix is not None:
                short = need.get("full", 0) - self.allocators["full"].num_free
                if short > 0:
                    self.radix.evict(short)  # frees the swa pages of evicted leaves too
                if "swa" in need:
                    short = need["swa"] - self.allocators["swa"].num_free
                    if short > 0:  # the tree keeps swa pages until this pool runs short, so this is the steady
                        # state: free a batch at a time, so the scan of the tree is paid once per many pages
                        self.radix.evict_swa(max(short, self.allocators["swa"].total // 32))
            if any(n > self.allocators[g].num_free for g, n in need.items()):
                return False
        for g, n in need.items():
            if n > 0:
                req.page_tables[g].extend(self.allocators[g].alloc(n))
        return True

    def _preempt(self, batch: list[Req], lens: list[int], protect: Req) -> bool:
        """Drop the KV of the most recently admitted running request (not `protect`) and requeue it."""
        for victim in reversed(self.running):
            if victim is protect:
                continue
            if victim in batch:
                i = batch.index(victim)
                del batch[i], lens[i]
            self.running.remove(victim)
            self.release(victim)
            victim.num_preemptions += 1
            self.total_preemptions += 1
            self.waiting.appendleft(victim)
            return True
        return False

    # ---------------------------------------------------------------- the step
    def schedule(self) -> ScheduledBatch | None:
        batch: list[Req] = []
        lens: list[int] = []
        budget = self.chunk_size
        # running requests: decoders (1 token) first so a long prefill never starves them
        for req in sorted(self.running, key=lambda r: r.extend_len > 1):
            if req not in self.running:  # preempted while making room for an earlier one
                continue
            if req.extend_len > 1 and budget <= 0:
                continue  # a prefill chunk waits for the next step's budget
            n = min(req.extend_len, max(budget, 1))
            self._release_out_of_window(req)
            while not self._try_alloc(req, req.kv_len + n):
                if not self._preempt(batch, lens, protect=req):
                    raise RuntimeError("KV pool too small for a single request")  # add() prevents this
            batch.append(req)
            lens.append(n)
            budget -= n
        # admit waiting requests while budget, slots and pages allow
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            if self.radix is not None and req.kv_len == 0 and not req.return_prompt_logprobs:
                # reuse the longest cached prefix; keep at least one token to compute
                nodes = self.radix.match_prefix(req.token_ids[:len(req.token_ids) - 1])
                self.radix.lock(nodes)
                req.prefix_nodes = nodes
                req.page_tables["full"] = [n.page for n in nodes]
                if "swa" in req.page_tables:
                    req.page_tables["swa"] = self.radix.lock_swa(nodes)
                req.kv_len = len(nodes) * self.page_size
            if req.cached_tokens is None:
                req.cached_tokens = req.kv_len
            n = min(req.extend_len, budget)
            if not self._try_alloc(req, req.kv_len + n):
                self.release(req)  # undo the prefix lock; try again next step
                break
            self.waiting.popleft()
            self.running.append(req)
            batch.append(req)
            lens.append(n)
            budget -= n
        return ScheduledBatch(batch, lens) if batch else None

    # ---------------------------------------------------------------- accounting
    def pages_in_use(self) -> dict[str, int]:
        return {g: a.total - a.num_free for g, a in self.allocators.items()}
