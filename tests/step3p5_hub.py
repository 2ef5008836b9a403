"""Step-3.5 in the hub's layout, for tests: a tiny random checkpoint built with transformers' Step3p7 classes
and saved as stepfun-ai/Step-3.5-Flash ships (config.json in the hub's step3p5 schema, the hub's weight names,
experts as stacked 3-D tensors, MTP layers appended after the decoder), and the transformers reference on it.

transformers implements the text model (`Step3p7TextModel`, whose `Step3p7TextConfig` reads the hub's step3p5
config) but has no text-only CausalLM class and no loader for this layout, so the reference here converts the hub
names back to transformers' and applies the checkpoint's lm_head itself.
"""
from __future__ import annotations

import json
import pathlib
import re
from types import SimpleNamespace

import torch
from torch import nn

N_LAYERS, N_MTP, WINDOW = 5, 1, 16


def hub_config(vocab_size: int, eos_token_id: int) -> dict:
    """The hub's config.json schema (legacy names, per-layer lists padded with the MTP layers), tiny sizes: full
    attention on layers 0 and 4 (4 query heads), sliding on 1-3 and the MTP layer (6 query heads), dense MLPs on
    0-1, MoE (8 experts, top-3) on 2-4; clamps small enough to bite on random weights."""
    L = N_LAYERS + N_MTP
    types = ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention",
             "sliding_attention"]
    return {
        "architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5",
        "vocab_size": vocab_size, "eos_token_id": eos_token_id,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": N_LAYERS, "num_nextn_predict_layers": N_MTP,
        "num_attention_heads": 4, "num_attention_groups": 2, "head_dim": 16,
        "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 6,
                                    "num_attention_groups": 2, "head_dim": 16},
        "layer_types": types, "sliding_window": WINDOW, "use_head_wise_attn_gate": True, "use_qk_norm": True,
        "zero_centered": True,
        "rope_theta": [5e6 if t == "full_attention" else 1e4 for t in types],
        "partial_rotary_factors": [0.5 if t == "full_attention" else 1.0 for t in types],
        "rope_scaling": {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 64,
                         "low_freq_factor": 1.0, "high_freq_factor": 32.0},
        "yarn_only_types": ["full_attention"], "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "moe_layers_enum": "2,3,4", "moe_num_experts": 8, "moe_top_k": 3, "moe_intermediate_size": 32,
        "share_expert_dim": 64, "moe_router_activation": "sigmoid", "moe_router_scaling_factor": 3.0,
        "norm_expert_weight": True, "use_moe_router_bias": True, "need_fp32_gate": True,
        "swiglu_limits": [0.0, 0.0, 0.0, 0.0, 0.15, 0.0][:L],
        "swiglu_limits_shared": [0.0, 0.2, 0.0, 0.15, 0.0, 0.0][:L],
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }


def flash_config() -> dict:
    """Step-3.5-Flash's published shape in the hub schema (45 layers + 3 MTP, full attention on every 4th layer,
    64 / 96 query heads, 8 KV heads of 128, window 512, 288 experts top-8, dense layers 0-2), for tests that build
    the model on the meta device. The model card: 196B parameters, 11B active per token."""
    L, K = 45, 3
    types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(L + K)]
    return {
        "architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5", "vocab_size": 128896,
        "hidden_size": 4096, "intermediate_size": 11264, "num_hidden_layers": L, "num_nextn_predict_layers": K,
        "num_attention_heads": 64, "num_attention_groups": 8, "head_dim": 128,
        "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 96,
                                    "num_attention_groups": 8, "head_dim": 128},
        "layer_types": types, "sliding_window": 512, "use_head_wise_attn_gate": True,
        "rope_theta": [5e6 if t == "full_attention" else 1e4 for t in types],
        "partial_rotary_factors": [0.5 if t == "full_attention" else 1.0 for t in types],
        "rope_scaling": {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 131072,
                         "low_freq_factor": 1.0, "high_freq_factor": 32.0},
        "yarn_only_types": ["full_attention"], "max_position_embeddings": 262144, "rms_norm_eps": 1e-5,
        "moe_layers_enum": ",".join(str(i) for i in range(3, L)), "moe_num_experts": 288, "moe_top_k": 8,
        "moe_intermediate_size": 1280, "share_expert_dim": 1280, "moe_router_scaling_factor": 3.0,
        "use_moe_router_bias": True, "need_fp32_gate": True,
        "swiglu_limits": [0.0] * 43 + [7.0, 7.0] + [0.0] * K, "swiglu_limits_shared": [0.0] * 43 + [16.0, 16.0] + [0.0] * K,
        "tie_word_embeddings": False,
    }


# transformers' Step3p7TextModel names -> the hub's (stacked experts: gate_up_proj splits into gate_proj/up_proj)
_TO_HUB = [(r"\.mlp\.gate\.weight$", ".moe.gate.weight"), (r"\.mlp\.gate\.e_score_correction_bias$", ".moe.router_bias"),
           (r"\.mlp\.experts\.down_proj$", ".moe.down_proj.weight"), (r"\.mlp\.shared_experts\.", ".share_expert.")]


