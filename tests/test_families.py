"""GPT-NeoX/Pythia, GPT-2, GPT-J, BLOOM, Gemma 2 and 3, and per-layer sliding windows (Mistral, Qwen2,
Gemma) against transformers: logits, greedy generation, the HF
round trip (causal LM and value model), tensor parallelism, and LoRA SFT and PPO started from
GPT-NeoX and BLOOM."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_fixtures import (
    GEMMA_ATTN_SOFTCAP,
    GEMMA_FINAL_SOFTCAP,
    padded_batch,
    save_tiny_model,
    tiny_hf_configs,
    torch_causal_lm,
    torch_logits,
)

from jaxrlhf.generation.generate import SamplingSettings, generate_from_state
from jaxrlhf.generation.layout import to_generation_layout
from jaxrlhf.models import DecoderConfig, ValueModel, export_model, load_pretrained, save_pretrained
from jaxrlhf.models.families import FAMILIES, family
from jaxrlhf.models.lora import apply_lora
from jaxrlhf.parallel import GENERATION_RULES, TRAINING_RULES, make_mesh, shard_model

# sliding windows of 4 (shorter than the test sequences) on every layer or some
WINDOWED = ["mistral_window4", "qwen2_window_layers", "gemma2_window4", "gemma3_window4"]
VARIANTS = ["neox_parallel_rot25", "neox_sequential_rot50", "gpt2", "gptj", "bloom", *WINDOWED]
LENGTHS = [12, 7, 3, 10]
EOS, PAD, NEW = 7, 1, 10


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    return {name: save_tiny_model(name, root, centred_biases=True) for name in VARIANTS}


def relative_error(ours, reference, mask):
    valid = mask.astype(bool)
    return np.abs(ours - reference)[valid].max() / np.abs(reference[valid]).max()


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers_on_left_and_right_padding(model_dirs, name):
    """1e-5, tighter than the 1e-4 float32 bound: the other GELU form (erf vs tanh) is ~1e-4 off here."""
    model = load_pretrained(model_dirs[name])
    forward = jax.jit(lambda ids, mask: model(ids, mask))
    for left in (False, True):
        ids, mask = padded_batch(LENGTHS, 12, left=left)
        ours = np.asarray(forward(jnp.asarray(ids), jnp.asarray(mask)))
        assert relative_error(ours, torch_logits(model_dirs[name], ids, mask), mask) < 1e-5, (name, left)


def test_the_family_switches_are_read(model_dirs):
    parallel = load_pretrained(model_dirs["neox_parallel_rot25"]).config
    sequential = load_pretrained(model_dirs["neox_sequential_rot50"]).config
    gpt2 = load_pretrained(model_dirs["gpt2"]).config
    gptj = load_pretrained(model_dirs["gptj"]).config
    assert (parallel.parallel_residual, parallel.rotary_dim, parallel.head_dim) == (True, 4, 16)
    assert (sequential.parallel_residual, sequential.rotary_dim, sequential.qkv_bias) == (False, 8, False)
    assert (gpt2.positions, gpt2.activation, gpt2.norm_eps, gpt2.tie_word_embeddings) == (
        "learned",
        "gelu_new",
        1e-6,
        True,
    )
    assert (gptj.parallel_residual, gptj.shared_norm, gptj.rotary_interleaved, gptj.rotary_dim) == (True, True, True, 6)
    assert (gptj.qkv_bias, gptj.out_bias, gptj.mlp_bias, gptj.lm_head_bias, gptj.tie_word_embeddings) == (
        False,
        False,
        True,
        True,
        False,
    )


def test_gptj_block_has_one_norm_and_the_lm_head_a_bias(model_dirs):
    """GPT-J's ln_1 feeds both branches (no second norm to train or export); lm_head.bias is read."""
    model = load_pretrained(model_dirs["gptj"])
    assert model.decoder.layers.mlp_norm is None
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["gptj"])
    np.testing.assert_array_equal(np.asarray(model.lm_head_bias.get_value()), hf.lm_head.bias.detach().numpy())


