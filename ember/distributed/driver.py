"""Rank 0 of a tensor-parallel engine: the ModelRunner the engine uses, plus the ranks behind it.

The scheduler runs once, in the engine process (rank 0). Each step, before running the model, rank 0 broadcasts
what the step needs to build its batch (per request: the KV length, the tokens to run, the page tables; the
logit rows wanted) over the gloo control group; every rank builds the same batch tensors and runs its shard of
the model; the collectives inside the layers (ember/layers/linear.py, moe.py) combine the shards, and every rank
ends with the full logits. Only rank 0 samples: one sampler and one random generator, so there is nothing to keep
in step across ranks (per-request seeds, penalties and grammars live in one place) and no rank can pick a
different token; the others drop their logits. Every way the engine runs the model must go through `forward`
(a Step): a model call on rank 0 alone would wait forever for the other ranks in its first collective. A new
request field that build_batch reads has to be added to ReqView too.

Faults: any error inside a step (a rank died: gloo reports the closed connection at once) leaves the ranks out
of step, so the engine is finished: forward raises RankFailed (fatal) naming the rank and its cause, the other
ranks are stopped, and the next step raises again. A monitor thread also notices a worker that exits while the
engine is idle; inside the server's engine process it then exits the process (the API process reports it and
stops), so a dead rank never leaves a server that cannot answer.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.util
import os
import shutil
import tempfile
import threading
import time

from ember.distributed import bound_state
from ember.distributed.launcher import RankSpec, free_port, init_rank, local_worker_specs, ranks_per_node, \
    spawn_worker
from ember.engine.model_runner import ModelRunner
from ember.engine.token_window import TokenWindow

logger = logging.getLogger("ember.distributed")

MONITOR_PERIOD_S = 0.2
ENGINE_EXIT_GRACE_S = 2.0  # the engine process's own step gets this long to fail its requests first


class RankFailed(RuntimeError):
    """A rank of a tensor-parallel engine failed: the engine cannot run another step."""
    fatal = True


@dataclasses.dataclass
class ReqView:
    """What ModelRunner.build_batch reads from a request, and nothing else (a few ints a step)."""
    kv_len: int
    token_ids: TokenWindow
    page_tables: dict
    mm: object = None  # images/video (ember/multimodal): every rank attaches the same embeddings and positions
    spec_tree: object = None  # a speculative draft tree being verified (ember/speculative/tree.py)

    @classmethod
    def of(cls, req, n: int) -> "ReqView":
        a, b = req.kv_len, req.kv_len + n
        mm = getattr(req, "mm", None)
        if mm is not None and mm.items:  # only the items this step's tokens cover travel (their pixels)
            items = [it for it in mm.items if it.offset < b and it.offset + it.length > a]
            mm = dataclasses.replace(mm, items=items) if len(items) != len(mm.items) else mm
        return cls(a, TokenWindow(a, req.token_ids[a:b]), req.page_tables, mm, getattr(req, "spec_tree", None))


@dataclasses.dataclass
class Step:
    """One ModelRunner.forward call, as every rank makes it."""
    reqs: list[ReqView]
    extend_lens: list[int]
    all_positions: bool
    full_rows: list[bool] | None
    hidden: bool = False  # ModelRunner.forward_hidden (drafting on the MTP layers): every rank keeps last_hidden

    def run(self, runner):  # (ModelRunner's own forward: on rank 0 the runner is the driver, which broadcasts)
        if self.hidden:
            return ModelRunner.forward_hidden(runner, self.reqs, self.extend_lens, self.full_rows)
        return ModelRunner.forward(runner, self.reqs, self.extend_lens, self.all_positions, self.full_rows)


@dataclasses.dataclass
class KVMove:
    """One ModelRunner.move_kv call (a speculative tree's kept path), which every rank makes on its own pool."""
    moves: dict

    def run(self, runner):
        return ModelRunner.move_kv(runner, self.moves)


@dataclasses.dataclass
class DraftReqView:
    """What the MTP drafter reads from a request: its id, KV length and token ids from where its rows start."""
    rid: str
    kv_len: int
    token_ids: TokenWindow


@dataclasses.dataclass
class DrafterCall:
    """One call on the MTP drafter (ember/speculative/mtp.py), which every rank holds a replica of: its layers are
    sharded like the model's, so a draft step is a collective too. Every replica gets the same calls with the same
    requests and reads the same full logits, so all pick the same drafts and keep the same pages."""
    method: str
    args: tuple
    updates: list = dataclasses.field(default_factory=list)  # the update calls made since the last call, first

    def run(self, runner):
        if self.method == "create":
            from ember.speculative.mtp import MTPDrafter
            runner.mtp_drafter = MTPDrafter(runner, runner.model_dir, *self.args)  # (the rank's own model path)
            return None
        for args in self.updates:
            runner.mtp_drafter.update(*args)
        return getattr(runner.mtp_drafter, self.method)(*self.args)


class ReplicatedDrafter:
    """Rank 0's MTP drafter at --tp-size > 1: each call runs on every rank (a step), on requests cut to what the
    drafter reads."""
    needs_hidden = True

    def __init__(self, driver, vocab_size: int, cfg):
        self.driver = driver
        driver._everywhere(DrafterCall("create", (vocab_size, cfg)))
        self.local = driver.mtp_drafter
        self.updates: list = []  # update calls travel with the next call (a step ends with sync): one message

    def _call(self, method: str, *args):
        updates, self.updates = self.updates, []
        return self.driver._everywhere(DrafterCall(method, args, updates))

    def _views(self, reqs) -> list[DraftReqView]:
        views = []
        for r in reqs:  # the drafter reads tokens from the first position whose MTP rows are not yet valid
            st = self.local.states.get(r.rid)
            off = min(st.valid, len(r.token_ids)) if st is not None else len(r.token_ids)
            views.append(DraftReqView(r.rid, r.kv_len, TokenWindow(off, r.token_ids[off:])))
        return views

    def propose(self, reqs, caps):
        return self._call("propose", self._views(reqs), list(caps))

    def propose_tree(self, reqs, ncaps, dcaps):
        return self._call("propose_tree", self._views(reqs), list(ncaps), list(dcaps))

    def update(self, req, start, rows):
        # the view now: the update reads tokens of a state the updates before it in the batch do not touch
        self.updates.append((self._views([req])[0], start, rows))

    def sync(self, live_rids):
        self._call("sync", set(live_rids))


def make_runner(model_dir, hf_config, args):
    """The engine's ModelRunner: plain at --tp-size 1, rank 0 of the tp group otherwise."""
    if args.tp_size > 1:
        return TPDriverRunner(model_dir, hf_config, args)
    if args.base_gpu_id and args.resolved_device() == "cuda":
        import torch
        torch.cuda.set_device(args.base_gpu_id)
    return ModelRunner(model_dir, hf_config, args)


class TPDriverRunner(ModelRunner):
    def __init__(self, model_dir, hf_config, args):
        if args.node_rank != 0:
            raise ValueError("the engine runs on node 0; other nodes only run ranks (ember serve --node-rank n)")
        self.workers: dict[int, object] = {}  # rank -> Popen (this node's workers)
        self.failure: str | None = None
        self._closing = False
        self.error_dir = tempfile.mkdtemp(prefix="ember-ranks-")
        ranks_per_node(args)  # checks tp / nnodes
        if args.nnodes > 1 and not args.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (reachable from every node)")
        init_addr = args.dist_init_addr or f"127.0.0.1:{free_port()}"
        for spec in local_worker_specs(args, init_addr, self.error_dir):
            self.workers[spec.rank] = spawn_worker(args, model_dir, spec)
        threading.Thread(target=self._monitor, name="ember-rank-monitor", daemon=True).start()
        try:
            self.state = init_rank(args, RankSpec(0, args.tp_size, 0, init_addr, self.error_dir))
            import torch.distributed as dist
            with bound_state(self.state):
                super().__init__(model_dir, hf_config, args)
                dist.barrier(group=self.state[3])
        except BaseException as e:
            time.sleep(MONITOR_PERIOD_S * 2)  # let the monitor see which rank died, if one did
            cause = self.failure = self.failure or f"rank 0: {type(e).__name__}: {e}"
            self.shutdown()  # (no end message: the ranks are not all in step)
            raise RankFailed(f"tensor-parallel engine failed to start: {cause}") from e
        # the ranks end with this process, cleanly (the end message) when it exits normally
        multiprocessing.util.Finalize(self, self.shutdown, exitpriority=10)
        logger.info("tensor parallel: %d ranks over %d node(s), expert parallel %d", args.tp_size, args.nnodes,
                    args.ep_size)

    # ------------------------------------------------------------------ steps
    def forward(self, reqs, extend_lens, all_positions: bool = False, full_rows: list[bool] | None = None):
        step = Step([ReqView.of(r, n) for r, n in zip(reqs, extend_lens)], list(extend_lens), all_positions,
                    full_rows)
        return self._everywhere(step)

    def forward_hidden(self, reqs, extend_lens, full_rows):
        step = Step([ReqView.of(r, n) for r, n in zip(reqs, extend_lens)], list(extend_lens), False, list(full_rows),
                    hidden=True)
        return self._everywhere(step)

    def replicated_drafter(self, vocab_size: int, cfg) -> ReplicatedDrafter:
        return ReplicatedDrafter(self, vocab_size, cfg)

    def move_kv(self, moves: dict) -> None:
        if moves:
            self._everywhere(KVMove(moves))

    def _everywhere(self, step):
        """Run `step` on every rank: broadcast it, then run it here (rank 0)."""
        if self.failure:
            raise RankFailed(self.failure)
        import torch.distributed as dist
        try:
            with bound_state(self.state):
                dist.broadcast_object_list([step], src=0, group=self.state[3])
                return step.run(self)
        except Exception as e:  # the ranks are out of step now: nothing more can run
            time.sleep(MONITOR_PERIOD_S * 2)
            self.failure = self.failure or f"a tensor-parallel step failed: {type(e).__name__}: {e}"
            logger.error("%s", self.failure)
            self.shutdown()
            raise RankFailed(self.failure) from e

    # ------------------------------------------------------------------ faults and shutdown
    def _cause(self, rank: int, proc) -> str:
        code = proc.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        msg = f"rank {rank} (pid {proc.pid}) {how}"
        try:
            with open(os.path.join(self.error_dir, f"rank{rank}.error")) as f:
                msg += f": {f.readline().strip()}"
        except OSError:
            pass
        return msg

    def _monitor(self) -> None:
        while not self._closing:
            for rank, proc in list(self.workers.items()):
                if proc.poll() is not None and not self._closing:
                    self.failure = self.failure or self._cause(rank, proc)
                    logger.error("tensor-parallel rank failed: %s", self.failure)
                    if multiprocessing.current_process().name == "ember-engine":
                        # inside the server: a step in flight fails its requests first, then the engine exits
                        time.sleep(ENGINE_EXIT_GRACE_S)
                        self.shutdown()
                        logging.shutdown()
                        os._exit(1)
                    return
            time.sleep(MONITOR_PERIOD_S)

    def shutdown(self) -> None:
        """Stop every rank (the end message when they are healthy, signals otherwise) and leave the group."""
        if self._closing:
            return
        self._closing = True
        import torch.distributed as dist
        healthy = self.failure is None and all(p.poll() is None for p in self.workers.values())
        if healthy and getattr(self, "state", None) is not None:
            try:
                with bound_state(self.state):
                    dist.broadcast_object_list([None], src=0, group=self.state[3])
            except Exception:  # noqa: BLE001 - fall through to the signals
                healthy = False
        deadline = time.monotonic() + (5.0 if healthy else 0.0)
        for proc in self.workers.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - still running
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(self.error_dir, ignore_errors=True)
