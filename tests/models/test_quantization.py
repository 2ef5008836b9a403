"""--quantization int8|int4|w8a8_int8: the CPU kernels stay within a stated tolerance of the exact fp32 path."""
import pytest
import torch

from ember.layers.quantization import Int4Linear, Int8Linear, W8A8Linear

# Stated tolerances (SmolLM2-135M, a chat prompt; fp32 is the reference):
#   mean KL(fp32 || quantized) per prompt position, and top-1 agreement of the next-token prediction.
# (w8a8_int8 is looser on SmolLM2 than on Qwen2.5-Coder-0.5B, where its KL is 0.010 against int4's 0.037:
# SmolLM2's activations have outlier channels that per-token int8 flattens.)
TOLERANCE = {"int8": (0.03, 0.9), "int4": (0.15, 0.75), "w8a8_int8": (0.15, 0.8)}


def test_quantized_linear_layers_approximate_fp32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384, bias=True)
    x = torch.randn(7, 256)
    ref = lin(x)
    for cls, tol in ((Int8Linear, 0.01), (Int4Linear, 0.1), (W8A8Linear, 0.02)):
        rel = ((cls(lin)(x) - ref).norm() / ref.norm()).item()
        assert rel < tol, (cls.__name__, rel)


def test_w8a8_rows_do_not_depend_on_the_batch():
    """Activations are quantized per token, so a request's result is the same alone or in any batch."""
    torch.manual_seed(0)
    layer = W8A8Linear(torch.nn.Linear(256, 384, bias=True))
    x = torch.randn(9, 256) * torch.logspace(-2, 2, 9)[:, None]  # rows of very different scales
    batched = layer(x)
    for i in range(len(x)):
        assert torch.equal(layer(x[i:i + 1]), batched[i:i + 1]), i


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8_int8"])
def test_quantized_model_within_tolerance(method, engine_for):
    exact = engine_for("smollm2")
    quant = engine_for("smollm2", quantization=method)
    ids = exact.tokenizer.apply_chat_template([{"role": "user", "content": "Explain what a hash map is."}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False)
    ref, got = exact.core.prompt_logits(ids), quant.core.prompt_logits(ids)
    kl = torch.nn.functional.kl_div(torch.log_softmax(got, -1), torch.log_softmax(ref, -1),
                                    log_target=True, reduction="none").sum(-1).mean().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    max_kl, min_top1 = TOLERANCE[method]
    assert kl < max_kl and top1 > min_top1, f"{method}: mean KL {kl:.4f}, top-1 agreement {top1:.3f}"
    out = quant.generate(input_ids=ids, sampling_params={"max_new_tokens": 16, "temperature": 0})
    assert out["text"].strip()