def test_bloom_reads_alibi_the_embedding_norm_and_its_gelu(model_dirs):
    """ALiBi slopes as HF computes them for any head count (12: the 8 of a power of two, then every
    other one of 16's); bloom_gelu_forward is the tanh GELU."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, bloom_gelu_forward

    from jaxrlhf.models.config import ACTIVATIONS
    from jaxrlhf.models.layers import alibi_slopes

    config = load_pretrained(model_dirs["bloom"]).config
    assert (config.positions, config.embed_norm, config.num_heads, config.head_dim) == ("alibi", True, 12, 8)
    assert (config.intermediate_size, config.tie_word_embeddings, config.qkv_bias, config.mlp_bias) == (
        384,
        False,
        True,
        True,
    )
    for heads in (1, 2, 5, 6, 8, 12, 16, 40, 112):
        expected = _get_alibi_slopes(heads, torch.device("cpu")).numpy()
        np.testing.assert_allclose(alibi_slopes(heads), expected, rtol=1e-6, err_msg=str(heads))
    x = np.linspace(-4, 4, 101, dtype=np.float32)
    expected = bloom_gelu_forward(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(ACTIVATIONS[config.activation](jnp.asarray(x))), expected, atol=1e-6)


def test_bloom_residual_after_the_norm_is_refused():
    hf = tiny_hf_configs()["bloom"].to_dict() | {"apply_residual_connection_post_layernorm": True}
    with pytest.raises(ValueError, match="^bloom with apply_residual_connection_post_layernorm=True is not supported$"):
        DecoderConfig.from_hf(hf)


def test_bloom_hub_config_names_are_read():
    """bigscience/bloom-* config.json files name the width n_embed (and some the heads num_attention_heads)."""
    hf = tiny_hf_configs()["bloom"].to_dict()
    old = {k: v for k, v in hf.items() if k not in ("hidden_size", "n_head")}
    old |= {"n_embed": 96, "num_attention_heads": 12}
    assert DecoderConfig.from_hf(old) == DecoderConfig.from_hf(hf)


def test_interleaved_rotary_rotates_adjacent_pairs():
    """GPT-J's rotate_every_two turns (x0, x1), (x2, x3)...; rotate_half turns (x_i, x_{i + rot/2})."""
    from jaxrlhf.models.layers import apply_rope

    x = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    inv_freq, positions = jnp.array([1.0, 0.5, 0.25]), jnp.array([[3]])  # rotary on 6 of 8 dims
    angles = 3 * np.asarray(inv_freq)
    expected = np.asarray(x[0, 0, 0]).copy()
    for i, angle in enumerate(angles):
        a, b = expected[2 * i], expected[2 * i + 1]
        expected[2 * i], expected[2 * i + 1] = (
            a * np.cos(angle) - b * np.sin(angle),
            b * np.cos(angle) + a * np.sin(angle),
        )
    out = apply_rope(x, positions, inv_freq, interleaved=True)
    np.testing.assert_allclose(np.asarray(out[0, 0, 0]), expected, rtol=1e-6, atol=1e-6)


def test_hf_activation_names_compute_what_transformers_does():
    """HF "gelu" is the exact erf GELU, "gelu_new" the tanh approximation; they differ by ~1e-3."""
    from transformers.activations import ACT2FN

    from jaxrlhf.models.config import ACTIVATIONS

    x = np.linspace(-4, 4, 101, dtype=np.float32)
    for name in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"):
        expected = ACT2FN[name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(ACTIVATIONS[name](jnp.asarray(x))), expected, atol=1e-6, err_msg=name)


def hf_greedy(path, ids, mask):
    model = torch_causal_lm(path)
    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=NEW,
            eos_token_id=EOS,
            pad_token_id=PAD,
        ).numpy()
    return np.pad(out, ((0, 0), (0, ids.shape[1] + NEW - out.shape[1])), constant_values=PAD)


@pytest.mark.parametrize(
    "name, engine",
    [(name, "static") for name in VARIANTS] + [(name, "refill") for name in ["bloom", *WINDOWED]],
)
def test_greedy_equals_transformers_generate(model_dirs, name, engine):
    """Prefill and cached decode steps take the parallel residual, partial rotary, learned positions
    and ALiBi (its key positions counted from each row's first real slot, in the refill engine's
    slots too)."""
    ids, mask = padded_batch([6, 3, 8, 1], 8, left=True, seed=3)
    graphdef, state = nnx.split(to_generation_layout(load_pretrained(model_dirs[name])))
    settings = SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=NEW, greedy=True, engine=engine, slots=2)
    out = generate_from_state(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), settings)
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_greedy(model_dirs[name], ids, mask))
    assert len(np.unique(np.asarray(out.tokens)[:, 8:])) > 5  # answers that depend on the prompt


