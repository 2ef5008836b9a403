"""Every Triton kernel launch that tiny bfloat16 engines (Qwen3, Gemma 3, GLM-4.7-Flash, Step-3.5) make with all
the Triton paths on compiles for sm_90: what benchmarks/gpu_run.sh will launch on a GPU, recorded on CPU under the
interpreter (tests/triton_launches.py), then compiled in a process without it."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_LIMIT = 227 * 1024  # bytes per block on sm_90


def _python(code: str, interpret: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_every_launch_of_the_tiny_engines_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton", minversion="3.9")
    launches = tmp_path / "launches.json"
    _python(f"import json, pathlib; from tests.triton_launches import record; "
            f"json.dump(record(pathlib.Path({str(tmp_path)!r})), open({str(launches)!r}, 'w'), default=str)", True)
    recorded = json.loads(launches.read_text())
    names = {launch["name"] for launch in recorded}
    assert names >= {"_decode_kernel", "_extend_kernel", "_mla_decode_kernel", "_grouped_gemm_kernel", "_rope_kernel",
                     "_rms_norm_kernel", "_silu_and_mul_kernel"}, names
    out = _python(f"import json; from tests.triton_launches import compile_all; "
                  f"print(json.dumps(compile_all(json.load(open({str(launches)!r})))))", False)
    compiled = json.loads(out.strip().splitlines()[-1])
    assert len(compiled) == len(recorded) and all(shared <= SHARED_LIMIT for _, shared in compiled)
