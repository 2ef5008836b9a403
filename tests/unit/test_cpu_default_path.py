"""Fast by default (issue 12): with no --quantization, a CPU server runs a model from a quantized GGUF on the
fastest quantized path not more quantized than the file, and everything else on the exact float path."""
import json

import pytest

from ember import kernels
from ember.engine.cpu_default_path import choose_weights_path
from ember.loader.gguf_convert import MARKER_FILE, converted_weight_bits


def _converted(tmp_path, qtype, bits):
    d = tmp_path / qtype
    d.mkdir()
    (d / MARKER_FILE).write_text(json.dumps({"source": "/gone.gguf", "weight_bits": bits, "quant_type": qtype}))
    return d


@pytest.mark.parametrize("qtype,bits,method", [("Q4_1", 5.0, "w4a8"), ("Q4_K_M", 5.5, "w4a8"), ("IQ4_XS", 4.25, "w4a8"),
                                               ("Q3_K", 3.4, "w4a8"), ("Q5_0", 5.5, "w8a8_int8"),
                                               ("Q6_K", 6.6, "w8a8_int8"), ("Q8_0", 8.5, "w8a8_int8"),
                                               ("F16", 16.0, None), ("BF16", 16.0, None)])
def test_a_quantized_gguf_gets_the_fastest_path_not_more_quantized_than_the_file(tmp_path, monkeypatch, qtype,
                                                                                 bits, method):
    monkeypatch.setattr(kernels, "default_variant", lambda: "avx2")
    path = choose_weights_path(None, "auto", "cpu", 1, _converted(tmp_path, qtype, bits))
    assert path.quantization == method, path
    assert qtype in path.reason


def test_everything_else_keeps_the_exact_path(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "default_variant", lambda: "avx2")
    q4 = _converted(tmp_path, "Q4_1", 5.0)
    assert choose_weights_path("none", "auto", "cpu", 1, q4).quantization is None
    assert choose_weights_path(None, "float32", "cpu", 1, q4).quantization is None  # explicit --dtype
    assert choose_weights_path(None, "auto", "cuda", 1, q4).quantization is None
    assert choose_weights_path(None, "auto", "cpu", 2, q4).quantization is None  # tensor parallel
    assert choose_weights_path(None, "auto", "cpu", 1, tmp_path).quantization is None  # not from a GGUF
    assert choose_weights_path("int8", "float32", "cpu", 1, tmp_path).quantization == "int8"  # asked for
    monkeypatch.setattr(kernels, "default_variant", lambda: "portable")
    assert choose_weights_path(None, "auto", "cpu", 1, q4).quantization is None  # no AVX2: no fast kernel


def test_the_bundled_ggufs_bits_are_read_from_the_file(smollm2_dir, qwen_dir):
    bits, qtype = converted_weight_bits(smollm2_dir)
    assert qtype == "Q4_1" and bits == pytest.approx(5.0)
    # the file type the GGUF declares, not its layers' most common type (Q5_0: rows of 896 are no 256-blocks)
    bits, qtype = converted_weight_bits(qwen_dir)
    assert qtype == "Q4_K_M" and 5.0 < bits < 6.0