@pytest.mark.parametrize("name", VARIANTS)
def test_export_round_trips_through_transformers(model_dirs, name, tmp_path):
    """Fused query_key_value / c_attn tensors are joined again; transformers loads the export
    as the family's CausalLM class with the same logits."""
    save_pretrained(load_pretrained(model_dirs[name]), str(tmp_path / "export"))
    ids, mask = padded_batch(LENGTHS, 12, left=True)
    exported = torch_logits(str(tmp_path / "export"), ids, mask)
    np.testing.assert_allclose(exported, torch_logits(model_dirs[name], ids, mask), rtol=0, atol=1e-6)
    hf_config = json.load(open(tmp_path / "export" / "config.json"))
    model_type = tiny_hf_configs()[name].model_type
    assert hf_config["model_type"] == model_type
    assert hf_config["architectures"] == [family(model_type).ARCHITECTURES[model_type][0]]


@pytest.mark.parametrize("name", VARIANTS)
def test_value_model_exports_as_sequence_classification(model_dirs, name, tmp_path):
    model = load_pretrained(model_dirs[name], model_cls=ValueModel, untrained_head="zeros")
    head = model.value_head.kernel
    head.set_value(jax.random.normal(jax.random.key(0), head.get_value().shape))
    ids, mask = padded_batch(LENGTHS, 12, left=False)
    values = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    save_pretrained(model, str(tmp_path / "rm"), extra_config={"pad_token_id": PAD})
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    assert type(hf).__name__.endswith("ForSequenceClassification")
    with torch.no_grad():
        scores = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(scores, values[np.arange(len(ids)), mask.sum(1) - 1], rtol=1e-4, atol=1e-5)


def test_gpt2_saved_as_the_base_model_loads_without_the_prefix(model_dirs, tmp_path):
    """Hub GPT-2 checkpoints name tensors h.0... (saved from GPT2Model), not transformer.h.0..."""
    transformers.GPT2LMHeadModel.from_pretrained(model_dirs["gpt2"]).transformer.save_pretrained(tmp_path / "base")
    ids, mask = padded_batch(LENGTHS, 12, left=True)
    ours = np.asarray(load_pretrained(str(tmp_path / "base"))(jnp.asarray(ids), jnp.asarray(mask)))
    assert relative_error(ours, torch_logits(model_dirs["gpt2"], ids, mask), mask) < 1e-5


@pytest.mark.parametrize("tensor", [2, 4])
@pytest.mark.parametrize("name", VARIANTS)
def test_tensor_parallel_equals_one_device(model_dirs, name, tensor):
    """Fused tensors are read per device straight into q, k and v sharded by heads."""
    ids, mask = padded_batch([12, 5, 9, 1, 12, 7, 3, 10], 12, left=True)
    single = np.asarray(load_pretrained(model_dirs[name])(jnp.asarray(ids), jnp.asarray(mask)))
    mesh = make_mesh(fsdp=8 // tensor, tensor=tensor)
    model = load_pretrained(model_dirs[name], mesh=mesh, rules=TRAINING_RULES)
    kernel = model.decoder.layers.attn.q_proj.kernel.get_value()  # [layers, embed, heads, head_dim]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for rules in (TRAINING_RULES, GENERATION_RULES):
        graphdef, state = nnx.split(shard_model(model, rules, mesh))
        forward = jax.jit(lambda state, i, m, graphdef=graphdef: nnx.merge(graphdef, state)(i, m))
        out = forward(state, jnp.asarray(ids), jnp.asarray(mask))
        assert relative_error(np.asarray(out), single, mask) < 1e-5


@pytest.mark.parametrize("engine", ["static", "refill"])
def test_bloom_generation_under_tensor_parallel_4_equals_transformers(model_dirs, engine):
    """Each device decodes 3 of the 12 heads with those heads' ALiBi slopes."""
    from jaxrlhf.generation.hybrid_engine import HybridEngine

    ids, mask = padded_batch([6, 3, 8, 1], 8, left=True, seed=3)
    mesh = make_mesh(fsdp=8)
    graphdef, state = nnx.split(load_pretrained(model_dirs["bloom"], mesh=mesh, rules=TRAINING_RULES))
    settings = SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=NEW, greedy=True, engine=engine, slots=2)
    out, _ = HybridEngine(graphdef, (state,), mesh, 4, settings).generate(
        (state,), jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0)
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_greedy(model_dirs["bloom"], ids, mask))


