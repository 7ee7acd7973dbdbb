"""Generation against transformers' greedy `generate`, across tensor-parallel layouts, compiled once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_fixtures import padded_batch, save_tiny_model

from jaxrlhf.generation.generate import SamplingSettings, generate_from_state
from jaxrlhf.generation.hybrid_engine import HybridEngine
from jaxrlhf.generation.layout import to_generation_layout
from jaxrlhf.metrics import CompileCounter
from jaxrlhf.models import CausalLM, load_pretrained
from jaxrlhf.models.lora import apply_lora
from jaxrlhf.parallel import TRAINING_RULES, make_mesh

FAMILIES = [
    "llama_gqa_llama3",
    "qwen2_bias_tied",
    "qwen3_qk_norm",
    "mistral",
    "mistral_window4",
    "opt",
    "opt_proj_postln",
]
EOS, PAD, NEW = 7, 1, 10


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    return {name: save_tiny_model(name, root) for name in FAMILIES}


def prompts():
    ids, mask = padded_batch([6, 3, 8, 1], 8, left=True, seed=3)
    return ids, mask


def hf_greedy(path, ids, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=NEW,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    out = out.numpy()
    return np.pad(out, ((0, 0), (0, ids.shape[1] + NEW - out.shape[1])), constant_values=PAD)


def greedy(path, ids, mask, **settings):
    graphdef, state = nnx.split(to_generation_layout(load_pretrained(path)))
    settings = SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=NEW, greedy=True, **settings)
    return generate_from_state(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), settings)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_transformers_generate(model_dirs, name):
    ids, mask = prompts()
    out = greedy(model_dirs[name], ids, mask)
    expected = hf_greedy(model_dirs[name], ids, mask)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    # the answer mask covers real answer tokens up to and including EOS, never pad after it
    answer = np.asarray(out.tokens)[:, 8:]
    answer_mask = np.asarray(out.attention_mask)[:, 8:]
    for row, mask_row in zip(answer, answer_mask):
        length = (list(row).index(EOS) + 1) if EOS in row else NEW
        np.testing.assert_array_equal(mask_row, np.arange(NEW) < length)


def test_logprobs_are_the_models_own(model_dirs):
    ids, mask = prompts()
    path = model_dirs["llama_gqa_llama3"]
    out = greedy(path, ids, mask)
    logits = load_pretrained(path)(out.tokens, out.attention_mask)
    logprobs = jax.nn.log_softmax(logits[:, 7:-1], -1)
    expected = jnp.take_along_axis(logprobs, out.tokens[:, 8:, None], -1)[..., 0] * out.attention_mask[:, 8:]
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected), atol=1e-4)


@pytest.mark.parametrize("tensor_parallel", [2, 4])
def test_hybrid_engine_tensor_parallel_gives_the_same_tokens(model_dirs, tensor_parallel):
    ids, mask = prompts()
    path = model_dirs["llama_gqa_llama3"]
    expected = np.asarray(greedy(path, ids, mask).tokens)
    mesh = make_mesh(fsdp=8)
    model = load_pretrained(path, mesh=mesh, rules=TRAINING_RULES)
    graphdef, state = nnx.split(model)
    engine = HybridEngine(
        graphdef,
        (state,),
        mesh,
        tensor_parallel,
        SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=NEW, greedy=True),
    )
    out, timings = engine.generate((state,), jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    assert timings.reshard_s >= 0 and timings.generate_s > 0
    q_kernel = engine.generation_state((state,))["decoder"]["layers"][0]["attn"]["q_proj"]["kernel"].get_value()
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")


def test_hybrid_engine_merges_lora(model_dirs):
    ids, mask = prompts()
    path = model_dirs["opt"]
    mesh = make_mesh(fsdp=4, tensor=2)
    model = load_pretrained(path, mesh=mesh, rules=TRAINING_RULES)
    apply_lora(model, rank=2, alpha=4.0, target_modules=["q_proj", "fc1"])
    graphdef, state = nnx.split(model)
    engine = HybridEngine(
        graphdef, (state,), mesh, 2, SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=NEW, greedy=True)
    )
    out, _ = engine.generate((state,), jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_greedy(path, ids, mask))  # B = 0: same model


def test_decode_loop_compiles_once_per_shape(model_dirs):
    ids, mask = prompts()
    path = model_dirs["qwen2_bias_tied"]
    graphdef, state = nnx.split(to_generation_layout(load_pretrained(path)))
    settings = SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=NEW, temperature=0.7, top_k=20)
    generate_from_state(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), settings)
    with CompileCounter() as counter:
        for seed in (1, 2):
            generate_from_state(
                graphdef, state, jnp.asarray((ids + seed) % 50), jnp.asarray(mask), jax.random.key(seed), settings
            ).tokens.block_until_ready()
    assert counter.count == 0


def test_temperature_zero_is_greedy_and_min_new_tokens_holds(model_dirs):
    ids, mask = prompts()
    path = model_dirs["mistral"]
    greedy_tokens = np.asarray(greedy(path, ids, mask).tokens)
    cold = np.asarray(greedy(path, ids, mask, temperature=0.0).tokens)
    np.testing.assert_array_equal(cold, greedy_tokens)
    forced = np.asarray(greedy(path, ids, mask, min_new_tokens=NEW).tokens)[:, 8:]
    assert not (forced == EOS).any()


def test_pallas_decode_attention_gives_the_same_tokens(tmp_path):
    """The Mosaic GPU decode kernel (interpret mode on CPU) inside generation, in bfloat16 like a real
    run, with and without a sliding window narrower than the answers: the reference's tokens."""
    ids, mask = prompts()
    path = save_tiny_model("llama_mqa_headdim64", str(tmp_path))
    model = to_generation_layout(load_pretrained(path, dtype="bfloat16", param_dtype="bfloat16"))
    state = nnx.state(model)

    def tokens(attention, window):
        config = dataclasses.replace(model.config, layer_windows=(window,) * model.config.num_layers)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(config, nnx.Rngs(0))))
        settings = SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=NEW, greedy=True, attention=attention)
        out = generate_from_state(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), settings)
        return np.asarray(out.tokens)

    for window in (None, 5):
        np.testing.assert_array_equal(tokens("pallas", window), tokens("reference", window))
    assert (tokens("reference", 5) != tokens("reference", None)).any(), "the window must change the answers"


