"""CUDA graphs on a GPU (skipped without one; benchmarks/gpu_run.sh runs this on a lent GPU): tiny MoE models
(Step-3.5: sliding-window + full layers, sigmoid MoE with a shared expert; GLM-4.7-Flash: MLA, grouped MoE) on
Triton attention and the Triton MoE runner, decode replayed from captured graphs, give the tokens of the same
engine with --disable-cuda-graph, and their logits agree. tests/unit/test_cuda_graph_runner.py checks everything
but the capture on CPU."""
import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kind", ["step3p5", "glm4_moe_lite"])
def test_cuda_graph_decode_gives_the_eager_tokens(kind, tmp_path_factory):
    from ember import Engine
    from tests.tiny_models import tiny_model
    path = tiny_model(kind, tmp_path_factory.mktemp("tiny") / kind)
    rng = random.Random(6)
    base = [rng.randint(3, 200) for _ in range(21)]
    prompts = [base + [rng.randint(3, 200) for _ in range(rng.randint(0, 9))] for _ in range(5)]
    sampling = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    outputs, logits = {}, {}
    for graphs in (True, False):
        engine = Engine(model_path=str(path), dtype="float32", device="cuda", attention_backend="triton",
                        moe_runner_backend="triton", disable_cuda_graph=not graphs, cuda_graph_max_bs=8,
                        page_size=4, max_total_tokens=4096, context_length=256)
        graph_runner = engine.core.runner.graph_runner
        assert (graph_runner is not None) == graphs
        if graphs:
            assert sorted(graph_runner.graphs) == [1, 2, 4, 8]
            replays = []
            run = graph_runner.run
            graph_runner.run = lambda reqs: replays.append(len(reqs)) or run(reqs)
        five = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=sampling)]
        three = [o["output_ids"] for o in engine.generate(input_ids=prompts[1:4], sampling_params=sampling)]
        one = engine.generate(input_ids=prompts[0], sampling_params=sampling)["output_ids"]
        outputs[graphs] = five + three + [one]
        # one decode step's logits at batch 3 (padded to 4), through ModelRunner.forward as the engine calls it
        core = engine.core
        from ember.engine.io_struct import GenerateReq
        from ember.engine.sampling_params import SamplingParams
        for i, p in enumerate(prompts[:3]):
            core.add_request(GenerateReq(rid=f"l{i}", input_ids=p,
                                         sampling=SamplingParams(max_new_tokens=2, temperature=0)))
        core.step()  # prefill (eager) and the first token
        batch = core.scheduler.schedule()
        logits[graphs] = core.runner.forward(batch.reqs, batch.extend_lens).float().cpu()
        if graphs:
            assert {1, 3, 5} <= set(replays)
        engine.shutdown()
        del engine
        torch.cuda.empty_cache()
    assert outputs[True] == outputs[False]
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)