def test_bloom_generation_refuses_the_pallas_kernel(model_dirs):
    ids, mask = padded_batch([6, 3], 8, left=True)
    graphdef, state = nnx.split(to_generation_layout(load_pretrained(model_dirs["bloom"])))
    settings = SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=2, attention="pallas")
    with pytest.raises(ValueError, match="^attention=pallas: the kernel does not add ALiBi biases"):
        generate_from_state(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), settings)


@pytest.mark.parametrize("name", VARIANTS)
def test_config_maps_to_hf_and_back(model_dirs, name):
    config = load_pretrained(model_dirs[name]).config
    assert DecoderConfig.from_hf(family(config.model_type).to_hf(config)) == config


def test_every_family_config_maps_to_hf_and_back():
    for name, hf in tiny_hf_configs().items():
        config = DecoderConfig.from_hf(hf.to_dict())
        assert DecoderConfig.from_hf(family(config.model_type).to_hf(config)) == config, name
    assert {module.__name__.rsplit(".", 1)[1] for module in FAMILIES} == {
        "llama",
        "opt",
        "gpt_neox",
        "gpt2",
        "gptj",
        "bloom",
        "gemma",
    }


@pytest.mark.parametrize("key", ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"])
def test_gpt2_attention_options_we_do_not_run_are_refused(key):
    hf = tiny_hf_configs()["gpt2"].to_dict() | {key: True}
    with pytest.raises(ValueError, match=f"^gpt2 with {key}=True is not supported$"):
        DecoderConfig.from_hf(hf)


def test_pythia_style_config_json_reads_rotary_pct_and_rotary_emb_base():
    """Pythia's config.json predates rope_parameters: rotary_pct and rotary_emb_base."""
    hf = {k: v for k, v in tiny_hf_configs()["neox_parallel_rot25"].to_dict().items() if k != "rope_parameters"}
    config = DecoderConfig.from_hf(hf | {"rotary_pct": 0.5, "rotary_emb_base": 5000})
    assert (config.rotary_dim, config.rope_theta) == (8, 5000.0)


def test_per_layer_windows_and_gemmas_switches_are_read(model_dirs):
    """Windows from Mistral's one window, Qwen2's max_window_layers and Gemma's layer_types; Gemma 2
    caps scores and logits, Gemma 3 only the logits (its attn_logit_softcapping is unused in
    transformers too), normalises q and k, and turns its windowed layers at their own base."""
    configs = {name: load_pretrained(model_dirs[name]).config for name in WINDOWED}
    assert {name: config.layer_windows for name, config in configs.items()} == {
        "mistral_window4": (4, 4),
        "qwen2_window_layers": (None, 4),
        "gemma2_window4": (4, None, 4),
        "gemma3_window4": (4, None, 4),
    }
    gemma2, gemma3 = configs["gemma2_window4"], configs["gemma3_window4"]
    for gemma in (gemma2, gemma3):
        assert (gemma.norm_plus_one, gemma.post_norms, gemma.scale_embeddings, gemma.tie_word_embeddings) == (
            True,
            True,
            True,
            True,
        )
        assert (gemma.activation, gemma.head_dim, gemma.query_scale_dim, gemma.final_logit_softcap) == (
            "gelu_pytorch_tanh",
            16,
            24,
            GEMMA_FINAL_SOFTCAP,
        )
    assert (gemma2.attn_logit_softcap, gemma2.qk_norm, gemma2.local_rope_theta) == (GEMMA_ATTN_SOFTCAP, False, None)
    assert (gemma3.attn_logit_softcap, gemma3.qk_norm, gemma3.local_rope_theta, gemma3.rope_theta) == (
        None,
        True,
        100.0,
        10000.0,
    )
    assert gemma3.rope_parameters()["rope_type"] == "linear"


@pytest.mark.parametrize("name", WINDOWED)
def test_the_windows_change_the_logits(model_dirs, name):
    """The windows (4) are shorter than the sequences (12): the same weights with windows wider
    than the sequences (the same layers windowed: Gemma 3's rotary bases stay) differ after 4 tokens."""
    import dataclasses

    from jaxrlhf.models import CausalLM

    model = load_pretrained(model_dirs[name])
    wide = tuple(None if window is None else 1000 for window in model.config.layer_windows)
    unwindowed = dataclasses.replace(model.config, layer_windows=wide)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(unwindowed, nnx.Rngs(0))))
    ids, mask = padded_batch(LENGTHS, 12, left=False)
    windowed = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    full = np.asarray(nnx.merge(graphdef, nnx.state(model))(jnp.asarray(ids), jnp.asarray(mask)))
    assert relative_error(full, windowed, mask) > 1e-3
    np.testing.assert_allclose(full[:, :4], windowed[:, :4], rtol=1e-5, atol=1e-5)  # no key yet outside a window


