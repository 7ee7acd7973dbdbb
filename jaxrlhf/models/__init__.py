"""One decoder for every family (LLaMA 1/2/3, Mistral, Qwen2/3, OPT, GPT-NeoX/Pythia, GPT-2), with HF import/export."""

from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.decoder import CausalLM, Decoder, ValueModel, positions_from_mask
from jaxrlhf.models.factory import create_model
from jaxrlhf.models.families import SUPPORTED_MODEL_TYPES
from jaxrlhf.models.hf_io import export_model, load_pretrained, load_tokenizer, read_hf_config, save_pretrained

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DecoderConfig",
    "CausalLM",
    "Decoder",
    "ValueModel",
    "positions_from_mask",
    "create_model",
    "export_model",
    "load_pretrained",
    "load_tokenizer",
    "read_hf_config",
    "save_pretrained",
]