_FROM_HUB = [(r"\.moe\.gate\.weight$", ".mlp.gate.weight"),
             (r"\.moe\.router_bias$", ".mlp.gate.e_score_correction_bias"),
             (r"\.moe\.down_proj\.weight$", ".mlp.experts.down_proj"), (r"\.share_expert\.", ".mlp.shared_experts.")]


def to_hub(hf_state: dict, prefix: str = "model.") -> dict:
    out = {}
    for name, t in hf_state.items():
        name = prefix + name
        if name.endswith(".mlp.experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)  # [E, 2I, H]: gate rows then up rows
            base = name[:-len(".mlp.experts.gate_up_proj")]
            out[f"{base}.moe.gate_proj.weight"], out[f"{base}.moe.up_proj.weight"] = gate, up
            continue
        for pat, rep in _TO_HUB:
            name = re.sub(pat, rep, name)
        out[name] = t
    return out


def from_hub(hub_state: dict, num_layers: int) -> dict:
    """Hub names -> Step3p7TextModel's state dict (+ "lm_head.weight"); MTP layers are dropped."""
    out = {}
    for name, t in hub_state.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m[1]) >= num_layers:
            continue
        if name.endswith(".moe.up_proj.weight"):
            continue  # joined with its gate_proj below
        if name.endswith(".moe.gate_proj.weight"):
            base = name[:-len(".moe.gate_proj.weight")]
            t = torch.cat([t, hub_state[f"{base}.moe.up_proj.weight"]], dim=1)
            name = f"{base}.mlp.experts.gate_up_proj"
        for pat, rep in _FROM_HUB:
            name = re.sub(pat, rep, name)
        out[name.removeprefix("model.")] = t
    return out


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Zero-initialised norms and router biases would hide mistakes in how they are applied: make them random."""
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def build_tiny_step3p5(path: pathlib.Path, tok) -> pathlib.Path:
    from safetensors.torch import save_file
    from transformers import AutoConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7DecoderLayer, Step3p7RMSNorm, Step3p7TextModel

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hub_config(len(tok), tok.eos_token_id), indent=2))
    config = AutoConfig.from_pretrained(path)  # transformers' own reading of the hub schema
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Step3p7TextModel(config).eval()
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    _randomize(model, gen)
    tensors = to_hub(model.state_dict())
    tensors["lm_head.weight"] = lm_head.weight.detach()
    # MTP layers: a transformers decoder layer of the MTP layer's attention and MLP kind (built as a main layer of
    # that kind: transformers' own MTP config drops the sliding layers' head count, the hub's serving code keeps it)
    # + eh_proj, enorm/hnorm and a shared head
    H = config.hidden_size
    for i in range(config.num_nextn_predict_layers):
        kind = (config.mtp_layer_types[i], config.mtp_mlp_layer_types[i])
        like = next(j for j in range(config.num_hidden_layers)
                    if (config.layer_types[j], config.mlp_layer_types[j]) == kind)
        layer = Step3p7DecoderLayer(config, like).eval()
        extra = nn.ModuleDict({"enorm": Step3p7RMSNorm(H), "hnorm": Step3p7RMSNorm(H),
                               "eh_proj": nn.Linear(2 * H, H, bias=False)})
        head = nn.ModuleDict({"norm": Step3p7RMSNorm(H), "output": nn.Linear(H, config.vocab_size, bias=False)})
        for m in (layer, extra, head):
            for p in m.parameters():
                if p.dim() > 1:
                    nn.init.normal_(p, std=0.02)
            _randomize(m, gen)
        prefix = f"model.layers.{config.num_hidden_layers + i}."
        tensors.update(to_hub(layer.state_dict(), prefix))
        tensors.update({prefix + k: v for k, v in extra.state_dict().items()})
        tensors.update({prefix + "transformer.shared_head." + k: v for k, v in head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save_pretrained(path)
    return path


class Step3p5Reference(nn.Module):
    """transformers' Step3p7TextModel + the checkpoint's lm_head, with the CausalLM call signature the tests use:
    ref(input_ids, past_key_values=None, use_cache=False) -> .logits [B, T, V], .past_key_values."""

    def __init__(self, path: pathlib.Path):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import AutoConfig
        from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel
        config = AutoConfig.from_pretrained(path)
        self.model = Step3p7TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        state = from_hub(load_file(str(path / "model.safetensors")), config.num_hidden_layers)
        self.lm_head.weight.data.copy_(state.pop("lm_head.weight"))
        self.model.load_state_dict(state, strict=True)
        self.model.float().eval()

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        out = self.model(input_ids=input_ids, cache=past_key_values, use_cache=use_cache)
        return SimpleNamespace(logits=self.lm_head(out.last_hidden_state).float(), past_key_values=out.cache)
