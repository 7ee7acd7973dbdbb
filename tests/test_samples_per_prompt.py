"""n samples per prompt: each prompt prefilled once, its cache repeated into n rows, and the result
exactly that of generating from the prompts repeated n times (same key, one key stream per row)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import padded_batch, save_tiny_model, tiny_hf_configs

from jaxrlhf.generation.compiled_report import samples_per_prompt_flops
from jaxrlhf.generation.generate import SamplingSettings, generate_from_state
from jaxrlhf.generation.hybrid_engine import HybridEngine
from jaxrlhf.generation.layout import to_generation_layout
from jaxrlhf.models import DecoderConfig, load_pretrained
from jaxrlhf.parallel import TRAINING_RULES, make_mesh

EOS, PAD, NEW, N = 7, 1, 10, 3
FAMILY = "llama_gqa_llama3"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(FAMILY, str(tmp_path_factory.mktemp("hf")))


@pytest.fixture(scope="module")
def split_model(model_dir):
    return nnx.split(to_generation_layout(load_pretrained(model_dir)))


def prompts():
    ids, mask = padded_batch([6, 3, 8, 1], 8, left=True, seed=3)  # different lengths, left padded
    return jnp.asarray(ids), jnp.asarray(mask)


def settings(greedy: bool) -> SamplingSettings:
    return SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=NEW, temperature=1.0, greedy=greedy)


def assert_same_generation(out, expected):
    assert out.tokens.shape == expected.tokens.shape
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    np.testing.assert_array_equal(np.asarray(out.attention_mask), np.asarray(expected.attention_mask))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs), rtol=1e-6, atol=1e-6)
    assert int(out.steps) == int(expected.steps)


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_n_samples_equal_generating_from_repeated_prompts(split_model, greedy):
    graphdef, state = split_model
    ids, mask = prompts()
    key = jax.random.key(5)
    out = generate_from_state(graphdef, state, ids, mask, key, settings(greedy), samples_per_prompt=N)
    repeated = jnp.repeat(ids, N, axis=0), jnp.repeat(mask, N, axis=0)
    expected = generate_from_state(graphdef, state, *repeated, key, settings(greedy))
    assert out.tokens.shape == (ids.shape[0] * N, ids.shape[1] + NEW)
    assert_same_generation(out, expected)


def test_samples_of_one_prompt_differ(split_model):
    graphdef, state = split_model
    ids, mask = prompts()
    n = 4
    out = generate_from_state(graphdef, state, ids, mask, jax.random.key(0), settings(False), samples_per_prompt=n)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[:, : ids.shape[1]], np.repeat(ids, n, axis=0))  # row p*n + j: prompt p
    answers = tokens[:, ids.shape[1] :].reshape(ids.shape[0], n, NEW)
    for prompt, samples in enumerate(answers):
        assert len({tuple(s) for s in samples}) > 1, f"prompt {prompt}: all {n} samples identical"


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_hybrid_engine_tensor_parallel_n_samples(model_dir, greedy):
    ids, mask = prompts()
    mesh = make_mesh(fsdp=4, tensor=2)
    graphdef, state = nnx.split(load_pretrained(model_dir, mesh=mesh, rules=TRAINING_RULES))
    engine = HybridEngine(graphdef, (state,), mesh, 2, settings(greedy))
    key = jax.random.key(2)
    out, _ = engine.generate((state,), ids, mask, key, samples_per_prompt=N)
    repeated = jnp.repeat(ids, N, axis=0), jnp.repeat(mask, N, axis=0)
    expected, _ = engine.generate((state,), *repeated, key)
    assert_same_generation(out, expected)
    assert out.tokens.sharding.spec[0] == "fsdp"  # rows stay sharded over the data axes


def test_prefill_runs_once_per_prompt():
    """XLA's FLOP count: B prompts with n samples cost (n - 1) prefills of B rows less than B * n
    repeated prompts (the decode loops are the same); a prefill over B * n rows would save nothing."""
    config = DecoderConfig.from_hf(tiny_hf_configs()[FAMILY].to_dict())
    n = 4
    flops = samples_per_prompt_flops(config, batch=4, prompt_len=64, new_tokens=2, n=n)
    print(flops.summary(n))
    assert flops.repeated - flops.with_n == pytest.approx((n - 1) * flops.prefill, rel=0.05)