def test_older_gemma_config_json_reads_the_same():
    """Gemma 2 without layer_types windows its even layers; Gemma 3's older keys: rope_theta,
    rope_scaling, rope_local_base_freq and sliding_window_pattern. Bidirectional attention is refused."""
    gemma2 = tiny_hf_configs()["gemma2_window4"].to_dict()
    assert DecoderConfig.from_hf({k: v for k, v in gemma2.items() if k != "layer_types"}) == DecoderConfig.from_hf(
        gemma2
    )
    gemma3 = tiny_hf_configs()["gemma3_window4"].to_dict()
    older = {k: v for k, v in gemma3.items() if k not in ("layer_types", "rope_parameters")} | {
        "sliding_window_pattern": 2,
        "rope_theta": 10000.0,
        "rope_local_base_freq": 100.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    }
    assert DecoderConfig.from_hf(older) == DecoderConfig.from_hf(gemma3)
    with pytest.raises(ValueError, match="^gemma3_text with use_bidirectional_attention=True is not supported$"):
        DecoderConfig.from_hf(gemma3 | {"use_bidirectional_attention": True})


def test_lora_targets_take_the_familys_names(model_dirs):
    """query_key_value is one fused HF matrix: it adapts our q, k and v; c_proj names two GPT-2 matrices."""
    neox = load_pretrained(model_dirs["neox_parallel_rot25"])
    assert apply_lora(neox, rank=2, alpha=4.0, target_modules=["query_key_value", "dense_4h_to_h"]) == 4
    gpt2 = load_pretrained(model_dirs["gpt2"])
    assert apply_lora(gpt2, rank=2, alpha=4.0, target_modules=["c_proj"]) == 2
    assert gpt2.decoder.layers.attn.o_proj.lora_a is not None and gpt2.decoder.layers.mlp.down_proj.lora_a is not None
    with pytest.raises(ValueError, match="matched no projection"):
        apply_lora(load_pretrained(model_dirs["gpt2"]), rank=2, alpha=4.0, target_modules=["query_key_value"])


def test_lora_targets_take_gptj_names(model_dirs):
    """GPT-J's own names: q_proj, k_proj, v_proj, out_proj (our o_proj), fc_in (up_proj), fc_out (down_proj)."""
    gptj = load_pretrained(model_dirs["gptj"])
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]
    assert apply_lora(gptj, rank=2, alpha=4.0, target_modules=targets) == 6
    attn, mlp = gptj.decoder.layers.attn, gptj.decoder.layers.mlp
    for dense in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.up_proj, mlp.down_proj):
        assert dense.lora_a is not None


@pytest.mark.parametrize("name", ["neox_parallel_rot25", "gpt2", "gptj", "bloom"])
def test_trained_adapters_merge_into_the_fused_tensors_on_export(model_dirs, name, tmp_path):
    from jaxrlhf.models.layers import LoraParam

    model = load_pretrained(model_dirs[name])
    apply_lora(model, rank=2, alpha=4.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    for path, variable in nnx.to_flat_state(nnx.state(model, LoraParam)):
        variable.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), variable.get_value().shape))
    ids, mask = padded_batch(LENGTHS, 12, left=True)
    adapted = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    save_pretrained(model, str(tmp_path / "merged"))
    assert relative_error(torch_logits(str(tmp_path / "merged"), ids, mask), adapted, mask) < 1e-5


