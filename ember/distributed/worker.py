"""A worker rank (every rank but 0): loads its shard of the model and KV cache, then runs each step rank 0
broadcasts, until rank 0 sends the end (None) or a peer fails.

Started by ember/distributed/launcher.py as `python -m ember.distributed.worker` with its configuration pickled
on stdin. It dies with the process that started it (PR_SET_PDEATHSIG and a parent poll), and a failure leaves
its traceback in the engine's error directory so that rank 0 reports the cause, not just an exit code.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import traceback

logger = logging.getLogger("ember.distributed")


def serve(runner, cpu_group) -> None:
    """Steps until rank 0 says stop: the same ModelRunner.forward call as rank 0 (its logits are not used)."""
    import torch.distributed as dist
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=cpu_group)
        step = box[0]
        if step is None:
            return
        step.run(runner)


def main() -> None:
    args, model_dir, spec, parent_pid = pickle.load(sys.stdin.buffer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine (rank 0) decides when ranks stop
    from ember.engine.engine_process import _configure_logging, _die_with_parent
    _die_with_parent(parent_pid)
    _configure_logging(args.log_level)
    try:
        import torch.distributed as dist
        from transformers import AutoConfig

        from ember.distributed import set_ep_size, set_tp_group
        from ember.distributed.launcher import init_rank
        from ember.engine.model_runner import ModelRunner

        group, rank, size, cpu, ep = init_rank(args, spec)
        set_tp_group(group, rank, size, cpu)
        set_ep_size(ep)
        hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
        runner = ModelRunner(model_dir, hf_config, args)
        dist.barrier(group=cpu)  # every rank loaded: rank 0 reports ready
        serve(runner, cpu)
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - leave the cause for rank 0, then exit non-zero
        logger.error("rank %d failed: %s", spec.rank, e, exc_info=True)
        if spec.error_dir:
            try:
                with open(os.path.join(spec.error_dir, f"rank{spec.rank}.error"), "w") as f:
                    f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            except OSError:
                pass
        logging.shutdown()
        os._exit(1)
    logging.shutdown()
    os._exit(0)  # skip interpreter teardown (threads of torch / OpenMP)


if __name__ == "__main__":
    main()
