"""Batched autoregressive generation: one prefill, then one `lax.while_loop` of decode steps.

Prompts are left padded, so every row's next token lands in the same cache slot and the decode
step is a single static-shape computation. The model must be in the generation layout
(`to_generation_layout`: one module per block, compute-dtype weights); the KV cache
(`kv_cache.KVCache`, one buffer pair per layer) is allocated once per call inside the jitted
function and updated in place by the loop, which stops as soon as every row has emitted EOS or
`max_new_tokens` is reached. For n samples per prompt (GRPO-style groups) the prompts are
prefilled once and their cache repeated into n rows each before the loop.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxrlhf.generation.kernels.decode_attention import model_implementation
from jaxrlhf.generation.kernels.flash_decoding import KERNEL_BLOCK_KV
from jaxrlhf.generation.kv_cache import KVCache, decode_forward, prefill
from jaxrlhf.generation.sampling import sample_tokens, suppress_eos
from jaxrlhf.models.decoder import positions_from_mask
from jaxrlhf.parallel.rules import Rules, activation_sharding, constrain


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static generation settings (a jit static argument: hashable)."""

    eos_id: int
    pad_id: int
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    greedy: bool = False
    attention: str = "auto"  # decode-step attention: "reference" (XLA), "pallas" (the kernel) or "auto"
    # "static": all rows decode together until the longest answer ends; "refill": `slots` rows at
    # a time, a finished row's slot refilled from the queue of rows (`generation.refill`).
    engine: str = "static"
    slots: int = 0  # refill: decode slots (0: one per row)
    refill_chunk: int = 0  # refill: most rows admitted per refill (0: an eighth of the slots)

    def __post_init__(self):
        if self.engine not in ("static", "refill"):
            raise ValueError(f"engine={self.engine!r} is not one of 'static', 'refill'")
        if self.slots < 0 or self.refill_chunk < 0:
            raise ValueError(f"slots={self.slots} and refill_chunk={self.refill_chunk} must be >= 0 (0: automatic)")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
    tokens: jax.Array  # [batch, prompt + new]: the left-padded prompt, then the answer, then pad
    attention_mask: jax.Array  # [batch, prompt + new]: 1 on real prompt and answer tokens (EOS included)
    logprobs: jax.Array  # [batch, new]: log p_model(token) of each sampled token (temperature 1), 0 on pad
    steps: jax.Array  # number of decode steps run (the loop may stop early)
    occupancy: jax.Array  # mean share of the decoded rows that held an unfinished answer, per decode step


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """What the decode loop carries from one step to the next."""

    step: jax.Array  # [] int32: tokens generated so far
    tokens: jax.Array  # [batch, new] int32, pad after a row's EOS
    logprobs: jax.Array  # [batch, new] float32
    answer_mask: jax.Array  # [batch, new] int32
    done: jax.Array  # [batch] bool: the row has emitted EOS
    cache: KVCache


def pick_tokens(logits, row_keys, step, done, settings: SamplingSettings, limits=None):
    """Samples token number `step` (a scalar, or each row's own [batch]) of every row from its own
    key stream; rows already finished emit pad with log-prob 0. A row is done after this token if
    it is EOS or the row's answer reaches `limits` ([batch] lengths, or None: only
    `max_new_tokens`, which the caller's loop bounds). Returns (token, logprob, done), each [batch]."""
    step = jnp.broadcast_to(step, done.shape)
    step_keys = jax.vmap(jax.random.fold_in)(row_keys, step)
    allowed = suppress_eos(logits, settings.eos_id, step, settings.min_new_tokens)
    token = sample_tokens(
        allowed,
        step_keys,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        greedy=settings.greedy,
    )
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), token[:, None], -1)[:, 0]
    token = jnp.where(done, settings.pad_id, token)
    ended = token == settings.eos_id
    if limits is not None:
        ended |= step + 1 >= limits
    return token, jnp.where(done, 0.0, logprob), done | ended


def decode_step(
    model,
    state: DecodeState,
    prompt_len: int,
    prompt_lengths,
    row_keys,
    settings: SamplingSettings,
    cache_sharding=None,
    limits=None,
) -> DecodeState:
    """Feeds the last sampled token, writes its keys and values at its slot, samples the next one."""
    step = state.step
    slot = prompt_len + step - 1  # the previous token's cache slot
    kv_start = prompt_len - prompt_lengths  # first real slot of each row
    attention = model_implementation(settings.attention, model.config)
    hidden, cache = decode_forward(
        model,
        state.tokens[:, step - 1],
        prompt_lengths + step - 1,
        state.cache,
        slot,
        kv_start,
        attention,
        cache_sharding,
    )
    logits = model.logits(hidden[:, None])[:, 0]
    token, logprob, done = pick_tokens(logits, row_keys, step, state.done, settings, limits)
    return DecodeState(
        step=step + 1,
        tokens=state.tokens.at[:, step].set(token),
        logprobs=state.logprobs.at[:, step].set(logprob),
        answer_mask=state.answer_mask.at[:, step].set((~state.done).astype(jnp.int32)),
        done=done,
        cache=cache,
    )