def tiny_policy_config(model_type: str, tokenizer):
    """A tiny GPT-NeoX or BLOOM for the built-in task's tokenizer."""
    tokens = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if model_type == "bloom":
        return transformers.BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4, **tokens)
    return transformers.GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        **tokens,
    )


@pytest.fixture(scope="module")
def policy_with_tokenizer(tmp_path_factory):
    """policy_with_tokenizer(model_type): a tiny policy of that family with the built-in task's
    tokenizer, and a reward model (random score head) from it; built once per family."""
    from jaxrlhf.data.builtin import builtin_tokenizer
    from jaxrlhf.models import load_tokenizer

    built = {}

    def build(model_type):
        if model_type not in built:
            root = tmp_path_factory.mktemp(model_type)
            tokenizer = load_tokenizer(builtin_tokenizer(str(root / "tokenizer")))
            torch.manual_seed(0)
            path = str(root / "policy")
            policy = transformers.AutoModelForCausalLM.from_config(tiny_policy_config(model_type, tokenizer))
            policy.save_pretrained(path)
            tokenizer.save_pretrained(path)
            reward = load_pretrained(path, model_cls=ValueModel, untrained_head="zeros")
            kernel = reward.value_head.kernel
            kernel.set_value(jax.random.normal(jax.random.key(1), kernel.get_value().shape))
            built[model_type] = path, export_model(reward, str(root / "reward_model"), path)
        return built[model_type]

    return build


def run_step(step, tmp_path, overrides):
    from jaxrlhf.config import load_config
    from jaxrlhf.metrics import MetricsLogger
    from jaxrlhf.run_context import RunContext

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    config = load_config([f"steps=[{step}]", f"output_dir={tmp_path / step}", cache, "tensorboard=false", *overrides])
    logger = MetricsLogger(config.output_dir, tensorboard=False)
    context = RunContext(config, make_mesh(devices=jax.devices()[:1]), logger)
    try:
        if step == "sft":
            from jaxrlhf.steps.sft import run_sft

            return run_sft(context)
        from jaxrlhf.rl.ppo import run_ppo
        from jaxrlhf.train import task_hooks

        return run_ppo(context, task_hooks(config))
    finally:
        logger.close()


@pytest.mark.parametrize("model_type", ["gpt_neox", "bloom"])
def test_lora_sft_exports_the_familys_model(policy_with_tokenizer, model_type, tmp_path):
    policy, _ = policy_with_tokenizer(model_type)
    summary = run_step(
        "sft",
        tmp_path,
        [
            f"sft.model.path={policy}",
            "sft.lora.rank=4",
            "sft.lora.target_modules=[query_key_value, dense, dense_h_to_4h, dense_4h_to_h]",
            "data.builtin_size=500",
            "sft.max_steps=3",
            "sft.batch_size=8",
            "sft.eval_every=0",
            "sft.eval_batches=1",
        ],
    )
    assert np.isfinite(summary["sft.eval_loss_end"])
    exported = str(tmp_path / "sft" / "sft" / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert type(hf).__name__ == family(model_type).ARCHITECTURES[model_type][0]
    assert not any("lora" in name for name in hf.state_dict())


@pytest.mark.slow  # ~20 s: two PPO iterations with a LoRA actor
@pytest.mark.parametrize("model_type", ["gpt_neox", "bloom"])
def test_ppo_runs_from_the_family(policy_with_tokenizer, model_type, tmp_path):
    from test_ppo import TINY_PPO

    policy, reward_model = policy_with_tokenizer(model_type)
    roles = [f"ppo.actor_model.path={policy}", f"ppo.critic_model.path={reward_model}"]
    summary = run_step("ppo", tmp_path, [*TINY_PPO, *roles, "ppo.num_iterations=2", "ppo.actor_lora.rank=4"])
    assert np.isfinite(summary["ppo.kl_to_sft"])
    for role, architecture in zip(("actor", "critic"), family(model_type).ARCHITECTURES[model_type]):
        config = json.load(open(os.path.join(tmp_path, "ppo", "ppo", role, "config.json")))
        assert config["architectures"] == [architecture], role
