"""--dp-size N: N engine replicas (each an engine process with its own --tp-size ranks) behind one HTTP front.

`DataParallelClient` stands where the API process keeps its EngineClient and offers the same interface. A new
request goes to the replica with the fewest requests in flight (the shortest queue; ties: the most free KV
pages, then the lowest index), and stays there to the end (its KV cache lives there). Replica i's ranks take
GPUs --base-gpu-id + i * tp ... on CUDA. /get_server_info's engine_stats sums the replicas' counters and lists
each under "replicas" (with how many requests it was given); a replica that dies stops the server, as one engine
would.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging

from ember.engine.engine_client import EngineClient
from ember.engine.io_struct import ControlOut

logger = logging.getLogger("ember.distributed")


def make_engine_client(args):
    """The API process's handle on its engine(s)."""
    return DataParallelClient(args) if args.dp_size > 1 else EngineClient(args)


class DataParallelClient:
    def __init__(self, server_args):
        self.server_args = server_args
        self.replicas = [EngineClient(dataclasses.replace(server_args, dp_size=1,
                                                          base_gpu_id=server_args.base_gpu_id + i * server_args.tp_size))
                         for i in range(server_args.dp_size)]
        self.dispatched = [0] * len(self.replicas)
        self._owner: dict[str, EngineClient] = {}  # rid -> the replica serving it
        self._ready: asyncio.Event | None = None
        self._on_fatal = None

    # ---------------------------------------------------------------- lifecycle (as EngineClient)
    @property
    def on_fatal(self):
        return self._on_fatal

    @on_fatal.setter
    def on_fatal(self, fn) -> None:
        self._on_fatal = fn
        for r in self.replicas:
            r.on_fatal = fn

    def start_process(self) -> None:
        for r in self.replicas:
            r.start_process()

    async def start(self) -> None:
        self._ready = asyncio.Event()
        for r in self.replicas:
            await r.start()

        async def all_ready():
            for r in self.replicas:
                await r._ready.wait()
                if r.failed is not None:
                    break
            self._ready.set()
        asyncio.get_running_loop().create_task(all_ready(), name="ember-dp-ready")

    @property
    def info(self):
        return self.replicas[0].info if all(r.info is not None for r in self.replicas) else None

    @property
    def failed(self):
        return next((r.failed for r in self.replicas if r.failed is not None), None)

    @property
    def is_ready(self) -> bool:
        return all(r.is_ready for r in self.replicas)

    @property
    def alive(self) -> bool:
        return all(r.alive for r in self.replicas)

    async def wait_ready(self, timeout: float | None = None):
        for r in self.replicas:
            await r.wait_ready(timeout)
        return self.info

    def shutdown(self, timeout: float = 5.0) -> None:
        for r in self.replicas:
            r.shutdown(timeout)

    # ---------------------------------------------------------------- requests
    @property
    def num_outstanding(self) -> int:
        return sum(r.num_outstanding for r in self.replicas)

    @property
    def aborts_sent(self) -> int:
        return sum(getattr(r, "aborts_sent", 0) for r in self.replicas)

    @property
    def stats(self) -> dict:
        return merge_stats([r.stats for r in self.replicas], self.dispatched)

    def queue_length_estimate(self, incoming: int = 0) -> int:
        return min(r.queue_length_estimate(incoming) for r in self.replicas)  # where the request would go

    def pick(self) -> int:
        """The replica with the fewest requests in flight; ties: the most free KV pages."""
        return min(range(len(self.replicas)),
                   key=lambda i: (self.replicas[i].num_outstanding, -int(self.replicas[i].stats.get("free_pages", 0) or 0), i))

    def generate(self, req):
        i = self.pick()
        stream = self.replicas[i].generate(req)
        self.dispatched[i] += 1
        for rid in [rid for rid, r in self._owner.items() if rid not in r._queues]:  # finished ones
            del self._owner[rid]
        self._owner[req.rid] = self.replicas[i]
        return stream

    def abort(self, rid: str) -> None:
        owner = self._owner.pop(rid, None)
        for r in [owner] if owner is not None else self.replicas:
            r.abort(rid)

    def active_rids(self) -> list[str]:
        return [rid for r in self.replicas for rid in r.active_rids()]

    async def control(self, kind: str, timeout: float = 30.0) -> ControlOut:
        outs = await asyncio.gather(*(r.control(kind, timeout) for r in self.replicas))
        data = outs[0].data
        if kind in ("get_stats", "health"):
            data = merge_stats([dict(o.data) if o.ok else {} for o in outs], self.dispatched)
        elif kind == "flush_cache":
            data = {"stats": merge_stats([dict(o.data.get("stats", {})) for o in outs], self.dispatched)}
        return ControlOut(outs[0].cid, all(o.ok for o in outs), data)


def merge_stats(per_replica: list[dict], dispatched: list[int]) -> dict:
    """The replicas' counters summed (page_size kept), and each replica's own under "replicas"."""
    merged: dict = {}
    for s in per_replica:
        for k, v in s.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                merged[k] = v if k == "page_size" else merged.get(k, 0) + v
    merged["dp_size"] = len(per_replica)
    merged["replicas"] = [{**s, "dispatched": n} for s, n in zip(per_replica, dispatched)]
    return merged
