"""The same forward under every layout on 8 CPU devices, and the PartitionSpecs each rule gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import padded_batch, save_tiny_model
from jax.sharding import PartitionSpec as P

from jaxrlhf.models import load_pretrained
from jaxrlhf.parallel import GENERATION_RULES, TRAINING_RULES, batch_sharding, make_mesh, shard_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model("llama_gqa_llama3", str(tmp_path_factory.mktemp("hf")))  # 8 heads, 2 kv heads


@pytest.fixture(scope="module")
def reference_logits(llama_dir):
    ids, mask = padded_batch([12, 5, 9, 1, 12, 7, 3, 10], 12, left=True)
    model = load_pretrained(llama_dir)
    return ids, mask, np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def sharded_logits(model, mesh, ids, mask, rules):
    batch = batch_sharding(mesh, 2, rules)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return np.asarray(forward(state, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch)))


def specs(model):
    return {
        ".".join(path): variable.get_value().sharding.spec
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@pytest.mark.parametrize("mesh_shape", [dict(fsdp=8), dict(fsdp=4, tensor=2), dict(data=2, fsdp=4)])
def test_training_layouts_match_single_device(llama_dir, reference_logits, mesh_shape):
    ids, mask, expected = reference_logits
    mesh = make_mesh(**mesh_shape)
    model = load_pretrained(llama_dir, mesh=mesh, rules=TRAINING_RULES)
    np.testing.assert_allclose(sharded_logits(model, mesh, ids, mask, TRAINING_RULES), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_generation_layouts_match_single_device(llama_dir, reference_logits, tensor):
    ids, mask, expected = reference_logits
    mesh = make_mesh(fsdp=-1, tensor=tensor)
    model = shard_model(load_pretrained(llama_dir, mesh=mesh, rules=TRAINING_RULES), GENERATION_RULES, mesh)
    np.testing.assert_allclose(sharded_logits(model, mesh, ids, mask, GENERATION_RULES), expected, atol=1e-5, rtol=1e-5)


def test_partition_specs_under_each_rule_table(llama_dir):
    mesh = make_mesh(fsdp=4, tensor=2)
    train = specs(load_pretrained(llama_dir, mesh=mesh, rules=TRAINING_RULES))
    # layers axis never sharded; embed over fsdp; heads / mlp / vocab over tensor
    assert train["decoder.layers.attn.q_proj.kernel"] == P(None, "fsdp", "tensor")  # [layers, embed, heads, dim]
    assert train["decoder.layers.attn.k_proj.kernel"] == P(None, "fsdp", "tensor")  # 2 kv heads split in 2
    assert train["decoder.layers.attn.o_proj.kernel"] == P(None, "tensor", None, "fsdp")
    assert train["decoder.layers.mlp.down_proj.kernel"] == P(None, "tensor", "fsdp")
    assert train["decoder.embed_tokens"] == P("tensor", "fsdp")
    assert train["lm_head"] == P("fsdp", "tensor")
    assert train["decoder.layers.attn_norm.scale"] == P()

    model = shard_model(load_pretrained(llama_dir, mesh=mesh, rules=TRAINING_RULES), GENERATION_RULES, mesh)
    generate = specs(model)
    assert generate["decoder.layers.attn.q_proj.kernel"] == P(None, None, "tensor")
    assert generate["decoder.layers.attn.o_proj.kernel"] == P(None, "tensor")
    assert generate["decoder.layers.mlp.gate_proj.kernel"] == P(None, None, "tensor")
    assert generate["decoder.layers.mlp.down_proj.kernel"] == P(None, "tensor")
    assert generate["decoder.embed_tokens"] == P("tensor")
    assert generate["lm_head"] == P(None, "tensor")

    fsdp_only = specs(load_pretrained(llama_dir, mesh=make_mesh(fsdp=8), rules=TRAINING_RULES))
    assert fsdp_only["decoder.layers.attn.q_proj.kernel"] == P(None, "fsdp")
    # 2 kv heads cannot be split 4 ways: the tensor axis is dropped for that dimension
    tp4 = specs(shard_model(load_pretrained(llama_dir), GENERATION_RULES, make_mesh(fsdp=2, tensor=4)))
    assert tp4["decoder.layers.attn.k_proj.kernel"] == P()
    assert tp4["decoder.layers.attn.q_proj.kernel"] == P(None, None, "tensor")


def test_each_device_holds_only_its_shard(llama_dir):
    mesh = make_mesh(fsdp=8)
    model = load_pretrained(llama_dir, mesh=mesh, rules=TRAINING_RULES)
    embed = model.decoder.embed_tokens.get_value()  # [vocab, embed=64] over fsdp=8
    assert {shard.data.shape for shard in embed.addressable_shards} == {(embed.shape[0], 8)}


def test_rules_are_data_a_config_overrides_them(llama_dir):
    """mesh.training_rules replaces the named rules only; an unknown logical axis is a config error."""
    from jaxrlhf.config import ConfigError, load_config
    from jaxrlhf.parallel import with_overrides

    config = load_config(["mesh.training_rules={mlp: [fsdp], embed: []}"])
    rules = dict(with_overrides(TRAINING_RULES, config.mesh.training_rules))
    assert rules["mlp"] == ("fsdp",) and rules["embed"] == () and rules["heads"] == "tensor"
    model = load_pretrained(llama_dir, mesh=make_mesh(fsdp=8), rules=tuple(rules.items()))
    up = specs(model)["decoder.layers.mlp.up_proj.kernel"]  # [layers, embed, mlp]: embed replicated, mlp over fsdp
    assert up == P(None, None, "fsdp")
    with pytest.raises(ConfigError, match=r"mesh\.training_rules\.mlpp: is not a logical axis"):
        load_config(["mesh.training_rules={mlpp: [fsdp]}"])
    with pytest.raises(ConfigError, match=r"mesh\.generation_rules\.mlp: \['model'\] are not mesh axes"):
        load_config(["mesh.generation_rules={mlp: [model]}"])


def test_a_large_weight_a_mesh_axis_cannot_divide_is_named(monkeypatch):
    """320 rows over 3 x ... devices: the vocab table stays whole on `tensor`, and the warning says so."""
    from jaxrlhf.parallel import ShardingWarning, state_shardings
    from jaxrlhf.parallel import rules as rules_module

    monkeypatch.setattr(rules_module, "WARN_REPLICATED_BYTES", 1024)
    mesh = make_mesh(fsdp=1, tensor=8)
    state = nnx.State(
        {
            "embed_tokens": nnx.Param(jnp.zeros((500, 64)), axes=("vocab", "embed")),
            "small": nnx.Param(jnp.zeros((3,)), axes=("vocab",)),
        }
    )
    with pytest.warns(
        ShardingWarning,
        match=r"embed_tokens .*vocab dimension \(500\) is not divisible by mesh axis "
        r"'tensor' \(8\)",
    ):
        shardings = state_shardings(state, TRAINING_RULES, mesh)
    assert shardings["embed_tokens"].get_value().spec == P()


def test_activation_sharding_pins_the_residual_stream(llama_dir):
    """Inside `activation_sharding`, the compiled forward carries sharding constraints on the
    residual stream: rows over the data axes."""
    from jaxrlhf.parallel import activation_sharding

    mesh = make_mesh(fsdp=8)
    model = load_pretrained(llama_dir, mesh=mesh, rules=TRAINING_RULES)
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((8, 12), jnp.int32)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    plain = jax.jit(forward).lower(state, ids).as_text()
    with activation_sharding(mesh, TRAINING_RULES):  # a new function: JAX caches traces by function
        pinned = jax.jit(lambda state, ids: forward(state, ids)).lower(state, ids).as_text()
    assert plain.count("sharding_constraint") == 0 < pinned.count("sharding_constraint")
