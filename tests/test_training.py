"""The shared training step: accumulation equals one big batch, state stays sharded, one compile."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import padded_batch, save_tiny_model

from jaxrlhf.losses import language_model_loss
from jaxrlhf.metrics import CompileCounter
from jaxrlhf.models import load_pretrained
from jaxrlhf.models.lora import apply_lora
from jaxrlhf.models.outputs import next_token_logprobs
from jaxrlhf.parallel import TRAINING_RULES, batch_sharding, make_mesh
from jaxrlhf.train_state import (
    accumulate_gradients,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    shardings_of,
    split_for_training,
    split_microbatches,
)

OPTIMIZER = types.SimpleNamespace(
    learning_rate=1e-2,
    weight_decay=0.01,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    schedule="cosine",
    warmup_steps=2,
    max_grad_norm=1.0,
    min_lr_ratio=0.1,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("llama_gqa_llama3", str(tmp_path_factory.mktemp("hf")))


def make_batch(rows=8):
    ids, mask = padded_batch([12, 9, 5, 12, 7, 3, 10, 11][:rows], 12, left=False, seed=1)
    loss_mask = mask.copy()
    loss_mask[:, :2] = 0  # a "prompt" of two tokens
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}


def run_steps(model, num_microbatches, steps=3, mesh=None, lora=0):
    graphdef, params, frozen = split_for_training(model, lora)
    optimizer = make_optimizer(OPTIMIZER, total_steps=10)
    state = init_train_state(params, frozen, optimizer)
    step = make_train_step(graphdef, language_model_loss, optimizer, num_microbatches)
    batch = make_batch()
    if mesh is not None:
        batch = jax.device_put(batch, batch_sharding(mesh))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_next_token_logprobs_against_a_loop():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 5))
    ids = jnp.array([[1, 2, 3, 4], [0, 4, 4, 1]])
    out = np.asarray(next_token_logprobs(logits, ids))
    for b in range(2):
        for t in range(3):
            expected = jax.nn.log_softmax(logits[b, t])[ids[b, t + 1]]
            assert abs(out[b, t] - expected) < 1e-5


@pytest.mark.parametrize("num_microbatches", [2, 4])
def test_gradient_accumulation_equals_one_batch(model_dir, num_microbatches):
    """Rows of unequal lengths (12 .. 3 tokens): the microbatches hold different token counts, yet
    the loss, the gradients and the updated weights equal one batch's within float32 rounding."""
    graphdef, params, frozen = split_for_training(load_pretrained(model_dir), 0)
    batch = make_batch()
    one = accumulate_gradients(language_model_loss, graphdef, params, frozen, batch, 1)
    split = accumulate_gradients(language_model_loss, graphdef, params, frozen, batch, num_microbatches)
    np.testing.assert_allclose(float(split[0]), float(one[0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(split[1]), jax.tree.leaves(one[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    assert float(split[2]["tokens"]) == float(one[2]["tokens"]) == float(batch["loss_mask"][:, 1:].sum())
    # the per-microbatch mean (each microbatch's token mean, averaged) is a different number here
    model = load_pretrained(model_dir)
    parts = split_microbatches(batch, num_microbatches)
    per_microbatch = np.mean(
        [
            float(language_model_loss(model, jax.tree.map(lambda x, i=i: x[i], parts))[0])
            for i in range(num_microbatches)
        ]
    )
    assert abs(per_microbatch - float(one[0])) > 1e-3
    _, whole = run_steps(load_pretrained(model_dir), 1, steps=2)
    _, accumulated = run_steps(load_pretrained(model_dir), num_microbatches, steps=2)
    np.testing.assert_allclose(accumulated, whole, rtol=1e-5)


def test_loss_falls_and_fsdp_matches_one_device(model_dir):
    _, single = run_steps(load_pretrained(model_dir), 2)
    assert single[-1] < single[0]
    mesh = make_mesh(fsdp=8)
    state, sharded = run_steps(load_pretrained(model_dir, mesh=mesh, rules=TRAINING_RULES), 2, mesh=mesh)
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    q = state.params["decoder"]["layers"]["attn"]["q_proj"]["kernel"].get_value()
    adam_mu = state.opt_state.inner_state[1][0].mu["decoder"]["layers"]["attn"]["q_proj"]["kernel"].get_value()
    assert q.sharding.spec == adam_mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_lora_trains_only_adapters(model_dir):
    model = load_pretrained(model_dir)
    apply_lora(model, rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    state, losses = run_steps(model, 1, steps=3, lora=2)
    assert losses[-1] < losses[0]
    names = {".".join(path) for path, _ in nnx.to_flat_state(state.params)}
    assert names == {f"decoder.layers.attn.{p}_proj.lora_{ab}" for p in "qv" for ab in "ab"}


def test_train_step_compiles_once(model_dir):
    graphdef, params, frozen = split_for_training(load_pretrained(model_dir), 0)
    optimizer = make_optimizer(OPTIMIZER, total_steps=10)
    state = init_train_state(params, frozen, optimizer)
    step = make_train_step(graphdef, language_model_loss, optimizer, 1)
    with CompileCounter() as counter:
        for _ in range(3):
            state, _ = step(state, make_batch())
        jax.block_until_ready(state)
    assert counter.count == 1


def test_the_optimizer_state_is_born_sharded_like_the_parameters_and_stays_so(model_dir):
    # left to propagation, Adam's zeros_like(param) came out replicated on every device (FSDP
    # saved nothing on it until the first step resharded it, compiling that step twice)
    mesh = make_mesh(fsdp=8)
    graphdef, params, frozen = split_for_training(load_pretrained(model_dir, mesh=mesh, rules=TRAINING_RULES), 0)
    optimizer = make_optimizer(OPTIMIZER, total_steps=10)
    state = init_train_state(params, frozen, optimizer)
    adam = state.opt_state.inner_state[1][0]

    def shardings(tree):
        return [v.get_value().sharding for _, v in nnx.to_flat_state(tree)]

    assert shardings(adam.mu) == shardings(adam.nu) == shardings(state.params)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in shardings(adam.mu))
    step = make_train_step(graphdef, language_model_loss, optimizer, 1, shardings_of(state))
    batch = jax.device_put(make_batch(), batch_sharding(mesh))
    with CompileCounter() as counter:
        for _ in range(3):
            state, _ = step(state, batch)
        jax.block_until_ready(state)
    assert counter.count == 1
    assert shardings(state.opt_state.inner_state[1][0].mu) == shardings(state.params)


def test_schedule_warms_up_then_decays():
    schedule = learning_rate_schedule(OPTIMIZER, total_steps=10)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(2)) - 1e-2) < 1e-9
    assert abs(float(schedule(10)) - 1e-3) < 1e-9


def test_packed_rows_equal_separate_rows(model_dir):
    """Two examples packed into one row (segment ids, positions restarting) see only themselves."""
    model = load_pretrained(model_dir)
    first, second = np.arange(3, 10), np.arange(20, 25)  # 7 and 5 tokens
    packed = jnp.asarray(np.concatenate([first, second])[None])
    segments = jnp.asarray(np.array([[1] * 7 + [2] * 5]))
    positions = jnp.asarray(np.concatenate([np.arange(7), np.arange(5)])[None])
    together = model(packed, jnp.ones_like(packed), positions, segments)[0]
    alone_first = model(jnp.asarray(first[None]), jnp.ones((1, 7), jnp.int32))[0]
    alone_second = model(jnp.asarray(second[None]), jnp.ones((1, 5), jnp.int32))[0]
    np.testing.assert_allclose(together[:7], alone_first, atol=1e-5)
    np.testing.assert_allclose(together[7:], alone_second, atol=1e-5)


def test_a_non_finite_step_is_skipped_and_counted(model_dir):
    """A batch whose loss overflows leaves the parameters and the optimizer state as they were;
    the next good batch trains as usual, and the counts say what happened."""

    def scaled_loss(model, batch):
        loss, metrics = language_model_loss(model, batch)
        return loss * batch["scale"][0], metrics

    model = load_pretrained(model_dir)
    graphdef, params, frozen = split_for_training(model, 0)
    optimizer = make_optimizer(types.SimpleNamespace(**{**vars(OPTIMIZER), "warmup_steps": 0}), total_steps=10)
    step = make_train_step(graphdef, scaled_loss, optimizer, num_microbatches=1)
    state = init_train_state(params, frozen, optimizer)
    batch = make_batch()
    rows = len(batch["input_ids"])
    good, bad = {**batch, "scale": np.ones(rows, np.float32)}, {**batch, "scale": np.full(rows, np.inf, np.float32)}
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, bad)
    assert not np.isfinite(float(metrics["loss"])) and int(metrics["bad_steps"]) == 1
    assert int(metrics["consecutive_bad_steps"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)  # not applied
    state, metrics = step(state, good)
    assert int(metrics["bad_steps"]) == 1 and int(metrics["consecutive_bad_steps"]) == 0
    changed = jax.tree.map(lambda a, b: bool((np.asarray(a) != b).any()), state.params, before)
    assert any(jax.tree.leaves(changed)) and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_the_compute_copy_of_the_weights_is_made_once_per_step_not_per_microbatch(model_dir):
    """bf16 compute on float32 master weights with two microbatches: the optimized program casts
    each weight matrix to bf16 outside the microbatch loop, never inside it."""
    import re

    from jaxrlhf.generation.compiled_report import _computations

    model = load_pretrained(model_dir, dtype="bfloat16", remat="block")  # recomputation casts again, per use
    graphdef, params, frozen = split_for_training(model, 0)
    optimizer = make_optimizer(OPTIMIZER, total_steps=10)
    state = init_train_state(params, frozen, optimizer)
    text = make_train_step(graphdef, language_model_loss, optimizer, 2).lower(state, make_batch()).compile().as_text()
    stacked = params["decoder"]["layers"]["mlp"]["up_proj"]["kernel"].get_value().shape  # [layers, embed, mlp]
    shapes = "|".join(",".join(map(str, shape)) for shape in (stacked, stacked[1:]))
    casts = re.compile(rf"%[\w.\-]*convert[\w.\-]* = bf16\[({shapes})\][^ ]* (convert|fusion)\(")
    computations = _computations(text)
    bodies = set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", text))
    in_loops = [
        line for name in bodies for line in computations[name] if casts.search(line) and "update-slice" not in line
    ]  # writing a layer's bf16 gradient is no cast
    outside = [
        line for name, lines in computations.items() if name not in bodies for line in lines if casts.search(line)
    ]
    assert outside and not in_loops, in_loops[:2]
