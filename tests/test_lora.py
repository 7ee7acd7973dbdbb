"""LoRA adapters: output unchanged at start, only adapters trainable, merged on export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import padded_batch, save_tiny_model, torch_logits

from jaxrlhf.models import load_pretrained, save_pretrained
from jaxrlhf.models.layers import LoraParam
from jaxrlhf.models.lora import apply_lora, has_lora, merge_lora


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("opt", str(tmp_path_factory.mktemp("hf")))


def test_lora_starts_as_identity_and_merges_exactly(model_dir, tmp_path):
    ids, mask = padded_batch([12, 6, 9], 12, left=True)
    model = load_pretrained(model_dir)
    before = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert apply_lora(model, rank=4, alpha=8.0, target_modules=["q_proj", "out_proj", "fc1"]) == 3
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), before, atol=1e-6)

    # move the adapters away from zero: the output changes, and merging reproduces it exactly
    for path, variable in nnx.to_flat_state(nnx.state(model, LoraParam)):
        variable.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), variable.get_value().shape))
    adapted = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(adapted - before).max() > 1e-3
    save_pretrained(model, str(tmp_path / "merged"))
    np.testing.assert_allclose(
        torch_logits(str(tmp_path / "merged"), ids, mask)[mask == 1], adapted[mask == 1], rtol=1e-4, atol=1e-4
    )
    merged = merge_lora(model)
    assert not has_lora(merged)
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids), jnp.asarray(mask))), adapted, atol=1e-5)


def test_unknown_target_is_an_error(model_dir):
    with pytest.raises(ValueError, match="matched no projection"):
        apply_lora(load_pretrained(model_dir), rank=2, alpha=4.0, target_modules=["attention.query"])


def test_adapters_are_placed_in_the_training_layout(model_dir):
    """New adapters start on one device; the run context moves them into their FSDP shards."""
    from jaxrlhf.config import load_config
    from jaxrlhf.parallel import TRAINING_RULES, make_mesh
    from jaxrlhf.run_context import RunContext

    mesh = make_mesh(fsdp=8)
    model = load_pretrained(model_dir, mesh=mesh, rules=TRAINING_RULES)
    context = RunContext(load_config(["sft.lora.rank=4"]), mesh, logger=None)
    context.add_lora(model, context.config.sft.lora)
    lora_a = model.decoder.layers.attn.q_proj.lora_a.get_value()  # [layers, embed=64, rank]
    assert lora_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert {shard.data.shape for shard in lora_a.addressable_shards} == {(2, 8, 4)}


def test_lora_trains_a_value_models_head(model_dir):
    from jaxrlhf.models import ValueModel
    from jaxrlhf.train_state import split_for_training

    model = load_pretrained(model_dir, model_cls=ValueModel, untrained_head="zeros")
    apply_lora(model, rank=2, alpha=4.0, target_modules=["q_proj"])
    _, trainable, frozen = split_for_training(model, lora_rank=2)
    names = {".".join(path) for path, _ in nnx.to_flat_state(trainable)}
    assert "value_head.kernel" in names and "decoder.layers.attn.q_proj.lora_a" in names
    assert not any("value_head" in ".".join(path) for path, _ in nnx.to_flat_state(frozen))


def test_flops_per_token_under_lora_count_the_frozen_base_at_4n(model_dir):
    """The frozen base costs a forward (2N) and the activations' gradient (2N), no weight gradient;
    the adapters 6 per parameter (TFLOP/s and MFU were overstated at 6N for all)."""
    from jaxrlhf.config import OptimizerConfig
    from jaxrlhf.metrics import count_params
    from jaxrlhf.steps.loop import step_flops_per_token
    from jaxrlhf.train_state import init_train_state, make_optimizer, split_for_training

    model = load_pretrained(model_dir)
    base = count_params(nnx.state(model, nnx.Param))
    apply_lora(model, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    config = model.config
    adapters = config.num_layers * 2 * 4 * (config.hidden_size + config.hidden_size)  # [in, r] + [r, out] each
    _, trainable, frozen = split_for_training(model, lora_rank=4)
    state = init_train_state(trainable, frozen, make_optimizer(OptimizerConfig(), 10))
    attention = 12 * config.num_layers * config.hidden_size * 32
    assert step_flops_per_token(state, config, 32) == 6 * adapters + 4 * base + attention