def test_generation_follows_the_activation_layout_it_is_called_with(model_dirs):
    """The activation layout is a static argument of the jitted generate: the same inputs under
    another (mesh, rules) trace anew with that layout's constraints, and a surrounding context
    read at trace time no longer leaks into (or is frozen in) the cached trace."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxrlhf.parallel import GENERATION_RULES, activation_sharding

    devices = jax.devices()[:4]
    fsdp, tensor = make_mesh(fsdp=4, devices=devices), make_mesh(tensor=4, devices=devices)
    graphdef, state = nnx.split(to_generation_layout(load_pretrained(model_dirs["llama_gqa_llama3"])))
    state, ids, mask = jax.device_put((state, *prompts()), NamedSharding(fsdp, PartitionSpec()))
    settings = SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=NEW, greedy=True)

    def run(activations, lower=False):
        call = generate_from_state.lower if lower else generate_from_state
        return call(graphdef, state, ids, mask, jax.random.key(0), settings, None, 1, activations)

    def pinned(activations):  # the activation constraints of the traced program (not the sampler's own)
        text = run(activations, lower=True).as_text()
        return [line for line in text.splitlines() if "sharding_constraint" in line and "@empty_mesh" not in line]

    with activation_sharding(fsdp, TRAINING_RULES):  # ignored: only the argument counts
        assert not pinned(None)
    assert pinned((fsdp, TRAINING_RULES))
    assert '"tensor"=4' in run((tensor, GENERATION_RULES), lower=True).as_text()  # the inputs' mesh has tensor=1
    first = run((fsdp, TRAINING_RULES))
    with CompileCounter() as counter:
        second = run((tensor, GENERATION_RULES))
    assert counter.count == 1  # traced and compiled for the second layout, not the first one's trace
    np.testing.assert_array_equal(np.asarray(second.tokens), np.asarray(first.tokens))
