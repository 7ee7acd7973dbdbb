"""The refill engine: continuous batching inside the one jitted generation program.

Static generation decodes every row until the longest answer of the batch ends, and a finished
row still costs a decode step: a batch costs rows x longest answer. RLHF answers are long-tailed,
so here a fixed number of decode slots is fed from the queue of the rollout's rows. One
`while_loop` decodes a token for every slot; whenever enough slots have come free (EOS or the
row's limit) it first prefills the next queued prompts, a fixed-size chunk at a time (masked, so
shapes stay static), into them. The KV cache is sized by the slots, not by the rows.

A slot keeps its own length: its row's prompt sits left padded in the slot's cache rows
[0, prompt) as in static generation, its answer from `prompt` on, and each decode step writes
every slot at its own position and attends to its own key range. Each row samples from its own
key stream (split by row, folded by the row's own step), so a row's tokens and log-probs are
those static generation gives it, whatever its slot and slot mates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.generation.generate import Generation, SamplingSettings, cache_length, pick_tokens, repeat_rows
from jaxrlhf.generation.kernels.decode_attention import model_implementation
from jaxrlhf.generation.kv_cache import KVCache, decode_forward, prefill
from jaxrlhf.models.decoder import positions_from_mask

FREE = -1  # slot_row of a slot that holds no row


@dataclasses.dataclass(frozen=True)
class Admission:
    """The static size of one admission of queued rows into free slots."""

    rows: int  # most rows admitted at once
    prompts: int  # prompts prefilled for them: enough for `rows` consecutive queued rows

    @classmethod
    def of(cls, rows: int, samples_per_prompt: int, num_prompts: int) -> Admission:
        """With n samples per prompt, `rows` consecutive rows span at most (rows + n - 2) // n + 1 prompts."""
        n = samples_per_prompt
        return cls(rows, min(num_prompts, (rows + n - 2) // n + 1))


def slots_and_chunk(rows: int, settings: SamplingSettings) -> tuple[int, int]:
    """The decode slots (default: one per row) and the refill chunk (default: an eighth of the slots:
    a freed slot waits for a few others, so that a prefill serves several rows)."""
    slots = min(settings.slots or rows, rows)
    return slots, min(settings.refill_chunk or max(1, slots // 8), slots)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RefillState:
    """What the refill loop carries from one step to the next."""

    queued: jax.Array  # [] int32: rows taken from the queue so far (the queue's head)
    slot_row: jax.Array  # [slots] int32: the row a slot decodes, FREE when none
    slot_step: jax.Array  # [slots] int32: tokens its row has so far
    slot_token: jax.Array  # [slots] int32: its row's last token, fed to the next decode step
    tokens: jax.Array  # [rows, new] int32, pad after a row's end
    logprobs: jax.Array  # [rows, new] float32
    answer_mask: jax.Array  # [rows, new] int32
    cache: KVCache  # [slots, kv_heads, prompt + new, head_dim] per layer
    iterations: jax.Array  # [] int32: decode steps run
    live_slot_steps: jax.Array  # [] int32: slots that held an unfinished row, summed over decode steps


def _chunk_sharding(cache_sharding):
    """The prefill chunk's cache: kv heads as the slots' cache, rows whole (a chunk is small)."""
    if cache_sharding is None:
        return None
    return NamedSharding(cache_sharding.mesh, PartitionSpec(None, *tuple(cache_sharding.spec)[1:]))


def _admit(model, state: RefillState, prompts, row_keys, limits, settings, size: Admission, n, cache_sharding):
    """Takes up to `size.rows` rows from the queue into the first free slots: prefills their
    prompts once each, writes the prompts' keys and values into the slots, samples each row's first
    token. Rows whose answer ends at that token leave their slot free again."""
    prompt_ids, prompt_mask = prompts
    num_prompts, prompt_len = prompt_ids.shape
    rows, slots = row_keys.shape[0], state.slot_row.shape[0]
    free = state.slot_row == FREE
    count = jnp.minimum(jnp.minimum(free.sum(), size.rows), rows - state.queued)
    admitted = jnp.arange(size.rows) < count  # [size.rows]
    row = jnp.minimum(state.queued + jnp.arange(size.rows), rows - 1)
    target = jnp.where(admitted, jnp.nonzero(free, size=size.rows, fill_value=slots)[0], slots)  # slots: dropped

    first_prompt = jnp.minimum(state.queued // n, num_prompts - size.prompts)
    ids = jax.lax.dynamic_slice_in_dim(prompt_ids, first_prompt, size.prompts)
    mask = jax.lax.dynamic_slice_in_dim(prompt_mask, first_prompt, size.prompts)
    chunk_cache = KVCache.zeros(model.config, size.prompts, prompt_len, _chunk_sharding(cache_sharding))
    hidden, chunk_cache = prefill(model, ids, mask, positions_from_mask(mask), chunk_cache)
    logits = model.logits(hidden[:, -1:])[:, 0]  # [size.prompts, vocab]
    local = jnp.clip(row // n - first_prompt, 0, size.prompts - 1)  # each row's prompt in the chunk

    first, logprob, done = pick_tokens(logits[local], row_keys[row], 0, ~admitted, settings, limits[row])
    out_row = jnp.where(admitted, row, rows)  # rows: dropped
    return dataclasses.replace(
        state,
        queued=state.queued + count,
        slot_row=state.slot_row.at[target].set(jnp.where(done, FREE, row), mode="drop"),
        slot_step=state.slot_step.at[target].set(1, mode="drop"),
        slot_token=state.slot_token.at[target].set(first, mode="drop"),
        tokens=state.tokens.at[out_row, 0].set(first, mode="drop"),
        logprobs=state.logprobs.at[out_row, 0].set(logprob, mode="drop"),
        answer_mask=state.answer_mask.at[out_row, 0].set(1, mode="drop"),
        cache=state.cache.write_rows(chunk_cache.take_rows(local), target),
    )


def _decode(model, state: RefillState, row_lengths, row_keys, limits, settings, prompt_len: int, cache_sharding):
    """One token for every slot, each at its own position; a slot whose row ends comes free."""
    rows = row_keys.shape[0]
    live = state.slot_row != FREE
    row = jnp.maximum(state.slot_row, 0)
    length, step = row_lengths[row], state.slot_step
    # The fed token's cache slot; a free slot writes at `prompt_len`, which its next row's own
    # decode steps overwrite before reading.
    write = jnp.where(live, prompt_len + step - 1, prompt_len)
    attention = model_implementation(settings.attention, model.config)
    hidden, cache = decode_forward(
        model, state.slot_token, length + step - 1, state.cache, write, prompt_len - length, attention, cache_sharding
    )
    logits = model.logits(hidden[:, None])[:, 0]
    token, logprob, done = pick_tokens(logits, row_keys[row], step, ~live, settings, limits[row])
    out_row = jnp.where(live, state.slot_row, rows)  # rows: dropped
    return dataclasses.replace(
        state,
        slot_row=jnp.where(done, FREE, state.slot_row),
        slot_step=step + live,
        slot_token=token,
        tokens=state.tokens.at[out_row, step].set(token, mode="drop"),
        logprobs=state.logprobs.at[out_row, step].set(logprob, mode="drop"),
        answer_mask=state.answer_mask.at[out_row, step].set(1, mode="drop"),
        cache=cache,
        iterations=state.iterations + 1,
        live_slot_steps=state.live_slot_steps + live.sum(),
    )


def generate_refill(
    model,
    prompt_ids,
    prompt_mask,
    key,
    settings: SamplingSettings,
    cache_sharding=None,
    samples_per_prompt: int = 1,
    answer_limits=None,
) -> Generation:
    """`generate.generate` by refilled slots: the same arguments and the same Generation, token for
    token; `steps` counts decode steps and `occupancy` the mean share of slots that held a row.
    The slots are filled at once before the loop, and refilled a chunk at a time inside it."""
    n = samples_per_prompt
    num_prompts, prompt_len = prompt_ids.shape
    rows, new = num_prompts * n, settings.max_new_tokens
    slots, chunk = slots_and_chunk(rows, settings)
    prompt_mask = prompt_mask.astype(jnp.int32)
    row_keys = jax.random.split(key, rows)  # one key stream per output row, as in static generation
    limits = jnp.full((rows,), new, jnp.int32) if answer_limits is None else jnp.clip(answer_limits, 1, new)
    row_lengths = repeat_rows(prompt_mask.sum(-1), n)  # [rows]

    config = model.config
    cache_len = cache_length(config, settings, prompt_len + new)
    state = RefillState(
        queued=jnp.int32(0),
        slot_row=jnp.full((slots,), FREE, jnp.int32),
        slot_step=jnp.zeros((slots,), jnp.int32),
        slot_token=jnp.full((slots,), settings.pad_id, jnp.int32),
        tokens=jnp.full((rows, new), settings.pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, new), jnp.float32),
        answer_mask=jnp.zeros((rows, new), jnp.int32),
        cache=KVCache.zeros(config, slots, cache_len, cache_sharding),
        iterations=jnp.int32(0),
        live_slot_steps=jnp.int32(0),
    )

    def should_admit(s: RefillState):
        """Refill once a whole chunk of slots is free (or all the queue has left fits)."""
        remaining = rows - s.queued
        return (remaining > 0) & ((s.slot_row == FREE).sum() >= jnp.minimum(chunk, remaining))

    def admit(s, size: Admission):
        return _admit(model, s, (prompt_ids, prompt_mask), row_keys, limits, settings, size, n, cache_sharding)

    def step(s: RefillState) -> RefillState:
        s = jax.lax.cond(should_admit(s), lambda s: admit(s, Admission.of(chunk, n, num_prompts)), lambda s: s, s)
        return _decode(model, s, row_lengths, row_keys, limits, settings, prompt_len, cache_sharding)

    state = admit(state, Admission.of(slots, n, num_prompts))
    state = jax.lax.while_loop(lambda s: (s.queued < rows) | jnp.any(s.slot_row != FREE), step, state)
    return Generation(
        tokens=jnp.concatenate([repeat_rows(prompt_ids.astype(jnp.int32), n), state.tokens], axis=1),
        attention_mask=jnp.concatenate([repeat_rows(prompt_mask, n), state.answer_mask], axis=1),
        logprobs=state.logprobs,
        steps=state.iterations,
        occupancy=state.live_slot_steps / jnp.maximum(state.iterations * slots, 1),
    )
