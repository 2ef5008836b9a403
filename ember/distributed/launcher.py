"""Starting an engine's rank processes and joining them with torch.distributed.

Rank layout: one engine runs --tp-size ranks, spread evenly over --nnodes machines: node n holds ranks
n*k .. n*k+k-1 (k = tp / nnodes; local rank i of a node uses GPU --base-gpu-id + i on CUDA). Rank 0 is the
engine process itself (on node 0): it runs the one scheduler, broadcasts each step's batch, runs its shard of the
model and samples. Every other rank is a worker process (ember/distributed/worker.py) that receives the batch
and runs its shard; node 0's engine process starts node 0's workers, `ember serve --node-rank n` starts node n's.

Backends: gloo on CPU, NCCL on CUDA for the model's collectives, plus a gloo group over the same ranks for the
per-step control message (a pickled Python object is cheapest over the CPU transport).
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import subprocess
import sys
from dataclasses import dataclass

logger = logging.getLogger("ember.distributed")

# Workers wait for the next step inside a broadcast for as long as the engine is idle, so the control group
# cannot time out; a rank that dies is noticed by its peers' closed connections and by the engine's monitor.
IDLE_TIMEOUT = datetime.timedelta(days=365)
# The rendezvous and the model's collectives (which never wait for an idle engine) give up after this.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class RankSpec:
    rank: int
    world_size: int
    local_rank: int
    init_addr: str  # host:port where rank 0's rendezvous store listens
    error_dir: str | None = None  # where a rank that fails leaves its traceback (rank<r>.error)


def ranks_per_node(args) -> int:
    if args.tp_size % args.nnodes:
        raise ValueError(f"--tp-size {args.tp_size} is not divisible by --nnodes {args.nnodes}")
    return args.tp_size // args.nnodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(args, spec: RankSpec) -> tuple:
    """Join the group as spec.rank; -> the tp state (ember.distributed.current_state() layout) of this engine."""
    import torch
    import torch.distributed as dist

    device = args.resolved_device()
    if device == "cuda":
        torch.cuda.set_device(args.base_gpu_id + spec.local_rank)
    elif device == "cpu" and not args.num_threads and spec.rank:
        # the node's ranks share its cores (rank 0 keeps torch's setting: it may be a user's own process)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_per_node(args)))
    if dist.is_initialized():
        raise RuntimeError("this process already holds a torch.distributed group: one engine with --tp-size > 1 "
                           "per process at a time (shut the other one down first)")
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{spec.init_addr}", rank=spec.rank,
                            world_size=spec.world_size, timeout=COLLECTIVE_TIMEOUT)
    world = dist.group.WORLD
    cpu = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    if args.ep_size < 1 or args.tp_size % args.ep_size:
        raise ValueError(f"--ep-size {args.ep_size} must divide --tp-size {args.tp_size}")
    logger.info("rank %d/%d joined (%s%s)", spec.rank, spec.world_size, backend,
                f", cuda:{torch.cuda.current_device()}" if device == "cuda" else "")
    return world, spec.rank, spec.world_size, cpu, args.ep_size


def spawn_worker(args, model_dir: str, spec: RankSpec) -> subprocess.Popen:
    """One worker process for spec.rank; its configuration goes in over stdin (no command line to escape)."""
    proc = subprocess.Popen([sys.executable, "-m", "ember.distributed.worker"], stdin=subprocess.PIPE)
    proc.stdin.write(pickle.dumps((args, str(model_dir), spec, os.getpid())))
    proc.stdin.close()
    logger.info("rank %d: worker process %d", spec.rank, proc.pid)
    return proc


def local_worker_specs(args, init_addr: str, error_dir: str | None) -> list[RankSpec]:
    """The worker ranks this node starts (node 0: all of its ranks but rank 0, the engine process)."""
    k = ranks_per_node(args)
    first = args.node_rank * k
    return [RankSpec(first + i, args.tp_size, i, init_addr, error_dir) for i in range(k) if first + i != 0]


def run_worker_node(args) -> int:
    """`ember serve --nnodes N --node-rank n` (n > 0): run this node's ranks (no HTTP) until they exit."""
    import signal

    from ember.loader import resolve_model_dir

    if not args.dist_init_addr:
        raise ValueError("--node-rank > 0 needs --dist-init-addr HOST:PORT (node 0's address)")
    model_dir = resolve_model_dir(args.model_path)
    procs = [spawn_worker(args, model_dir, spec) for spec in local_worker_specs(args, args.dist_init_addr, None)]

    def stop(*_):
        for p in procs:
            if p.poll() is None:
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    for p in procs:
        code = p.wait() or code
    return code
