"""The built-in tiny model: the built-in task's tokenizer and a small random LLaMA, saved in
Hugging Face format, so the default run needs no download."""

from __future__ import annotations

import os
import shutil

import jax

from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.factory import create_model
from jaxrlhf.models.hf_io import load_tokenizer, save_pretrained
from jaxrlhf.parallel.mesh import barrier

BUILTIN_VERSION = "v1"
# About 0.8M parameters: a 2-core CPU trains it through all three steps in minutes.
BUILTIN_SHAPE = dict(
    hidden_size=128,
    intermediate_size=320,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def builtin_model_dir(cache_dir: str, seed: int = 0) -> str:
    """Builds (once, atomically, on process 0) and returns the directory of the built-in model."""
    path = os.path.join(cache_dir, f"builtin-model-{BUILTIN_VERSION}-seed{seed}")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(path, "model.safetensors")):
        _build(path, seed)
    barrier(f"jaxrlhf builtin model {path}")  # the others wait for it (cache_dir is on a shared filesystem)
    return path


def _build(path: str, seed: int) -> None:
    import transformers

    from jaxrlhf.data.builtin import builtin_tokenizer

    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = load_tokenizer(builtin_tokenizer(tmp, seed=seed))
    hf = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **BUILTIN_SHAPE,
    )
    save_pretrained(create_model(DecoderConfig.from_hf(hf.to_dict()), seed=seed), tmp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another run built it first
        shutil.rmtree(tmp, ignore_errors=True)
