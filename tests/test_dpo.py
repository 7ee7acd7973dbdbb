"""DPO: the loss against a direct NumPy transcription, the answer masks, and the step sharded
equal to one device with one compile (the end-to-end gold check is in test_pipeline.py)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_fixtures import padded_batch, save_tiny_model, train_tiny_tokenizer

from jaxrlhf.config import OptimizerConfig
from jaxrlhf.data.records import Record
from jaxrlhf.data.tokenize import tokenize_pairs
from jaxrlhf.metrics import CompileCounter
from jaxrlhf.models import load_pretrained
from jaxrlhf.parallel import TRAINING_RULES, batch_sharding, make_mesh
from jaxrlhf.steps.dpo import make_dpo_loss, pair_logprobs, reference_logprobs
from jaxrlhf.steps.dpo_math import preference_loss
from jaxrlhf.train_state import init_train_state, make_optimizer, make_train_step, shardings_of, split_for_training

LOGPS = dict(  # policy and reference log-probs of four pairs
    policy_chosen=np.array([-5.0, -7.5, -3.0, -9.0]),
    policy_rejected=np.array([-6.0, -7.0, -8.0, -9.5]),
    reference_chosen=np.array([-5.5, -7.0, -4.0, -9.0]),
    reference_rejected=np.array([-5.5, -7.2, -6.0, -9.0]),
)


def numpy_dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, kind, smoothing):
    """The DPO paper's and the IPO paper's losses written out in NumPy, one pair at a time."""
    losses = []
    for pc, pr, rc, rr in zip(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
        h = (pc - rc) - (pr - rr)
        if kind == "sigmoid":
            sigmoid = lambda z: 1 / (1 + np.exp(-z))
            losses.append(-(1 - smoothing) * np.log(sigmoid(beta * h)) - smoothing * np.log(sigmoid(-beta * h)))
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
    return np.mean(losses)


@pytest.mark.parametrize("kind,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0)])
def test_the_loss_is_the_papers(kind, beta, smoothing):
    loss, metrics = preference_loss(**LOGPS, beta=beta, kind=kind, label_smoothing=smoothing)
    assert float(loss) == pytest.approx(numpy_dpo(*LOGPS.values(), beta, kind, smoothing), rel=1e-6)
    chosen = beta * (LOGPS["policy_chosen"] - LOGPS["reference_chosen"])
    rejected = beta * (LOGPS["policy_rejected"] - LOGPS["reference_rejected"])
    # three of the four pairs are won (the second is lost)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(chosen > rejected)) == 0.75
    assert float(metrics["margin"]) == pytest.approx(np.mean(chosen - rejected))


def test_the_policy_is_pushed_toward_the_chosen_answer():
    grad = jax.grad(lambda pc, pr: preference_loss(pc, pr, 0.0, 0.0, beta=0.1)[0], argnums=(0, 1))
    d_chosen, d_rejected = grad(jnp.array([-5.0]), jnp.array([-5.0]))
    assert float(d_chosen[0]) < 0 < float(d_rejected[0])  # descent raises log pi(chosen), lowers log pi(rejected)
    at_policy, metrics = preference_loss(jnp.array([-5.0]), jnp.array([-6.0]), -5.0, -6.0, beta=0.1)
    assert float(at_policy) == pytest.approx(np.log(2))  # the policy equal to the reference: log 2
    assert float(metrics["accuracy"]) == 0.5  # and every pair a tie, counted half
    with pytest.raises(ValueError, match="dpo loss"):
        preference_loss(**LOGPS, beta=0.1, kind="hinge")


def test_answers_are_masked_and_unusable_pairs_dropped(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(train_tiny_tokenizer(str(tmp_path)))
    records = [
        Record("Human: hello there.", " hi, how can I help?", " hi"),
        Record("Human: hello there.", " hi", " hi"),  # identical sides: dropped
        Record("Human: hello there. " * 20, " hi", " help"),  # no answer left within 16 tokens: dropped
        Record("Human: hi.", " hello there.", " how can I help?"),
    ]
    arrays = tokenize_pairs(records, tokenizer, 16, max_dropped=0.6, answer_masks=True)
    assert arrays["chosen_ids"].shape == (2, 16)
    prompt = len(tokenizer("Human: hello there.")["input_ids"])
    answer = len(tokenizer(" hi, how can I help?")["input_ids"])
    row = arrays["chosen_loss_mask"][0]
    assert row[:prompt].sum() == 0 and row[prompt : prompt + answer + 1].all() and row.sum() == answer + 1
    assert (arrays["rejected_loss_mask"] <= arrays["rejected_mask"]).all()


def dpo_batch():
    ids, mask = padded_batch([12, 9, 5, 12, 7, 3, 10, 11], 12, left=False, seed=3)
    loss_mask = mask.copy()
    loss_mask[:, :2] = 0  # two prompt tokens
    half = len(ids) // 2
    sides = {"chosen": slice(0, half), "rejected": slice(half, None)}
    return {
        f"{side}_{name}": jnp.asarray(array[rows])
        for side, rows in sides.items()
        for name, array in (("ids", ids), ("mask", mask), ("loss_mask", loss_mask))
    }


def run_dpo_steps(path, mesh=None, steps=3):
    model = load_pretrained(path, mesh=mesh, rules=TRAINING_RULES)
    graphdef, params, frozen = split_for_training(model, 0)
    stage = types.SimpleNamespace(beta=0.5, loss="sigmoid", label_smoothing=0.0)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant", min_lr_ratio=1.0), 10)
    reference = jax.tree.map(jnp.copy, (params, frozen))
    state = init_train_state(params, frozen, optimizer)
    step = make_train_step(graphdef, make_dpo_loss(stage), optimizer, 1, shardings_of(state))
    run_reference = reference_logprobs(average=False)(graphdef)
    batch = dpo_batch()
    if mesh is not None:
        batch = jax.device_put(batch, batch_sharding(mesh))
    in_parts = run_reference(*reference, batch, microbatches=2)
    at_once = run_reference(*reference, batch, microbatches=1)
    for name in in_parts:
        np.testing.assert_allclose(in_parts[name], at_once[name], rtol=1e-6)
    batch = {**batch, **in_parts}
    losses, accuracies = [], []
    with CompileCounter() as counter:
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            accuracies.append(float(metrics["accuracy"]))
    return losses, accuracies, counter.count, nnx.merge(graphdef, state.params, state.frozen), batch


def test_dpo_steps_sharded_equal_one_device_with_one_compile(tmp_path):
    path = save_tiny_model("llama_gqa_llama3", str(tmp_path))
    single, accuracy, compiles, model, batch = run_dpo_steps(path)
    assert single[0] == pytest.approx(np.log(2), abs=1e-6)  # the policy starts as its reference
    assert single[-1] < single[0] and accuracy[-1] == 1.0 and compiles == 1
    chosen, _ = pair_logprobs(model, batch, average=False)
    assert (np.asarray(chosen) > np.asarray(batch["reference_chosen"])).all()
    sharded, _, compiles, _, _ = run_dpo_steps(path, mesh=make_mesh(fsdp=4, tensor=2))
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    assert compiles == 1
