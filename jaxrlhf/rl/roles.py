"""The models of step 3 as typed containers: the actor (trained), its frozen reference, the critic
(trained) and the frozen reward model, each split into a static graph and its states. Only the
actor is always there: the critic-free algorithms have no critic, reward functions alone need no
reward model, and kl_coef 0 needs no reference (under LoRA the reference is the actor's base)."""

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
    reference: ModelStates | None
    critic: ModelStates | None
    reward_model: ModelStates | None


@dataclasses.dataclass(frozen=True)
class RoleGraphs:
    """Each role's static graph (hashable: closed over by the jitted experience function)."""

    actor: nnx.GraphDef
    reference: nnx.GraphDef | None
    critic: nnx.GraphDef | None
    reward_model: nnx.GraphDef | None


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
    """The roles just loaded, and where each one's weights, config and tokenizer come from."""

    actor: LoadedModel
    reference: LoadedModel | None  # None: the actor's own base with adapters off (LoRA), or no reference
    critic: LoadedModel | None  # None: a critic-free algorithm
    reward_model: LoadedModel | None  # None: reward functions alone
    sources: dict[str, str]
    uses_reference: bool  # kl_coef > 0 (or adaptive): the KL to the SFT policy is part of training

    def graphs(self) -> RoleGraphs:
        reference = self.reference or (self.actor if self.uses_reference else None)
        return RoleGraphs(
            actor=self.actor.graphdef,
            reference=None if reference is None else reference.graphdef,
            critic=None if self.critic is None else self.critic.graphdef,
            reward_model=None if self.reward_model is None else self.reward_model.graphdef,
        )


def uses_reference(ppo) -> bool:
    """kl_coef 0 (and no controller to raise it) loads no reference model at all."""
    return ppo.kl_coef > 0 or ppo.adaptive_kl


def load_roles(ctx, needs_critic: bool, uses_reward_model: bool) -> LoadedRoles:
    """The actor (and its reference) from SFT; the critic and the reward model from RM, unless
    configured otherwise; only the roles the algorithm and the reward use, each checked first
    against the longest rollout."""
    ppo = ctx.config.ppo
    sources = {"actor": ctx.model_path(ppo.actor_model.path, previous_step="sft")}
    critic_source = None  # where the critic starts, and the reward model unless set: the RM step's export
    if needs_critic or uses_reward_model:
        critic_source = ctx.model_path(ppo.critic_model.path, previous_step="rm")
    if needs_critic:
        sources["critic"] = critic_source
    if uses_reward_model:
        sources["reward_model"] = (
            critic_source
            if ppo.reward_model.path == PREVIOUS_STAGE
            else ctx.model_path(ppo.reward_model.path, previous_step="rm")
        )
    for path in sources.values():
        check_sequence_fits(
            path, ppo.max_prompt_seq_len + ppo.max_answer_seq_len, "ppo.max_prompt_seq_len + max_answer_seq_len"
        )
    reference = uses_reference(ppo)
    return LoadedRoles(
        actor=load_model(ctx, sources["actor"], ppo.actor_model, ppo.actor_lora),
        reference=load_model(ctx, sources["actor"], ppo.actor_model) if reference and not ppo.actor_lora.rank else None,
        critic=load_model(ctx, critic_source, ppo.critic_model, ppo.critic_lora, value_head=True)
        if needs_critic
        else None,
        reward_model=load_model(ctx, sources["reward_model"], ppo.reward_model, value_head=True)
        if uses_reward_model
        else None,
        sources={**sources, "actor_ema": sources["actor"]},
        uses_reference=reference,
    )
