"""The model families: each module maps one Hugging Face architecture onto the shared decoder.

A family module owns everything family-specific, in one place:

    MODEL_TYPES                  the config.json `model_type` values it reads
    ARCHITECTURES                model_type -> (CausalLM class, ForSequenceClassification class)
    PREFIX                       HF's base_model_prefix + "." (a checkpoint of the base model lacks it)
    LORA_TARGETS                 the family's projection names -> our Dense names (ours are always accepted)
    config_fields(hf) -> dict    DecoderConfig fields from config.json; a ValueError names an option we do not run
    to_hf(config) -> dict        the architecture keys of config.json, written back (export)
    weights(config) -> [Tensor]  every HF tensor and the parameters of ours it holds (`base.Tensor`)

The decoder itself is shared: a new family adds switches to `DecoderConfig` (BLOOM's ALiBi,
Gemma's logit soft-capping and per-layer windows), never a copy of the model.
"""

from __future__ import annotations

from types import ModuleType

from jaxrlhf.models.families import bloom, gemma, gpt2, gpt_neox, gptj, llama, opt

FAMILIES: tuple[ModuleType, ...] = (llama, opt, gpt_neox, gpt2, gptj, bloom, gemma)
_BY_MODEL_TYPE = {model_type: module for module in FAMILIES for model_type in module.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(_BY_MODEL_TYPE)


def family(model_type: str | None) -> ModuleType:
    """The family module that reads `model_type`; a one-line error lists the supported ones."""
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return _BY_MODEL_TYPE[model_type]
