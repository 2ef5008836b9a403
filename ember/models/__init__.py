"""Model registry: HF `architectures` name -> our implementation."""
from ember.models.gemma3 import Gemma3ForCausalLM
from ember.models.llama import LlamaForCausalLM
from ember.models.qwen2 import Qwen2ForCausalLM
from ember.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,
}


def model_class_for(hf_config):
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported architecture {getattr(hf_config, 'architectures', None)} "
        f"(model_type={getattr(hf_config, 'model_type', None)}); supported: {', '.join(MODEL_REGISTRY)}")


def text_config_of(hf_config):
    """Multimodal configs (Gemma3ForConditionalGeneration) keep the decoder's settings in text_config."""
    return getattr(hf_config, "text_config", None) or hf_config
