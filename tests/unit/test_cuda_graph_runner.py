"""The CUDA-graph decode runner (ember/engine/cuda_graph_runner.py) without a GPU: everything but the capture, i.e.
the static buffers, the copy of each step's metadata into them, padding up to a captured batch size and split-K
sized for the longest context, run on CPU under Triton's interpreter (capture=False runs the forward on the static
buffers at every step). Tiny models in an engine give the same tokens with it as without it: dense (Qwen3),
sliding-window + full layers (Gemma 3: two KV groups), MLA + MoE on the Triton runner (GLM-4.7-Flash)."""
import random

import pytest

pytest.importorskip("triton", minversion="3.9")

from ember.engine.cuda_graph_runner import DecodeGraphRunner, capture_sizes, why_not_graphs  # noqa: E402
from ember.server_args import ServerArgs  # noqa: E402


pytestmark = pytest.mark.usefixtures("triton_interpret")


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(10) == [1, 2, 4, 8, 10]
    assert capture_sizes(32) == [1, 2, 4, 8, 12, 16, 24, 32]
    assert capture_sizes(40)[-3:] == [24, 32, 40] and capture_sizes(41)[-2:] == [40, 41]


@pytest.mark.parametrize("kind, moe", [("qwen3", None), ("gemma3", None), ("glm4_moe_lite", "triton")])
def test_padded_static_buffer_decode_gives_the_eager_tokens(kind, moe, tmp_path_factory):
    from ember import Engine
    from tests.tiny_models import tiny_model
    path = tiny_model(kind, tmp_path_factory.mktemp("tiny") / kind)
    rng = random.Random(5)
    base = [rng.randint(3, 200) for _ in range(21)]  # (past Gemma's 16-token window)
    prompts = [base + [rng.randint(3, 200) for _ in range(rng.randint(0, 9))] for _ in range(5)]
    sampling = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    outputs, sizes = {}, []
    for graphs in (False, True):
        engine = Engine(model_path=str(path), dtype="float32", device="cpu", attention_backend="triton",
                        moe_runner_backend=moe or "auto", page_size=4, max_total_tokens=1024, context_length=200)
        runner = engine.core.runner
        assert runner.graph_runner is None  # (on CPU: no CUDA graphs)
        if graphs:
            graph_runner = runner.graph_runner = DecodeGraphRunner(runner, max_bs=8, max_context=200, capture=False)
            run = graph_runner.run

            def checked(reqs):
                """The step, then: rows past the batch up to its captured size are padding, which reads one key
                and writes only the padding page's slot 0 (stale rows of a bigger earlier batch would write into
                slots that are another request's now)."""
                logits = run(reqs)
                B, bs = len(reqs), next(s for s in graph_runner.sizes if s >= len(reqs))
                sizes.append(B)
                assert logits.shape[0] == B
                for m in graph_runner.meta.values():
                    assert m.write_slots[B:bs].eq(0).all() and m.seq_lens[B:bs].eq(1).all()
                    assert m.page_table[B:bs, 0].eq(0).all()
                return logits
            graph_runner.run = checked
        five = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=sampling)]
        three = [o["output_ids"] for o in engine.generate(input_ids=prompts[1:4], sampling_params=sampling)]
        one = engine.generate(input_ids=prompts[0], sampling_params=sampling)["output_ids"]
        outputs[graphs] = five + three + [one]
        del engine
    assert {1, 3, 5} <= set(sizes)  # padded to 1, 4 and 8: rows of padding beside the requests
    assert outputs[True] == outputs[False]


def test_why_not_graphs():
    class Runner:
        device, attn_backend = "cuda", type("B", (), {"name": "triton"})()
        model = type("M", (), {"modules": lambda self: []})()
    runner = Runner()
    assert why_not_graphs(runner, ServerArgs()) is None
    assert why_not_graphs(runner, ServerArgs(disable_cuda_graph=True)) == "--disable-cuda-graph"
    runner.attn_backend = type("B", (), {"name": "torch"})()
    assert "--attention-backend triton" in why_not_graphs(runner, ServerArgs())
    runner.device = "cpu"
    assert why_not_graphs(runner, ServerArgs()) == "not on CUDA"
    from ember.layers.moe import MoEExperts
    runner.device, runner.attn_backend.name = "cuda", "triton"
    runner.model = type("M", (), {"modules": lambda self: [MoEExperts(4, 8, 8)]})()
    assert "--moe-runner-backend triton" in why_not_graphs(runner, ServerArgs())
