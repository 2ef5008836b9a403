#!/usr/bin/env bash
# Issue 18's GPU checks, for a lent H100/H200 (~15 minutes of device time in all, at most 10 per call):
#   here, once:        bash benchmarks/gpu_wheels.sh      (the packages the machine lacks, in .whl/)
#   the device tool:   run(command="bash benchmarks/gpu_run.sh tests", carry=[".whl"], timeout_s=300), then at once
#                      (the machine stays warm) run(command="bash benchmarks/gpu_run.sh bench", carry=[".whl"],
#                      timeout_s=590): the estimate for both is ~3 + ~8 minutes; `all` runs them in one call.
# Parts (first argument): tests | bench | all. Logs and results land in $OUT (the tool brings them back).
#   tests: the CUDA-graph MoE check (tests/unit/test_cuda_graphs_gpu.py: graphs vs --disable-cuda-graph), then the
#          tiny-model tests vs transformers on CUDA with Triton attention + Triton MoE, CUDA graphs off, then on.
#   bench: benchmarks/gpu_bench.py (copy bandwidth, Qwen2.5-0.5B and -7B shapes, ember vs transformers).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ember-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OMP_WAIT_POLICY=PASSIVE \
  TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
part=${1:-all}
start=$(date +%s)
if [ "$part" = tests ] || [ "$part" = all ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -o timeout=110 tests/unit/test_cuda_graphs_gpu.py 2>&1 \
    | tee "$OUT/tests_cuda_graphs.log" | tail -3
  TESTS="tests/models/test_vs_transformers.py::test_tiny_gemma3_window_with_small_chunks
    tests/models/test_step3p5.py::test_batched_prompts_of_different_lengths_equal_solo
    tests/models/test_step3p5.py::test_small_chunks_and_pages_past_the_window
    tests/models/test_glm4_moe_lite.py::test_batched_prompts_of_different_lengths_equal_solo
    tests/models/test_glm4_moe_lite.py::test_chunked_prefill_and_small_pages_match_the_reference
    tests/models/test_glm4_moe_lite.py::test_prefix_cache_reuses_latent_rows
    tests/models/test_moe_models.py::test_batched_generation_equals_alone
    tests/models/test_spec_tree.py::test_tree_mask_gives_each_node_the_logits_of_its_path"
  for kind in tiny-qwen3 tiny-llama tiny-qwen2 tiny-gemma3 tiny-qwen3-moe tiny-minimax-m2 tiny-glm4-moe-lite tiny-step3p5; do
    TESTS="$TESTS tests/models/test_vs_transformers.py::test_logits_and_32_greedy_tokens_match[$kind]"
  done
  for graphs in off on; do
    disable=$([ $graphs = off ] && echo true || echo false)
    EMBER_TEST_DEVICE=cuda EMBER_TEST_SERVER_ARGS="{\"attention_backend\": \"triton\", \"moe_runner_backend\": \"triton\",
      \"disable_cuda_graph\": $disable, \"max_total_tokens\": 65536}" \
      timeout 150 python3 -m pytest -q -p no:cacheprovider -o timeout=140 $TESTS 2>&1 \
      | tee "$OUT/tests_models_graphs_$graphs.log" | tail -3
  done
  echo "[tests: $(( $(date +%s) - start )) s]"
fi
if [ "$part" = bench ] || [ "$part" = all ]; then
  timeout $(( 570 - ($(date +%s) - start) )) python3 benchmarks/gpu_bench.py --out "$OUT" 2>&1 \
    | tee "$OUT/bench.log" | grep -v "^ " | tail -30
fi
echo "[total: $(( $(date +%s) - start )) s]"
