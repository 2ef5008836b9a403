"""GPU data point (run on a lent H100/H200): ember's engine vs a plain transformers generate loop on a
Qwen2.5-0.5B-shaped model with random weights (no model hub there; the compute is the same), bf16.

    python benchmarks/gpu_smoke.py            # prints a markdown table
"""
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def make_model(path: pathlib.Path) -> pathlib.Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tests.tiny_models import byte_level_tokenizer
    if (path / "config.json").exists():
        return path
    tok = byte_level_tokenizer()
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, rope_theta=1000000.0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main():
    path = make_model(pathlib.Path("/tmp/qwen05b-random"))
    from ember import Engine
    engine = Engine(model_path=str(path), dtype="bfloat16")
    rows = []
    prompt = list(range(300, 556))  # 256 prompt tokens
    for batch in (1, 16, 64):
        params = {"max_new_tokens": 128, "temperature": 0, "ignore_eos": True}
        engine.generate(input_ids=[prompt] * batch, sampling_params=params)  # warm-up: same shapes
        engine.flush_cache()
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate(input_ids=[[b] + prompt for b in range(batch)], sampling_params=params)
        torch.cuda.synchronize()
        rows.append(("ember", batch, batch * 128 / (time.perf_counter() - t)))
    del engine
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    for batch in (1, 16, 64):
        ids = torch.tensor([[b] + prompt for b in range(batch)], device="cuda")
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
            torch.cuda.synchronize()
        rows.append(("transformers generate", batch, batch * 128 / (time.perf_counter() - t)))
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| engine | batch | output tok/s (prompt 256, output 128, bf16) |\n|---|---|---|")
    for name, batch, tps in rows:
        print(f"| {name} | {batch} | {tps:.0f} |")


if __name__ == "__main__":
    main()