def cache_length(config, settings: SamplingSettings, length: int) -> int:
    """The KV cache length for `length` tokens: whole kernel blocks when the Pallas kernel reads it."""
    if model_implementation(settings.attention, config) == "pallas":
        return -(-length // KERNEL_BLOCK_KV) * KERNEL_BLOCK_KV
    return length


def repeat_rows(x, n: int):
    """Each row of x [rows, ...] n times, prompt-major, still sharded by rows over the data axes."""
    return constrain(jnp.repeat(x, n, axis=0), ("batch",) + (None,) * (x.ndim - 1))


def generate(
    model,
    prompt_ids,
    prompt_mask,
    key,
    settings: SamplingSettings,
    cache_sharding=None,
    samples_per_prompt: int = 1,
    answer_limits=None,
) -> Generation:
    """Samples up to `settings.max_new_tokens` tokens after each left-padded prompt row, n times,
    with the engine `settings.engine` names (`refill.generate_refill` for "refill": the same tokens).

    model: a CausalLM in the generation layout (call inside jit); prompt_ids, prompt_mask:
    [prompts, prompt]. With n = `samples_per_prompt`, each prompt is prefilled once and its KV
    cache and last logits are repeated into n rows; every output has prompts * n rows,
    prompt-major (row p*n + j is sample j of prompt p). Each row draws from its own key stream
    (split by output row), so the result equals generating from the prompts repeated n times with
    n = 1, and a row's sample does not depend on its batch mates. `cache_sharding` places the KV
    cache buffers (under tensor parallelism). `answer_limits` ([prompts * n] ints in
    [1, max_new_tokens], or None) gives each row its own answer budget: a row ends at its limit as
    it would at `max_new_tokens` (e.g. per-prompt budgets; the long-tail benchmark's fixed lengths).
    """
    if settings.engine == "refill":
        from jaxrlhf.generation.refill import generate_refill  # refill builds on this module

        return generate_refill(
            model, prompt_ids, prompt_mask, key, settings, cache_sharding, samples_per_prompt, answer_limits
        )
    n = samples_per_prompt
    prompts, prompt_len = prompt_ids.shape
    batch = prompts * n  # rows decoded
    new = settings.max_new_tokens
    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_lengths = prompt_mask.sum(-1)  # [prompts]
    row_keys = jax.random.split(key, batch)  # one key stream per output row

    config = model.config
    cache = KVCache.zeros(config, prompts, cache_length(config, settings, prompt_len + new), cache_sharding)
    hidden, cache = prefill(model, prompt_ids, prompt_mask, positions_from_mask(prompt_mask), cache)
    logits = model.logits(hidden[:, -1:])[:, 0]  # [prompts, vocab]
    if n > 1:  # the prefill ran once per prompt; its n samples share its cache from here on
        per_row = (prompt_ids, prompt_mask, prompt_lengths, logits)
        prompt_ids, prompt_mask, prompt_lengths, logits = (repeat_rows(x, n) for x in per_row)
        cache = cache.repeat_rows(n, cache_sharding)  # [batch, kv_heads, cache_len, head_dim] per layer
    limits = None if answer_limits is None else jnp.clip(answer_limits, 1, new).astype(jnp.int32)
    first, first_logprob, done = pick_tokens(logits, row_keys, 0, jnp.zeros((batch,), bool), settings, limits)
    state = DecodeState(
        step=jnp.int32(1),
        tokens=jnp.full((batch, new), settings.pad_id, jnp.int32).at[:, 0].set(first),
        logprobs=jnp.zeros((batch, new), jnp.float32).at[:, 0].set(first_logprob),
        answer_mask=jnp.zeros((batch, new), jnp.int32).at[:, 0].set(1),
        done=done,
        cache=cache,
    )
    state = jax.lax.while_loop(
        lambda s: (s.step < new) & ~jnp.all(s.done),
        lambda s: decode_step(model, s, prompt_len, prompt_lengths, row_keys, settings, cache_sharding, limits),
        state,
    )
    return Generation(
        tokens=jnp.concatenate([prompt_ids.astype(jnp.int32), state.tokens], axis=1),
        attention_mask=jnp.concatenate([prompt_mask, state.answer_mask], axis=1),
        logprobs=state.logprobs,
        steps=state.step,
        occupancy=state.answer_mask[:, 1:].sum() / jnp.maximum((state.step - 1) * batch, 1),
    )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "settings", "cache_sharding", "samples_per_prompt", "activations")
)
def generate_from_state(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_ids,
    prompt_mask,
    key,
    settings: SamplingSettings,
    cache_sharding=None,
    samples_per_prompt: int = 1,
    activations: tuple[Mesh, Rules] | None = None,
    answer_limits=None,
) -> Generation:
    """`generate` as one jitted pure function of the model's split state (in the generation layout).
    `activations`, (mesh, rules) or None, is the activation sharding its trace pins: a static
    argument, so a call under another layout traces anew (a context read at trace time would keep
    the first call's layout in the cached trace)."""
    with activation_sharding(*(activations or (None, ()))):
        model = nnx.merge(graphdef, state)
        return generate(
            model, prompt_ids, prompt_mask, key, settings, cache_sharding, samples_per_prompt, answer_limits
        )
