"""From prompt strings to a left-padded batch, and from generated tokens back to answer text."""

from __future__ import annotations

import numpy as np

from jaxrlhf.data.tokenize import pad_token_id


def left_padded_batch(tokenizer, prompts: list[str], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids and mask [batch, width]: prompts right-aligned (generation continues from the last
    column); a prompt longer than `max_len` keeps its last `max_len` tokens."""
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if max_len is not None:
        encoded = [ids[-max_len:] for ids in encoded]
    width = max(len(ids) for ids in encoded)
    ids = np.full((len(prompts), width), pad_token_id(tokenizer), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens) :] = tokens
        mask[row, width - len(tokens) :] = 1
    return ids, mask


def decode_answers(tokenizer, tokens, attention_mask, prompt_len: int) -> list[str]:
    """Answer texts read by the answer mask (never by token ids, since pad may equal EOS), EOS dropped."""
    texts = []
    for row, mask in zip(np.asarray(tokens)[:, prompt_len:], np.asarray(attention_mask)[:, prompt_len:]):
        ids = [int(t) for t, m in zip(row, mask) if m and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(ids))
    return texts


class TextGenerator:
    """A Hugging Face model directory that answers prompt strings (chat, prompt_eval).

    The model is put into the generation layout once (on `tensor_parallel` devices) and kept."""

    def __init__(self, model_dir: str, dtype: str = "float32", tensor_parallel: int = 1, **sampling):
        import jax
        from flax import nnx

        from jaxrlhf.generation.generate import SamplingSettings
        from jaxrlhf.generation.hybrid_engine import HybridEngine
        from jaxrlhf.models import load_pretrained, load_tokenizer
        from jaxrlhf.parallel import make_mesh

        self.tokenizer = load_tokenizer(model_dir)
        model = load_pretrained(model_dir, dtype=dtype, param_dtype=dtype)
        self.max_len = model.config.max_position_embeddings
        settings = SamplingSettings(eos_id=self.tokenizer.eos_token_id, pad_id=pad_token_id(self.tokenizer), **sampling)
        self.max_new_tokens = settings.max_new_tokens
        graphdef, state = nnx.split(model)
        mesh = make_mesh(data=1, fsdp=1, tensor=tensor_parallel, devices=jax.devices()[:tensor_parallel])
        self.engine = HybridEngine(graphdef, (state,), mesh, tensor_parallel, settings)
        self.state = self.engine.generation_state((state,))
        self.key = jax.random.key(0)

    def answers(self, prompts: list[str]) -> list[str]:
        import jax

        room = self.max_len - self.max_new_tokens
        ids, mask = left_padded_batch(self.tokenizer, prompts, max_len=room)
        self.key, key = jax.random.split(self.key)
        out = self.engine.generate_with(self.state, ids, mask, key)
        return decode_answers(self.tokenizer, out.tokens, out.attention_mask, ids.shape[1])
