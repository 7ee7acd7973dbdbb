"""What every step of a run shares: its config, mesh and logger, its paths, the data feed onto devices."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrlhf.checkpoint import Checkpointer
from jaxrlhf.config import PREVIOUS_STAGE, RunConfig, save_resolved_config
from jaxrlhf.data.builtin import BUILTIN
from jaxrlhf.data.fingerprint import FINGERPRINT_FILE, data_fingerprint, write_fingerprint
from jaxrlhf.data.split import step_records
from jaxrlhf.metrics import MetricsLogger
from jaxrlhf.models import CausalLM, ValueModel, load_pretrained
from jaxrlhf.models.builtin import builtin_model_dir
from jaxrlhf.models.lora import apply_lora
from jaxrlhf.parallel.mesh import barrier
from jaxrlhf.parallel.rules import (
    GENERATION_RULES,
    TRAINING_RULES,
    Rules,
    activation_sharding,
    batch_sharding,
    reshard,
    with_overrides,
)


def previous_export(config: RunConfig, previous_step: str, key: str) -> str | None:
    """What an empty model path at `key` starts from: None when this run makes it (the step is in
    `steps`), else that step's export in the output directory; refused when there is none (an
    empty path never quietly becomes the built-in model)."""
    if previous_step in config.steps:
        return None
    exported = os.path.join(config.output_dir, previous_step, "model")
    if os.path.exists(os.path.join(exported, "config.json")):
        return exported
    raise ValueError(
        f"{key} is empty (the {previous_step} step's output) but {config.output_dir} has no {previous_step} "
        f"export and {previous_step} is not in steps; give a model directory or '{BUILTIN}'"
    )


@dataclasses.dataclass
class RunContext:
    config: RunConfig
    mesh: Mesh
    logger: MetricsLogger | None  # None until the run starts writing (after the preflight checks)
    _records: dict = dataclasses.field(default_factory=dict, repr=False)  # step -> its records, read once
    # step -> its time.perf_counter() start, moved back by the seconds of attempts before a resume
    _started: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def output_dir(self) -> str:
        return self.config.output_dir

    @property
    def rules(self) -> Rules:
        """The training layout's rules: FSDP, with the config's overrides."""
        return with_overrides(TRAINING_RULES, self.config.mesh.training_rules)

    @property
    def generation_rules(self) -> Rules:
        """The generation layout's rules: tensor parallel, with the config's overrides."""
        return with_overrides(GENERATION_RULES, self.config.mesh.generation_rules)

    def activation_sharding(self):
        """A context in which jitted training code pins its activations to the training rules."""
        return activation_sharding(self.mesh, self.rules)

    @property
    def cache_dir(self) -> str:
        return self.config.data.cache_dir or os.path.join(self.config.output_dir, "cache")

    def step_dir(self, step: str, *parts: str) -> str:
        return os.path.join(self.output_dir, step, *parts)

    def model_path(self, path: str, previous_step: str | None) -> str:
        """A configured model path: a directory, "builtin", or "" for the previous step's export
        in this output directory (never the built-in model: the preflight refuses a missing one)."""
        if path == PREVIOUS_STAGE and previous_step is not None:
            exported = self.step_dir(previous_step, "model")
            if not os.path.exists(os.path.join(exported, "config.json")):
                raise FileNotFoundError(f"{exported}: step '{previous_step}' has no exported model")
            return exported
        if path == BUILTIN:
            return builtin_model_dir(self.cache_dir, seed=self.config.seed)
        return path

    def step_data(self, step: str):
        """The train/eval records of one step (sft, rm or ppo) under the run's data_split (read once)."""
        if step not in self._records:
            self._records[step] = self._read_step_data(step)
        return self._records[step]

    def data_fingerprint(self, step: str) -> dict:
        """The step's source files (size, modification time) and a hash of the records it reads."""
        data = self.config.data
        return data_fingerprint([*data.sources, *data.eval_sources], self.step_data(step))

    def start_clock(self, step: str) -> None:
        self._started[step] = time.perf_counter()

    def add_earlier_seconds(self, step: str, seconds: float) -> None:
        """A resumed step also counts the seconds its earlier attempts ran until their checkpoint."""
        self._started[step] = self._started.get(step, time.perf_counter()) - seconds

    def step_seconds(self, step: str) -> float:
        """Seconds `step` has run, over every attempt (those before a resume until their checkpoint)."""
        return time.perf_counter() - self._started.setdefault(step, time.perf_counter())

    def _read_step_data(self, step: str):
        data = self.config.data

        def resolved(sources):  # the built-in task's size travels in its path
            return [
                dataclasses.replace(s, path=f"{BUILTIN}:{data.builtin_size}") if s.layout == BUILTIN else s
                for s in sources
            ]

        return step_records(
            resolved(data.sources), step, data.data_split, data.eval_fraction, data.seed, resolved(data.eval_sources)
        )

    def open_checkpoints(self, step: str) -> tuple[Checkpointer, int | None]:
        """The step's checkpointer and the step to resume from, under the run's resume policy:
        "never" deletes the step's old checkpoints (this run starts over), "always" requires one.
        The settings and the data fingerprint the step starts with are kept beside the checkpoints;
        the fingerprint is replaced only while no checkpoint depends on it."""
        directory = self.step_dir(step, "checkpoints")
        if self.config.resume == "never" and jax.process_index() == 0 and os.path.exists(directory):
            print(f"[{step}] resume=never: removing the old checkpoints in {directory}", flush=True)
            shutil.rmtree(directory)
        barrier(f"jaxrlhf checkpoints {directory}")
        checkpointer = Checkpointer(
            directory, keep=self.config.checkpoint.keep, every_steps=self.config.checkpoint.every_steps
        )
        saved_config = os.path.join(directory, "config.yaml")
        if jax.process_index() == 0 and not os.path.exists(saved_config):  # the settings this step started with
            save_resolved_config(self.config, directory)
        latest = checkpointer.latest_step() if self.config.resume != "never" else None
        if self.config.resume == "always" and latest is None:
            raise FileNotFoundError(f"resume=always but {directory} has no checkpoint")
        fingerprint_missing = not os.path.exists(os.path.join(directory, FINGERPRINT_FILE))
        if jax.process_index() == 0 and (latest is None or fingerprint_missing):
            write_fingerprint(directory, self.data_fingerprint(step))
        return checkpointer, latest

    def load_model(self, path: str, model_config, lora=None, value_head: bool = False, new_head: bool = False):
        """A HF directory loaded in the training layout (the run's mesh and rules) with the
        configured precision and remat, adapters added if `lora` has a rank; a value head (reward
        model, critic) instead of the LM head if asked. A value model without a trained head is
        refused, unless `new_head` (the reward-model step trains one) or the model config allows it.
        Integer or quantized weights, a NaN or inf, or more tokenizer ids than embedding rows
        (unless the config resizes the table) are refused, naming the directory."""
        untrained_head = "zeros" if new_head else "warn" if model_config.allow_untrained_head else "refuse"
        model = load_pretrained(
            path,
            mesh=self.mesh,
            rules=self.rules,
            dtype=model_config.dtype,
            param_dtype=model_config.param_dtype,
            remat=model_config.remat,
            attention=model_config.attention,
            model_cls=ValueModel if value_head else CausalLM,
            untrained_head=untrained_head,
            resize_embeddings=model_config.resize_embeddings,
        )
        if lora is not None:
            self.add_lora(model, lora)
        return model

    def add_lora(self, model, lora) -> None:
        """Adds the configured adapters (if rank > 0), placed in the training layout like the rest
        of the model (new adapters are created on one device), in place."""
        if lora.rank == 0:
            return
        apply_lora(model, lora.rank, lora.alpha, lora.target_modules, seed=self.config.seed)
        nnx.update(model, reshard(nnx.state(model), self.rules, self.mesh))

    def global_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Whole-batch numpy arrays that every process holds (e.g. host reward scores) -> global
        arrays sharded over the data axes, each device taking its rows."""
        return {
            name: jax.make_array_from_callback(
                array.shape, batch_sharding(self.mesh, array.ndim, self.rules), lambda index, a=array: a[index]
            )
            for name, array in arrays.items()
        }

    def device_batch(self, local_rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global batch -> global arrays sharded over the data axes."""
        return {
            name: jax.make_array_from_process_local_data(batch_sharding(self.mesh, array.ndim, self.rules), array)
            for name, array in local_rows.items()
        }
