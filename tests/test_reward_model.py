"""Step 2's objective on the real model: both losses train, and fsdp=8 equals one device."""

import types

import jax
import jax.numpy as jnp
import pytest
from hf_fixtures import padded_batch, save_tiny_model

from jaxrlhf.models import ValueModel, load_pretrained
from jaxrlhf.parallel import TRAINING_RULES, batch_sharding, make_mesh
from jaxrlhf.steps.reward_model import make_reward_loss
from jaxrlhf.train_state import init_train_state, make_optimizer, make_train_step, split_for_training

OPTIMIZER = types.SimpleNamespace(
    learning_rate=3e-3,
    weight_decay=0.0,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    schedule="constant",
    warmup_steps=0,
    max_grad_norm=1.0,
    min_lr_ratio=1.0,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("qwen2_bias_tied", str(tmp_path_factory.mktemp("hf")))


def pairs():
    """Chosen and rejected share a prompt (first 4 tokens) and differ after it; right padded."""
    chosen, chosen_mask = padded_batch([10, 8, 12, 9, 7, 11, 12, 6], 12, left=False, seed=5)
    rejected, rejected_mask = padded_batch([9, 11, 7, 12, 10, 6, 8, 12], 12, left=False, seed=6)
    rejected[:, :4] = chosen[:, :4]
    return {"chosen_ids": chosen, "chosen_mask": chosen_mask, "rejected_ids": rejected, "rejected_mask": rejected_mask}


def train(model_dir, loss_kind, mesh=None, steps=4):
    model = load_pretrained(model_dir, mesh=mesh, rules=TRAINING_RULES, model_cls=ValueModel, untrained_head="zeros")
    graphdef, params, frozen = split_for_training(model, 0)
    optimizer = make_optimizer(OPTIMIZER, total_steps=steps)
    state = init_train_state(params, frozen, optimizer)
    step = make_train_step(graphdef, make_reward_loss(loss_kind, centering_coef=0.01), optimizer, 1)
    batch = {k: jnp.asarray(v) for k, v in pairs().items()}
    if mesh is not None:
        batch = jax.device_put(batch, batch_sharding(mesh))
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return history


@pytest.mark.parametrize("loss_kind", ["final_token", "deepspeed_chat"])
def test_reward_model_learns_and_fsdp_matches_one_device(model_dir, loss_kind):
    single = train(model_dir, loss_kind)
    assert single[-1]["loss"] < single[0]["loss"]
    assert single[-1]["accuracy"] >= single[0]["accuracy"]
    sharded = train(model_dir, loss_kind, mesh=make_mesh(fsdp=8))
    for a, b in zip(single, sharded):
        for key in ("loss", "chosen_mean", "rejected_mean", "margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
