"""Every flag in one dataclass, its help text and its checks, in one place. Flag names follow SGLang's."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from dataclasses import dataclass, field

logger = logging.getLogger("ember.cli")


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
    attention_backend: str | None = None  # None: torch (ember/attention)
    moe_runner_backend: str = "auto"  # auto: torch (ember/layers/moe_runner.py)
    max_running_requests: int = 64
    max_queued_requests: int | None = None
    chunked_prefill_size: int = 2048
    max_prefill_tokens: int = 8192
    disable_radix_cache: bool = False
    enable_metrics: bool = False  # SGLang's flag; ember always collects (ember/api/metrics.py)
    tp_size: int = 1
    ep_size: int = 1
    dp_size: int = 1
    base_gpu_id: int = 0  # CUDA: local rank i uses GPU base_gpu_id + i
    nnodes: int = 1  # the --tp-size ranks spread over this many machines
    node_rank: int = 0  # 0 runs the engine and HTTP; the others only run ranks
    dist_init_addr: str | None = None  # HOST:PORT of node 0's rendezvous (needed with --nnodes > 1)
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    chat_template: str | None = None
    trust_remote_code: bool = False
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None  # None: min(128, max_running_requests)
    disable_overlap_schedule: bool = False
    log_level: str = "info"
    speculative_algorithm: str | None = None
    speculative_draft_model_path: str | None = None
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    enable_multi_layer_eagle: bool = False
    speculative_ngram_min_match_window_size: int = 1
    speculative_ngram_max_match_window_size: int = 12
    speculative_ngram_max_bfs_breadth: int = 1  # SGLang's default is 10; 1 keeps ember's NGRAM a chain
    speculative_draft_min_confidence: float = 0.0  # STANDALONE: stop drafting after a token the draft is unsure of
    speculative_token_map: str | None = None  # STANDALONE: the draft scores only these token ids (SGLang's flag)
    speculative_disable_by_batch_size: int | None = None  # (vLLM's) no drafts in a step with this many decoding requests
    quantization: str | None = None  # none | int8 | int4 | w8a8_int8 | w4a8: CPU only; None: chosen (engine/cpu_default_path.py)
    disable_fused_decode: bool = False  # w4a8 Llama/Qwen2 decode steps: the torch path instead of the fused C++ one
    # "model": sampling fields a request leaves unset come from the model's generation_config.json
    # (as SGLang and vLLM do); "openai": the OpenAI API defaults (temperature 1, top_p 1, ...)
    sampling_defaults: str = "model"
    random_seed: int = 0
    # images and video (ember/multimodal): URL fetching, sizes, counts
    allow_private_media_urls: bool = False
    max_images_per_request: int = 16
    max_image_mb: int = 20
    max_video_mb: int = 128
    max_video_seconds: float = 300.0
    media_fetch_timeout: float = 15.0
    num_threads: int | None = None  # torch threads on CPU (default: all cores)
    # Files API (/v1/files): where uploads are kept (None: files/ under ember's data directory)
    file_storage_path: str | None = None
    file_max_bytes: int = 128 * 1024 * 1024  # 128 MiB, the video limit seed 004 states; larger uploads get 413
    # SIGTERM/SIGINT: new requests get 503 while the ones in flight get this long to finish (then aborted)
    graceful_shutdown_timeout: float = 20.0
    # a single engine step running longer than this is a hang: the engine exits and so does the server
    watchdog_timeout: float = 300.0

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


# One help string per ServerArgs field (a test checks that every field has one).
HELP: dict[str, str] = {
    "model_path": "Model to serve: a local directory (HF layout), a .gguf file, a hub id, or a bundled "
                  "alias such as smollm2-135m. Default: the bundled Qwen2.5-Coder-0.5B-Instruct.",
    "served_model_name": "Name listed by /v1/models and reported in responses (default: the model path).",
    "tokenizer_path": "Tokenizer to use if not the model's own.",
    "host": "Host to listen on (0.0.0.0 for all interfaces).",
    "port": "Port to listen on.",
    "api_key": "If set, every route but /health requires `Authorization: Bearer <key>`.",
    "dtype": "Weight and activation dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.",
    "device": "Device to run on: auto, cpu or cuda.",
    "context_length": "Maximum context length (default: from the model config).",
    "mem_fraction_static": "Fraction of GPU memory for weights and KV cache (GPU only).",
    "cpu_kv_cache_gb": "KV cache budget in GiB on CPU.",
    "max_total_tokens": "Cap the KV cache at this many tokens (overrides the memory budgets).",
    "page_size": "Tokens per KV cache page.",
    "attention_backend": "Attention kernels: torch (gather + SDPA; any device, the CPU default), triton (paged "
                         "decode/extend kernels reading K/V from the pages; CUDA, opt-in until run on a GPU; on CPU only "
                         "under TRITON_INTERPRET=1, for tests) or flashinfer (not implemented yet).",
    "moe_runner_backend": "MoE expert kernels: auto (= torch today), torch (a GEMM pair per chosen expert; the CPU "
                          "group kernel when quantized) or triton (two grouped GEMMs over all experts; CUDA, opt-in "
                          "until run on a GPU; on CPU only under TRITON_INTERPRET=1, for tests).",
    "max_running_requests": "Maximum number of requests decoding at once.",
    "max_queued_requests": "Maximum number of waiting requests; beyond it requests get 503 (default: no limit).",
    "chunked_prefill_size": "Maximum prompt tokens prefilled in one step (long prompts are chunked).",
    "max_prefill_tokens": "Maximum prompt tokens prefilled in one step over all requests (caps --chunked-prefill-size).",
    "disable_radix_cache": "Disable prefix caching.",
    "enable_metrics": "Accepted for SGLang compatibility: /metrics (SGLang's Prometheus metric names) is always on.",
    "tp_size": "Tensor parallel size: ranks (processes; one GPU each on CUDA) that each hold a shard of the model.",
    "ep_size": "Expert parallel size (divides --tp-size): each MoE layer's experts are split over this many groups "
               "of tp/ep ranks.",
    "dp_size": "Data parallel size: engine replicas (each with --tp-size ranks) behind one HTTP front; a request "
               "goes to the replica with the fewest in flight.",
    "base_gpu_id": "First GPU to use: local rank i runs on GPU base-gpu-id + i (CUDA).",
    "nnodes": "Machines the --tp-size ranks are spread over (evenly).",
    "node_rank": "This machine's index among --nnodes: 0 runs the engine and the HTTP server, the others only "
                 "run their ranks.",
    "dist_init_addr": "HOST:PORT where node 0's rank 0 accepts the other ranks (needed with --nnodes > 1; "
                      "default: a free port on 127.0.0.1).",
    "tool_call_parser": "Parser that turns model output into OpenAI tool_calls (e.g. qwen25, step3p5, glm47). "
                        "Default for Qwen2 models: qwen25 when a request has tools.",
    "reasoning_parser": "Parser that separates reasoning into `reasoning_content` (e.g. qwen3, deepseek-r1, step3p5).",
    "chat_template": "Chat template: a path to a Jinja file, or the template text itself "
                     "(default: the tokenizer's own).",
    "trust_remote_code": "Allow custom model/tokenizer code from the model repository (passed to transformers).",
    "disable_cuda_graph": "Disable CUDA graphs (a no-op on CPU). On CUDA, decode steps are replayed from CUDA graphs "
                          "when the step can be captured: --attention-backend triton, MoE experts on "
                          "--moe-runner-backend triton, --tp-size 1 (the log says why not otherwise).",
    "disable_overlap_schedule": "Disable overlap scheduling (on CUDA, decode step N+1 is launched before step N's "
                                "tokens are read, so the host's work overlaps the GPU's; a no-op on CPU).",
    "cuda_graph_max_bs": "Largest decode batch replayed from a CUDA graph (graphs are captured at start for 1, 2, 4, "
                         "8, 12, 16, 24, ... up to it; larger batches run eagerly). Default: min(128, "
                         "--max-running-requests).",
    "log_level": "Logging level: debug, info, warning, error, critical.",
    "speculative_algorithm": "Speculative decoding: EAGLE / NEXTN (the model's own MTP layers), STANDALONE (a draft model), NGRAM.",
    "speculative_draft_model_path": "Draft model for --speculative-algorithm STANDALONE (same tokenizer).",
    "speculative_num_steps": "Speculative decoding: draft steps per verify (default 3).",
    "speculative_eagle_topk": "Speculative decoding: draft branching per step (1: a chain; > 1: a tree verified under "
                              "a tree attention mask; default 1).",
    "speculative_num_draft_tokens": "Speculative decoding: tokens per request in one verify (topk 1: num_steps + 1; NGRAM default 8).",
    "speculative_ngram_min_match_window_size": "NGRAM: shortest suffix matched in the request's own tokens.",
    "speculative_ngram_max_match_window_size": "NGRAM: longest suffix matched in the request's own tokens.",
    "speculative_ngram_max_bfs_breadth": "NGRAM: > 1 merges the continuations of several matches into a tree with at "
                                         "most this many children per node (default 1: the best match's chain).",
    "speculative_draft_min_confidence": "STANDALONE: a draft step whose top token has a probability below this is "
                                        "the last of its chain (as transformers' assistant_confidence_threshold), "
                                        "and the draft's second choice there is verified beside it (one more verify "
                                        "row; default 0: always --speculative-num-steps drafts, as SGLang).",
    "speculative_token_map": "STANDALONE: a file of token ids (.json list or torch .pt tensor; SGLang's FR-Spec hot "
                             "vocabulary) the draft model's lm_head is cut to: a cheaper draft step; tokens outside "
                             "it are never drafted (the target still verifies every token).",
    "speculative_disable_by_batch_size": "Speculative decoding: a step with at least this many requests decoding runs "
                                         "without drafts (vLLM's flag; on a CPU, speculation pays at small batches "
                                         "only: BENCHMARKS.md). Default: always draft.",
    "enable_multi_layer_eagle": "EAGLE on MTP layers: draft step i runs MTP layer i (Step-3.5's three), fed by step i-1.",
    "quantization": "CPU quantization: int8 or int4 (weight-only), w8a8_int8 (int8 weights and activations, "
                    "fastest for batched decode), w4a8 (4-bit group weights x int8 activations on ember's "
                    "VNNI kernel, fastest at batch 1), none (the float weights as loaded). Default on CPU: "
                    "for a model from a quantized GGUF, the fastest of these not more quantized than the file "
                    "(w4a8 for Q4, w8a8_int8 for Q5-Q8; logged); otherwise none.",
    "disable_fused_decode": "Run w4a8 decode steps of Llama-family models through torch ops instead of the "
                            "fused C++ decode step (for comparison; both compute the same layers).",
    "sampling_defaults": "Where unset sampling fields of OpenAI requests come from: `model` (the model's "
                         "generation_config.json, the default) or `openai` (temperature 1, top_p 1, ...).",
    "random_seed": "Random seed for sampling.",
    "allow_private_media_urls": "Let image/video URLs point at loopback, private, link-local (cloud metadata) "
                                "and other non-public addresses (refused by default, checked before connecting).",
    "max_images_per_request": "Most images and videos in one request (more: 400).",
    "max_image_mb": "Largest image accepted, in MiB (URL, data: URL or stored file; larger: 413).",
    "max_video_mb": "Largest video accepted, in MiB (larger: 413).",
    "max_video_seconds": "Longest video accepted, in seconds (longer: 400).",
    "media_fetch_timeout": "Seconds allowed to fetch one image/video URL.",
    "num_threads": "Torch threads on CPU (default: all cores).",
    "file_storage_path": "Directory for files uploaded through /v1/files, kept across restarts "
                         "(default: files/ under ember's data directory: $EMBER_DATA_DIR, else "
                         "$XDG_DATA_HOME/ember, else ~/.local/share/ember).",
    "file_max_bytes": "Largest file /v1/files accepts, in bytes (larger uploads get 413).",
    "graceful_shutdown_timeout": "On SIGTERM/SIGINT: seconds the requests in flight get to finish (new ones get "
                                 "503 with Retry-After); what still runs after it is aborted, then the server "
                                 "exits 0.",
    "watchdog_timeout": "Seconds one engine step may take before the engine counts as hung: it exits, and the "
                        "server with it (non-zero), instead of hanging every request.",
}

CHOICES: dict[str, list[str]] = {
    "log_level": ["debug", "info", "warning", "error", "critical"],
    "device": ["auto", "cpu", "cuda"],
    "quantization": ["none", "int8", "int4", "w8a8_int8", "w4a8"],
    "sampling_defaults": ["model", "openai"],
    "attention_backend": ["torch", "triton", "flashinfer"],
    "moe_runner_backend": ["auto", "torch", "triton"],
}

# The speculative-decoding flags (checked and resolved by ember.speculative.config).
SPECULATIVE_FIELDS = ("speculative_algorithm", "speculative_draft_model_path", "speculative_num_steps",
                      "speculative_eagle_topk", "speculative_num_draft_tokens", "enable_multi_layer_eagle")


# ServerArgs fields the engine does not use yet: giving one explicitly is an error, not silently ignored.
# (Remove a name here when the engine implements it.)
NOT_IMPLEMENTED_WHEN_GIVEN: tuple[str, ...] = ()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation) -> tuple[type, bool]:
    """(base type, optional) of a field annotation (a string under `from __future__ import annotations`)."""
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.split("|")]
        optional = "None" in parts
        parts = [p for p in parts if p != "None"]
        table = {"int": int, "float": float, "str": str, "bool": bool}
        return table.get(parts[0], str), optional
    args = typing.get_args(annotation)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) != len(args)
    return annotation, False


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Add one flag per ServerArgs field. Defaults are SUPPRESSed so we know which flags were given."""
    group = parser.add_argument_group("server arguments")
    for f in dataclasses.fields(ServerArgs):
        typ, _ = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = HELP.get(f.name) or f"{f.name.replace('_', ' ')} (ServerArgs.{f.name})"
        if typ is bool:
            if default:
                group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=f"{help_text} (default: on)")
            else:
                group.add_argument(_flag(f.name), action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        kwargs = dict(type=typ, default=argparse.SUPPRESS, help=f"{help_text} (default: {default})",
                      dest=f.name)
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
            kwargs["type"] = str.lower
        group.add_argument(_flag(f.name), **kwargs)


def server_args_from_namespace(ns: argparse.Namespace) -> tuple[ServerArgs, set[str]]:
    """ServerArgs from parsed flags, and the set of field names the user gave explicitly."""
    names = ServerArgs.field_names()
    given = {k: v for k, v in vars(ns).items() if k in names}
    return ServerArgs(**given), set(given)


def check_server_args(args: ServerArgs, given: set[str] | None = None) -> list[str]:
    """Errors for flags that are accepted but not implemented yet. Logs flags that are no-ops here."""
    given = given if given is not None else set()
    errors = []
    if args.dp_size < 1:
        errors.append(f"--dp-size must be >= 1, got {args.dp_size}")
    elif args.dp_size > 1 and args.nnodes > 1:
        errors.append("--dp-size > 1 with --nnodes > 1 is not implemented yet (replicas run on one machine)")
    errors += _parallel_errors(args)
    from ember.speculative.config import resolve as resolve_speculative
    errors += resolve_speculative(args)[1]
    for name in NOT_IMPLEMENTED_WHEN_GIVEN:
        if name in given:
            errors.append(f"{_flag(name)} is not implemented yet (remove it)")
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        errors.append(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    if args.max_running_requests is not None and args.max_running_requests < 1:
        errors.append(f"--max-running-requests must be >= 1, got {args.max_running_requests}")
    if not 0 < args.port < 65536:
        errors.append(f"--port must be in 1..65535, got {args.port}")
    if args.context_length is not None and args.context_length < 1:
        errors.append(f"--context-length must be >= 1, got {args.context_length}")
    if args.graceful_shutdown_timeout < 0:
        errors.append(f"--graceful-shutdown-timeout must be >= 0, got {args.graceful_shutdown_timeout}")
    if args.watchdog_timeout <= 0:
        errors.append(f"--watchdog-timeout must be > 0, got {args.watchdog_timeout}")
    if args.cuda_graph_max_bs is not None and args.cuda_graph_max_bs < 1:
        errors.append(f"--cuda-graph-max-bs must be >= 1, got {args.cuda_graph_max_bs}")
    if args.file_max_bytes < 1:
        errors.append(f"--file-max-bytes must be >= 1, got {args.file_max_bytes}")
    if args.file_storage_path is not None:
        path = os.path.expanduser(args.file_storage_path)
        if os.path.exists(path) and not os.path.isdir(path):
            errors.append(f"--file-storage-path {args.file_storage_path} exists and is not a directory")
    # (no torch here: the API process stays small; the engine process validates --dtype / --device)
    device = args.device
    if device == "auto":
        device = "cuda" if os.path.exists("/dev/nvidiactl") else "cpu"
    if args.attention_backend is not None:
        from ember.attention import resolve_backend_name
        try:
            resolve_backend_name(args.attention_backend, device)
        except ValueError as e:
            errors.append(str(e))
    from ember.layers.moe_runner import resolve_moe_runner
    try:
        resolve_moe_runner(args.moe_runner_backend, device, args.quantization)
    except ValueError as e:
        errors.append(str(e))
    if device == "cpu":
        if args.disable_cuda_graph:
            logger.info("--disable-cuda-graph is a no-op on CPU (there are no CUDA graphs)")
        if "mem_fraction_static" in given:
            logger.info("--mem-fraction-static is a no-op on CPU (the KV cache uses --cpu-kv-cache-gb)")
    return errors


def _parallel_errors(args: ServerArgs) -> list[str]:
    errors = []
    if args.tp_size < 1:
        errors.append(f"--tp-size must be >= 1, got {args.tp_size}")
    elif args.ep_size < 1 or args.tp_size % args.ep_size:
        errors.append(f"--ep-size {args.ep_size} must divide --tp-size {args.tp_size}")
    elif args.nnodes < 1 or args.tp_size % args.nnodes:
        errors.append(f"--nnodes {args.nnodes} must divide --tp-size {args.tp_size}")
    if not 0 <= args.node_rank < max(1, args.nnodes):
        errors.append(f"--node-rank must be in 0..{args.nnodes - 1}, got {args.node_rank}")
    if args.nnodes > 1 and not args.dist_init_addr:
        errors.append("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, reachable from every node)")
    if args.dist_init_addr and args.dist_init_addr.rpartition(":")[2].isdigit() is False:
        errors.append(f"--dist-init-addr must be HOST:PORT, got {args.dist_init_addr!r}")
    if args.base_gpu_id < 0:
        errors.append(f"--base-gpu-id must be >= 0, got {args.base_gpu_id}")
    return errors


def parse_serve_args(argv: list[str], prog: str = "ember serve") -> tuple[ServerArgs, set[str]]:
    """Parse serve flags (used by `ember serve` and `python -m ember.launch_server`)."""
    parser = argparse.ArgumentParser(prog=prog, description="Start the ember HTTP server.")
    add_server_args(parser)
    ns = parser.parse_args(argv)
    return server_args_from_namespace(ns)
