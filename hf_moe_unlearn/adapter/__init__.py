"""Expert-selective adapters: LoRA (or full tuning) of the selected experts only, saved as standard PEFT adapters.

Imports only torch, transformers, peft, safetensors and huggingface_hub (never trl/datasets/evaluate), so it runs on
machines that have just the training stack.
"""

from .card import build_model_card
from .config import expert_lora_config, selection_from_config
from .layer import SelectedExpertsLayer
from .model import ExpertPeftModel, get_expert_peft_model

__all__ = [
    "ExpertPeftModel",
    "SelectedExpertsLayer",
    "build_model_card",
    "expert_lora_config",
    "get_expert_peft_model",
    "selection_from_config",
]
