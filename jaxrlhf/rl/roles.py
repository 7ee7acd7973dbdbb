"""The four models of step 3 as typed containers: the actor (trained), its frozen reference, the
critic (trained) and the frozen reward model, each split into a static graph and its states."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxrlhf.config import PREVIOUS_STAGE
from jaxrlhf.preflight import check_sequence_fits
from jaxrlhf.train_state import split_for_training


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelStates:
    """A model's trainable parameters and frozen rest (a jit argument: a pytree)."""

    params: nnx.State
    frozen: nnx.State

    def model(self, graphdef: nnx.GraphDef) -> nnx.Module:
        return nnx.merge(graphdef, self.params, self.frozen)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoleStates:
    """What the experience pass reads: each role's states in the training layout."""

    actor: ModelStates
    reference: ModelStates
    critic: ModelStates
    reward_model: ModelStates


@dataclasses.dataclass(frozen=True)
class RoleGraphs:
    """Each role's static graph (hashable: closed over by the jitted experience function)."""

    actor: nnx.GraphDef
    reference: nnx.GraphDef
    critic: nnx.GraphDef
    reward_model: nnx.GraphDef


@dataclasses.dataclass
class LoadedModel:
    """A model just loaded for training: its graph and its split states."""

    graphdef: nnx.GraphDef
    states: ModelStates


def load_model(ctx, path: str, model_config, lora=None, value_head: bool = False) -> LoadedModel:
    """Loads a HF directory in the training (FSDP) layout, with adapters if `lora` has a rank."""
    model = ctx.load_model(path, model_config, lora, value_head)
    graphdef, params, frozen = split_for_training(model, lora.rank if lora is not None else 0)
    return LoadedModel(graphdef, ModelStates(params, frozen))


@dataclasses.dataclass
class LoadedRoles:
    """The four roles just loaded, and where each one's weights, config and tokenizer come from."""

    actor: LoadedModel
    reference: LoadedModel | None  # None: the actor's own base with adapters off (LoRA)
    critic: LoadedModel
    reward_model: LoadedModel
    sources: dict[str, str]

    def graphs(self) -> RoleGraphs:
        return RoleGraphs(
            actor=self.actor.graphdef,
            reference=(self.reference or self.actor).graphdef,
            critic=self.critic.graphdef,
            reward_model=self.reward_model.graphdef,
        )


def load_roles(ctx) -> LoadedRoles:
    """The actor (and its reference) from SFT, the critic and the reward model from RM, unless
    configured otherwise; each checked first against the longest rollout."""
    ppo = ctx.config.ppo
    sources = {
        "actor": ctx.model_path(ppo.actor_model.path, previous_step="sft"),
        "critic": ctx.model_path(ppo.critic_model.path, previous_step="rm"),
    }
    sources["reward_model"] = (
        sources["critic"]
        if ppo.reward_model.path == PREVIOUS_STAGE
        else ctx.model_path(ppo.reward_model.path, previous_step="rm")
    )
    for path in sources.values():
        check_sequence_fits(
            path, ppo.max_prompt_seq_len + ppo.max_answer_seq_len, "ppo.max_prompt_seq_len + max_answer_seq_len"
        )
    return LoadedRoles(
        actor=load_model(ctx, sources["actor"], ppo.actor_model, ppo.actor_lora),
        reference=None if ppo.actor_lora.rank > 0 else load_model(ctx, sources["actor"], ppo.actor_model),
        critic=load_model(ctx, sources["critic"], ppo.critic_model, ppo.critic_lora, value_head=True),
        reward_model=load_model(ctx, sources["reward_model"], ppo.reward_model, value_head=True),
        sources={**sources, "actor_ema": sources["actor"]},
    )
