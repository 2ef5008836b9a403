"""ember: a small, readable LLM serving engine."""
__version__ = "0.1.0"


def __getattr__(name):
    # imported lazily so `import ember` (CLI, API process) does not pull in torch
    if name == "Engine":
        from ember.engine.engine import Engine
        return Engine
    if name == "SamplingParams":
        from ember.engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
