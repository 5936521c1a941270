"""Memory-augmented decoders (RMT, ARMT, none, full) as Hugging Face classes; see DESIGN.md "Models".

``build_model`` turns an ExperimentConfig into a ``MemoryModelForCausalLM``. Importing this package
registers the classes with AutoConfig/AutoModelForCausalLM; ``save_pretrained`` additionally writes
``auto_map`` and the modeling files, so exported folders load with ``trust_remote_code=True`` alone.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .build import build_model, decoder_config
from .configuration_memtrain import MemoryModelConfig
from .modeling_memtrain import MemoryModelForCausalLM, MemoryModelOutput

AutoConfig.register(MemoryModelConfig.model_type, MemoryModelConfig, exist_ok=True)
AutoModelForCausalLM.register(MemoryModelConfig, MemoryModelForCausalLM, exist_ok=True)

__all__ = ["MemoryModelConfig", "MemoryModelForCausalLM", "MemoryModelOutput", "build_model", "decoder_config"]
