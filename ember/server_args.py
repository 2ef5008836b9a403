"""Every flag in one dataclass, validated once. Flag names follow SGLang's."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ServerArgs:
    model_path: str | None = None  # None: the bundled default model
    served_model_name: str | None = None
    tokenizer_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available else cpu
    context_length: int | None = None
    mem_fraction_static: float = 0.8  # share of free GPU memory for weights+KV (GPU)
    cpu_kv_cache_gb: float = 2.0  # KV pool budget on CPU
    max_total_tokens: int | None = None  # cap the KV pool at this many tokens (overrides the budgets)
    page_size: int = 16
    max_running_requests: int = 64
    max_queued_requests: int | None = None
    chunked_prefill_size: int = 2048
    max_prefill_tokens: int = 8192
    disable_radix_cache: bool = False
    tp_size: int = 1
    ep_size: int = 1
    dp_size: int = 1
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    chat_template: str | None = None
    trust_remote_code: bool = False
    disable_cuda_graph: bool = False
    log_level: str = "info"
    speculative_algorithm: str | None = None
    speculative_draft_model_path: str | None = None
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    enable_multi_layer_eagle: bool = False
    quantization: str | None = None  # int8 | int4 | w8a8_int8 | w4a8: CPU only (fp32 stays exact)
    disable_fused_decode: bool = False  # w4a8 Llama/Qwen2 decode steps: the torch path instead of the fused C++ one
    # "model": sampling fields a request leaves unset come from the model's generation_config.json
    # (as SGLang and vLLM do); "openai": the OpenAI API defaults (temperature 1, top_p 1, ...)
    sampling_defaults: str = "model"
    random_seed: int = 0
    num_threads: int | None = None  # torch threads on CPU (default: all cores)
    # Files API (/v1/files): where uploads are kept (None: a temporary directory, removed at exit)
    file_storage_path: str | None = None
    file_max_bytes: int = 128 * 1024 * 1024  # 128 MiB, the video limit seed 004 states; larger uploads get 413

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs) -> "ServerArgs":
        unknown = set(kwargs) - cls.field_names()
        if unknown:
            raise TypeError(f"unknown server argument(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        import torch
        if self.dtype == "auto":
            return torch.float32 if self.resolved_device() == "cpu" else torch.bfloat16
        table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
        if self.dtype not in table:
            raise ValueError(f"--dtype {self.dtype!r} is not supported (choose from auto, {', '.join(table)})")
        return table[self.dtype]
