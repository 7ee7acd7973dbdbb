"""Reading the LM head chunk by chunk: the same log-probs, entropies and gradients as the full logits,
and a 128k-vocabulary training step that never holds the whole float32 logits."""

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from jaxrlhf.config import OptimizerConfig
from jaxrlhf.losses import language_model_loss
from jaxrlhf.models import CausalLM, DecoderConfig
from jaxrlhf.models.outputs import chunked_token_logprobs, logprobs_and_entropy
from jaxrlhf.train_state import TrainState, make_optimizer, make_train_step, split_for_training


def test_chunks_give_the_full_logits_answers_and_gradients():
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (3, 10, 8))
    head = jax.random.normal(keys[1], (8, 50))
    targets = jax.random.randint(keys[2], (3, 10), 0, 50)
    logits_fn = lambda h: h @ head

    def total(head_weights, chunk_elements):
        fn = lambda h: h @ head_weights
        logprobs, entropy = chunked_token_logprobs(fn, hidden, targets, chunk_elements=chunk_elements)
        return logprobs.sum() + 0.1 * entropy.sum(), (logprobs, entropy)

    full = logprobs_and_entropy(logits_fn(hidden), targets)
    for chunk_elements in (3 * 50 * 3, 3 * 50 * 4, 10**9):  # chunks of 3 and 4 tokens (the last one padded), one
        (_, chunked), grad = jax.value_and_grad(total, has_aux=True)(head, chunk_elements)
        np.testing.assert_allclose(chunked[0], full[0], rtol=1e-5)
        np.testing.assert_allclose(chunked[1], full[1], rtol=1e-5)
        np.testing.assert_allclose(grad, jax.grad(lambda w: total(w, 10**9)[0])(head), rtol=1e-4)


def test_a_128k_vocabulary_step_never_holds_the_float32_logits():
    hf = transformers.LlamaConfig(
        vocab_size=131072,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
    )
    config = DecoderConfig.from_hf(hf.to_dict())
    graphdef, params, frozen = split_for_training(nnx.eval_shape(lambda: CausalLM(config, nnx.Rngs(0))), 0)
    optimizer = make_optimizer(OptimizerConfig(schedule="constant"), 10)
    state = jax.eval_shape(lambda p, f: TrainState(jnp.zeros((), jnp.int32), p, f, optimizer.init(p)), params, frozen)
    batch, seq = 2, 2048
    rows = {
        name: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for name in ("input_ids", "attention_mask", "loss_mask")
    }
    compiled = make_train_step(graphdef, language_model_loss, optimizer, 1).lower(state, rows).compile()
    full_logits_bytes = batch * seq * hf.vocab_size * 4  # 2 GiB
    assert compiled.memory_analysis().temp_size_in_bytes < full_logits_bytes / 2
