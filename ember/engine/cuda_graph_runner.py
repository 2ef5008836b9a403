"""Decode steps replayed from CUDA graphs (SGLang's CudaGraphRunner): at start, the model's decode forward is
captured once per batch size of a fixed set (1, 2, 4, 8, 12, 16, 24, ... up to --cuda-graph-max-bs) over static
input buffers; a decode step then copies its inputs into the buffers, pads the batch up to the next captured size
and replays that graph: one launch instead of a few hundred kernel launches from Python.

Padding rows read token 0 at position 0 with one key, and write their K/V into slot 0 of page 0, the pool's
padding page; their logits are dropped. What is captured must not depend on the batch beyond its size: the
Triton attention backend (its metadata is lengths and page tables; split-K sized for the longest context, not the
batch's longest), float MoE experts on the Triton runner (the torch runner reads the routing on the host), one
rank (tp 1). Other steps (prefill, verify, images, prompt logprobs) run eagerly as before.

`capture=False` keeps everything but the graphs (each step runs the forward on the static buffers): how the suite
checks the buffers and the padding on CPU, under Triton's interpreter.
"""
from __future__ import annotations

import logging

import torch

from ember.attention.triton_backend import PagedMetadata
from ember.engine.forward_batch import ForwardBatch

logger = logging.getLogger("ember.engine")


def capture_sizes(max_bs: int) -> list[int]:
    """SGLang's batch sizes: 1, 2, 4, 8, 12, then every 8 up to max_bs (max_bs itself included)."""
    sizes = [s for s in [1, 2, 4, 8, 12] + list(range(16, max_bs + 1, 8)) if s <= max_bs]
    return sizes if sizes[-1] == max_bs else sizes + [max_bs]


def why_not_graphs(runner, args) -> str | None:
    """Why this engine's decode steps cannot be CUDA graphs (None: they can)."""
    from ember.distributed import tp_size
    from ember.layers.moe import MoEExperts
    if args.disable_cuda_graph:
        return "--disable-cuda-graph"
    if str(runner.device).split(":")[0] != "cuda":
        return "not on CUDA"
    if runner.attn_backend.name != "triton":
        return "the torch attention backend sizes its tensors by the batch's lengths (use --attention-backend triton)"
    if tp_size() > 1:
        return "tensor parallel (every rank would have to replay): not implemented"
    if any(isinstance(m, MoEExperts) and m.runner != "triton" for m in runner.model.modules()):
        return "the torch MoE runner reads the routing on the host (use --moe-runner-backend triton)"
    return None


class DecodeGraphRunner:
    def __init__(self, runner, max_bs: int, max_context: int, capture: bool = True):
        self.runner, self.device = runner, runner.device
        self.sizes = capture_sizes(max_bs)
        self.max_bs = max_bs
        self.max_context = max_context  # split-K of the attention kernels is sized for it, at every step
        P = runner.page_size
        width = -(-max_context // P) + 1
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=self.device)
        self.logit_index = torch.arange(max_bs, device=self.device)
        int32 = dict(dtype=torch.int32, device=self.device)
        self.meta = {g: PagedMetadata(write_slots=torch.zeros(max_bs, dtype=torch.long, device=self.device),
                                      page_table=torch.zeros(max_bs, width, **int32),
                                      prefix_lens=torch.zeros(max_bs, **int32), q_lens=torch.ones(max_bs, **int32),
                                      q_loc=torch.arange(max_bs, **int32), seq_lens=torch.ones(max_bs, **int32),
                                      max_seq_len=max_context, page_size=P,
                                      window=runner.window if g == "swa" else None, batch_size=max_bs, max_q=1)
                     for g in runner.kv_cache.groups}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    # ------------------------------------------------------------------ buffers
    def _static_batch(self, bs: int):
        attn = {g: PagedMetadata(m.write_slots[:bs], m.page_table[:bs], m.prefix_lens[:bs], m.q_lens[:bs],
                                 m.q_loc[:bs], m.seq_lens[:bs], m.max_seq_len, m.page_size, m.window, bs, 1)
                for g, m in self.meta.items()}
        return ForwardBatch(self.input_ids[:bs], self.positions[:bs], attn, self.runner.kv_cache,
                            self.logit_index[:bs], attn_backend=self.runner.attn_backend)

    def _pad(self, start: int, end: int) -> None:
        """Rows [start, end) as padding: token 0 at position 0, one key, written to the padding page's slot 0."""
        if start >= end:
            return
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        for m in self.meta.values():
            m.write_slots[start:end].zero_()
            m.prefix_lens[start:end].zero_()
            m.seq_lens[start:end].fill_(1)
            m.page_table[start:end, 0].zero_()

    def can_run(self, reqs, extend_lens) -> bool:
        width = self.meta["full"].page_table.shape[1]
        return (len(reqs) <= self.max_bs and all(n == 1 for n in extend_lens)
                and all(getattr(r, "mm", None) is None and r.kv_len < self.max_context
                        and all(len(t) <= width for t in r.page_tables.values()) for r in reqs))

    # ------------------------------------------------------------------ one step
    def run(self, reqs) -> torch.Tensor:
        """Logits [B, vocab] of a decode step of these requests (each bringing one token)."""
        B = len(reqs)
        bs = next(s for s in self.sizes if s >= B)
        batch = self.runner.build_batch(reqs, [1] * B)  # (the backend's own metadata, copied into the buffers)
        self.input_ids[:B].copy_(batch.input_ids)
        self.positions[:B].copy_(batch.positions)
        for g, meta in batch.attn.items():
            m = self.meta[g]
            m.write_slots[:B].copy_(meta.write_slots)
            m.page_table[:B, :meta.page_table.shape[1]].copy_(meta.page_table)
            m.prefix_lens[:B].copy_(meta.prefix_lens)
            m.seq_lens[:B].copy_(meta.seq_lens)
        self._pad(B, bs)
        if bs in self.graphs:
            self.graphs[bs].replay()
            return self.outputs[bs][:B].clone()  # (the next replay overwrites the graph's output; callers may keep it)
        with torch.inference_mode():
            return self.runner.model(self._static_batch(bs))[:B]

    # ------------------------------------------------------------------ capture
    def _capture_all(self) -> None:
        import time
        t0 = time.monotonic()
        self._pad(0, self.max_bs)
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up outside the graph: Triton compiles, cuBLAS picks kernels
                    for _ in range(2):
                        self.runner.model(self._static_batch(bs))
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                # a batch of new view objects: what layers memoize per batch (RotaryEmbedding's cos/sin rows, keyed
                # by the positions tensor) is then computed inside the graph, not taken from the warm-up
                batch = self._static_batch(bs)
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = self.runner.model(batch)
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("CUDA graphs: captured decode at batch sizes %s in %.1fs", self.sizes, time.monotonic() - t0)


def maybe_graph_runner(runner, args, max_context: int) -> DecodeGraphRunner | None:
    """The engine's DecodeGraphRunner, or None (saying why in the log when on CUDA)."""
    why = why_not_graphs(runner, args)
    if why is not None:
        if str(runner.device).startswith("cuda"):
            logger.info("CUDA graphs off: %s", why)
        return None
    max_bs = args.cuda_graph_max_bs or min(128, args.max_running_requests)
    return DecodeGraphRunner(runner, max_bs, max_context)
