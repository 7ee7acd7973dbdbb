"""Our decoder against transformers' PyTorch implementation on the same random weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_fixtures import padded_batch, save_tiny_model, tiny_hf_configs, torch_logits, train_tiny_tokenizer

from jaxrlhf.metrics import CompileCounter
from jaxrlhf.models import load_pretrained, load_tokenizer, save_pretrained

VARIANTS = list(tiny_hf_configs())
LENGTHS = [12, 7, 3, 10]  # mixed lengths in one batch


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_model(name, str(root)) for name in VARIANTS}


def relative_error(ours, reference, mask):
    valid = mask.astype(bool)
    return np.abs(ours - reference)[valid].max() / np.abs(reference[valid]).max()


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers_on_left_and_right_padding(model_dirs, name):
    model = load_pretrained(model_dirs[name])
    forward = jax.jit(lambda ids, mask: model(ids, mask))
    for left in (False, True):
        ids, mask = padded_batch(LENGTHS, 12, left=left)
        reference = torch_logits(model_dirs[name], ids, mask)
        ours = np.asarray(forward(jnp.asarray(ids), jnp.asarray(mask)))
        assert ours.shape == reference.shape
        assert relative_error(ours, reference, mask) < 1e-4, (name, "left" if left else "right")


@pytest.mark.parametrize("name", ["llama_gqa_llama3", "qwen2_bias_tied", "qwen3_qk_norm", "opt_proj_postln"])
def test_save_pretrained_round_trips_through_transformers(model_dirs, name, tmp_path):
    model = load_pretrained(model_dirs[name])
    save_pretrained(model, str(tmp_path / "export"))
    ids, mask = padded_batch(LENGTHS, 12, left=True)
    original = torch_logits(model_dirs[name], ids, mask)
    exported = torch_logits(str(tmp_path / "export"), ids, mask)
    np.testing.assert_allclose(exported, original, rtol=0, atol=1e-6)
    assert json.load(open(tmp_path / "export" / "config.json"))["model_type"] == tiny_hf_configs()[name].model_type


def test_bfloat16_compute_stays_close(model_dirs):
    ids, mask = padded_batch(LENGTHS, 12, left=True)
    full = np.asarray(load_pretrained(model_dirs["llama_gqa_llama3"])(jnp.asarray(ids), jnp.asarray(mask)))
    half = load_pretrained(model_dirs["llama_gqa_llama3"], dtype="bfloat16", param_dtype="bfloat16")
    out = np.asarray(half(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.dtype == np.float32  # logits are always float32
    assert relative_error(out, full, mask) < 5e-2


def test_forward_compiles_once_for_the_same_shapes(model_dirs):
    model = load_pretrained(model_dirs["mistral"])
    forward = jax.jit(lambda ids, mask: model(ids, mask))
    ids, mask = padded_batch(LENGTHS, 12, left=True)
    with CompileCounter() as counter:
        forward(jnp.asarray(ids), jnp.asarray(mask)).block_until_ready()
        forward(jnp.asarray(ids + 1), jnp.asarray(mask)).block_until_ready()
    assert counter.count == 1


def test_tokenizer_loads_from_the_model_directory(model_dirs, tmp_path):
    path = train_tiny_tokenizer(str(tmp_path / "tok"))
    tokenizer = load_tokenizer(path)
    ids = tokenizer("Human: hello there.")["input_ids"]
    assert tokenizer.decode(ids) == "Human: hello there."
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(model_dirs["opt"])


@pytest.mark.parametrize("name", ["llama_gqa_llama3", "opt_proj_postln"])
def test_value_model_exports_as_sequence_classification(model_dirs, name, tmp_path):
    """A value model starts from a causal LM (head at zero), and its export loads in transformers
    as XForSequenceClassification whose score equals our value at the last real token."""
    import torch

    from jaxrlhf.models import ValueModel

    model = load_pretrained(model_dirs[name], model_cls=ValueModel, untrained_head="zeros")
    ids, mask = padded_batch(LENGTHS, 12, left=False)
    assert np.all(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))) == 0)
    head = model.value_head.kernel
    head.set_value(jax.random.normal(jax.random.key(0), head.get_value().shape))
    values = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    save_pretrained(model, str(tmp_path / "rm"), extra_config={"pad_token_id": 1})
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        scores = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    last = mask.sum(1) - 1
    np.testing.assert_allclose(scores, values[np.arange(len(ids)), last], rtol=1e-4, atol=1e-5)
    reloaded = load_pretrained(str(tmp_path / "rm"), model_cls=ValueModel)
    np.testing.assert_allclose(np.asarray(reloaded(jnp.asarray(ids), jnp.asarray(mask))), values, atol=1e-5)


@pytest.mark.parametrize("tensor", [2, 4])
def test_qwen3_query_key_norms_shard_over_tensor_like_one_device(model_dirs, tensor):
    from jaxrlhf.parallel import TRAINING_RULES, make_mesh

    ids, mask = padded_batch(LENGTHS, 12, left=True)
    single = np.asarray(load_pretrained(model_dirs["qwen3_qk_norm"])(jnp.asarray(ids), jnp.asarray(mask)))
    mesh = make_mesh(fsdp=8 // tensor, tensor=tensor)
    sharded = load_pretrained(model_dirs["qwen3_qk_norm"], mesh=mesh, rules=TRAINING_RULES)
    out = np.asarray(jax.jit(lambda i, m: sharded(i, m))(jnp.asarray(ids), jnp.asarray(mask)))
    assert relative_error(out, single, mask) < 1e-5


@pytest.mark.parametrize("config_class", [transformers.Qwen2Config, transformers.Qwen3Config])
def test_qwen_windows_the_layers_from_max_window_layers_on(config_class):
    """layer_types when config.json has it, else use_sliding_window + max_window_layers; and back."""
    from jaxrlhf.models import DecoderConfig
    from jaxrlhf.models.families import family

    sizes = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=8)
    every_layer = config_class(**sizes, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert DecoderConfig.from_hf(every_layer.to_dict()).layer_windows == (8, 8, 8)
    assert DecoderConfig.from_hf(config_class(**sizes).to_dict()).layer_windows == ()  # off unless asked
    some_layers = config_class(**sizes, use_sliding_window=True, sliding_window=8, max_window_layers=1).to_dict()
    config = DecoderConfig.from_hf(some_layers)
    assert config.layer_windows == (None, 8, 8)
    assert DecoderConfig.from_hf({k: v for k, v in some_layers.items() if k != "layer_types"}) == config
    exported = family(config.model_type).to_hf(config)
    assert (exported["max_window_layers"], exported["sliding_window"]) == (1, 8)
    assert DecoderConfig.from_hf(exported) == config
