"""Model registry: HF `architectures` name -> our implementation."""
from ember.models.gemma3 import Gemma3ForCausalLM
from ember.models.glm4_moe_lite import Glm4MoeLiteForCausalLM
from ember.models.llama import LlamaForCausalLM
from ember.models.minimax_m2 import MiniMaxM2ForCausalLM
from ember.models.qwen2 import Qwen2ForCausalLM
from ember.models.qwen3 import Qwen3ForCausalLM
from ember.models.qwen3_moe import Qwen3MoeForCausalLM
from ember.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from ember.models.step3p5 import Step3p5ForCausalLM
from ember.models.step3p7 import Step3p7ForConditionalGeneration

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "MiniMaxM2ForCausalLM": MiniMaxM2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,
    "Step3p5ForCausalLM": Step3p5ForCausalLM,
    "Step3p7ForConditionalGeneration": Step3p7ForConditionalGeneration,
    "Glm4MoeLiteForCausalLM": Glm4MoeLiteForCausalLM,
}


# Hugging Face `model_type` -> the architecture it means, for configs that name no (known) architecture
MODEL_TYPES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "minimax_m2": "MiniMaxM2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration",
    "step3p5": "Step3p5ForCausalLM", "step3p7": "Step3p7ForConditionalGeneration",
    "glm4_moe_lite": "Glm4MoeLiteForCausalLM",
}


def model_class_for(hf_config):
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    model_type = getattr(hf_config, "model_type", None)
    if model_type in MODEL_TYPES:
        return MODEL_REGISTRY[MODEL_TYPES[model_type]]
    raise ValueError(
        f"unsupported model_type {model_type!r} (architectures {getattr(hf_config, 'architectures', None)}); "
        f"supported model types: {', '.join(sorted(MODEL_TYPES))}")


def text_config_of(hf_config):
    """Multimodal configs (Gemma3ForConditionalGeneration) keep the decoder's settings in text_config."""
    return getattr(hf_config, "text_config", None) or hf_config
