"""The fused RoPE kernel (ember/layers/rotary_triton.py) under Triton's interpreter against RotaryEmbedding's torch
form: full and partial rotary, q and k as strided views of one projection (as the models pass them), head counts
that are not powers of 2, float32 and float16."""
import pytest
import torch
from transformers import Qwen2Config

from tests.triton_interpreter import interpreted

with interpreted():
    pytest.importorskip("triton", minversion="3.9")
    from ember.layers import rotary_triton

from ember.layers.rotary import RotaryEmbedding  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpret")


def test_the_kernel_is_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(rotary_triton._rope_kernel, InterpretedFunction)


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rope_matches_the_torch_form(partial, dtype):
    torch.manual_seed(0)
    H, Hkv, D, T = 5, 1, 32, 11
    cfg = Qwen2Config(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=Hkv,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial})
    rot = RotaryEmbedding(cfg, D, 512)
    assert rot.rotary_dim == int(D * partial)
    qkv = torch.randn(T, (H + 2 * Hkv) * D).to(dtype)
    q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k = q.view(T, H, D), k.view(T, Hkv, D)  # strided views, as the attention layers pass them
    positions = torch.randint(0, 512, (T,))
    want_q, want_k = rot(positions, q.float(), k.float())
    rot.fused = True
    got_q, got_k = rot(positions, q, k)
    assert got_q.dtype == dtype and got_q.is_contiguous() and got_k.is_contiguous()
    # float32: summation order; float16: the output's own rounding (values up to ~4: steps of 0.002-0.004)
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=4e-3, rtol=0)
    torch.testing.assert_close(got_q.float(), want_q, **tol)
    torch.testing.assert_close(got_k.float(), want_k, **tol)
    if partial < 1:  # the dims past rotary_dim are the input's
        assert torch.equal(got_q[..., rot.rotary_dim:], q[..., rot.rotary_dim:])
