"""Hugging Face exports of trained models, with the tokenizer beside them."""

from __future__ import annotations

import jax

from jaxrlhf.models import load_tokenizer, save_pretrained


def export_model(model, directory: str, tokenizer_source: str, extra_config: dict | None = None) -> str:
    """Writes model (LoRA merged) + config + tokenizer files that transformers loads."""
    tokenizer = load_tokenizer(tokenizer_source)
    extra = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, **(extra_config or {})}
    save_pretrained(model, directory, extra_config=extra)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(directory)
    if jax.process_count() > 1:  # later steps on every process read what process 0 wrote
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxrlhf export {directory}")
    return directory
