"""Hugging Face checkpoints in and out: config.json + safetensors <-> our NNX models.

Loading places each tensor straight into its target sharding: every device copies only its own
slice out of the memory-mapped file (`jax.make_array_from_callback`), so no device, and no host
buffer, ever holds the whole model. Saving is the mirror image: every process writes the slices
its own devices hold straight into their place in files sized beforehand. Per-layer HF tensors
are stacked onto our leading "layers" axis on the way in and split again on the way out. Which
HF tensor holds which parameter, and how (transposed, fused with others), is the family's weight
map (`jaxrlhf.models.families`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from jaxrlhf.checkpoint import NonFiniteValues
from jaxrlhf.models.checks import check_finite, pad_rows, vocab_rows
from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.decoder import CausalLM, ValueModel
from jaxrlhf.models.families import family
from jaxrlhf.models.families.base import LAYERS, Path, Tensor, View
from jaxrlhf.models.layers import LoraParam
from jaxrlhf.models.safetensors_io import (
    INDEX_NAME,
    SHARD_NAME,
    WEIGHTS_NAME,
    FilePlan,
    index_checkpoint,
    plan_files,
    region,
    write_strided,
)
from jaxrlhf.parallel.mesh import barrier
from jaxrlhf.parallel.rules import TRAINING_RULES, Rules, state_shardings

# Parameters a checkpoint may lack, e.g. the value head of a critic started from a causal LM.
_OPTIONAL = {("value_head", "kernel")}
_VOCAB_TABLES = {("decoder", "embed_tokens"), ("lm_head",), ("lm_head_bias",)}


def weight_map(config: DecoderConfig) -> dict[Path, tuple[Tensor, View]]:
    """Each parameter path of ours -> the HF tensor holding it and its view (the family's weight map)."""
    return {path: (tensor, view) for tensor in family(config.model_type).weights(config) for path, view in tensor.parts}


def _is_stacked(path: Path) -> bool:
    return path[: len(LAYERS)] == LAYERS


def read_hf_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: model directory does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: missing (not a Hugging Face model directory)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: must hold a JSON object, not a {type(config).__name__}")
    return config


def load_pretrained(
    path: str,
    mesh: Mesh | None = None,
    rules: Rules = TRAINING_RULES,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: str = "none",
    model_cls=CausalLM,
    attention: str = "auto",
    untrained_head: str = "refuse",
    resize_embeddings: bool = False,
):
    """Loads a Hugging Face directory into `model_cls` (CausalLM, or ValueModel for a reward model
    or critic), sharded over `mesh` by `rules` (on one device without a mesh). Raises a one-line
    error naming a missing file, an unsupported model_type, a missing, mis-shaped, integer or
    quantized tensor, or a tokenizer with more ids than the embedding table (padded up instead
    with `resize_embeddings`), before any tensor is placed; and one naming a tensor holding a
    NaN or inf once placed. A value head the checkpoint lacks (a causal LM loaded as a value
    model) is refused, or starts at zero with `untrained_head` "zeros" (the reward-model step,
    which trains it) or "warn" (a critic deliberately started from a language model)."""
    hf, settings = read_hf_config(path), dict(dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)
    config = DecoderConfig.from_hf(hf, **settings)
    refs = _with_prefix(index_checkpoint(path), family(config.model_type).PREFIX)
    tensors = weight_map(config)
    rows = vocab_rows(path, config.vocab_size, tokenizer_size(path), resize_embeddings)
    if rows > config.vocab_size:
        config = DecoderConfig.from_hf({**hf, "vocab_size": rows}, **settings)
        refs = _padded_vocab(refs, [tensors[p][0].name for p in _VOCAB_TABLES if p in tensors], rows)
        tensors = weight_map(config)
    head = tensors[("value_head", "kernel")][0].name
    if model_cls is ValueModel and head not in refs:
        if untrained_head == "refuse":
            raise ValueError(
                f"{path}: no trained score head ({head}): a causal LM, not a reward model or critic; "
                "train one with steps=[rm], or allow_untrained_head for a critic started from a language model"
            )
        if untrained_head == "warn":
            print(f"warning: {path} has no score head ({head}): the value head starts at zero", flush=True)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(config, nnx.Rngs(0))))
    shardings = state_shardings(abstract, rules, mesh) if mesh is not None else None
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    plan = [(p, v) for p, v in nnx.to_flat_state(abstract) if not isinstance(v, LoraParam)]
    _check_tensors(plan, tensors, refs, config, path)

    loaded, placed = [], []
    for param_path, variable in plan:
        if param_path in flat_shardings:
            sharding = flat_shardings[param_path].get_value()
        else:
            sharding = SingleDeviceSharding(jax.local_devices()[0])
        abstract_value = variable.get_value()
        tensor, view = tensors[param_path]
        if param_path in _OPTIONAL and tensor.name not in refs:
            array = jax.device_put(np.zeros(abstract_value.shape, abstract_value.dtype), sharding)
        else:
            layers = config.num_layers if _is_stacked(param_path) else None
            array = _place(abstract_value, refs, tensor.name, view, layers, sharding)
            placed.append((tensor.name, array, layers))
        loaded.append((param_path, variable.replace(value=array)))
    check_finite(path, placed)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _with_prefix(refs: dict, prefix: str) -> dict:
    """A checkpoint saved from the base model (GPT2Model rather than GPT2LMHeadModel, as on the
    Hub) names its tensors without the family's prefix: read them as if it had it."""
    if any(name.startswith(prefix) for name in refs):
        return refs
    return {prefix + name: ref for name, ref in refs.items()}


@dataclasses.dataclass(frozen=True)
class _InMemory:
    """A tensor already in host memory (a padded vocabulary table), read like a TensorRef."""

    value: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    def array(self) -> np.ndarray:
        return self.value


def _padded_vocab(refs: dict, names: list[str], rows: int) -> dict:
    """`refs` with the vocabulary tables `names` (HF [vocab, dim]) padded to `rows` tokens."""
    return {name: _InMemory(pad_rows(ref.array(), rows)) if name in names else ref for name, ref in refs.items()}


def _check_tensors(plan, tensors, refs, config: DecoderConfig, path: str):
    """Every parameter has a tensor of the family's shape in the checkpoint (one per layer if stacked)."""
    for param_path, _ in plan:
        if param_path not in tensors:
            raise ValueError(f"{config.model_type}: no HF tensor holds parameter {'.'.join(param_path)}")
        tensor, _ = tensors[param_path]
        if param_path in _OPTIONAL and tensor.name not in refs:
            continue
        for layer in range(config.num_layers) if _is_stacked(param_path) else [None]:
            name = tensor.name.format(i=layer)
            if name not in refs:
                raise ValueError(f"{path}: missing tensor {name}")
            if refs[name].shape != tensor.shape:
                raise ValueError(f"{path}: tensor {name} has shape {refs[name].shape}, expected {tensor.shape}")


def _place(abstract, refs, name: str, view: View, layers: int | None, sharding):
    """One parameter as a global jax.Array; each device's callback reads only its own slice: the
    view of the memory-mapped HF tensor, indexed, is copied only by np.asarray. With `layers`,
    the parameter is stacked [layers, ...] from the per-layer tensors `name.format(i=...)`."""
    read = lambda name, index: np.asarray(view(refs[name].array())[index], dtype=abstract.dtype)
    if layers is None:
        return jax.make_array_from_callback(abstract.shape, sharding, lambda index: read(name, index))

    def read_slice(index):
        return np.stack([read(name.format(i=i), index[1:]) for i in range(layers)[index[0]]])

    return jax.make_array_from_callback(abstract.shape, sharding, read_slice)


def _module_at(model, module_path):
    for name in module_path:
        model = getattr(model, name)
    return model


def save_pretrained(
    model, path: str, dtype: str | None = None, extra_config: dict | None = None, max_shard_size: int | str = "5GB"
):
    """Writes config.json and the weights that transformers' from_pretrained loads
    (AutoModelForCausalLM for a CausalLM, AutoModelForSequenceClassification for a ValueModel):
    model.safetensors, or when they exceed `max_shard_size` (transformers' notation: "5GB",
    "500MB", bytes) model-0000i-of-0000N.safetensors files and model.safetensors.index.json.
    LoRA adapters are merged into their kernels; `dtype` (default: the parameter dtype) sets the
    stored precision; a NaN or inf refuses the export. Every process must call it when the model
    spans processes: each writes only the slices its own devices hold, straight into place (see
    `_write_slices`), so no host holds the model or a whole sharded tensor. A model on one
    process's devices is written by process 0 alone.

    The files are planned from shapes alone (the same plan on every process), created at full
    size in <path>.tmp-export by process 0 (on a filesystem every process sees), filled by every
    process, and moved into `path` by process 0 once all have written (`_install`)."""
    config: DecoderConfig = model.config
    out_dtype = np.dtype(dtype or config.param_dtype)
    params = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if not isinstance(v, LoraParam)]
    spanning = any(not v.get_value().is_fully_addressable for _, v in params)
    if not spanning and jax.process_index() != 0:
        return
    sync = barrier if spanning else lambda name: None
    order = [param_path for param_path, _ in params]
    plan = plan_files([(name, shape, out_dtype) for name, shape in _exported_tensors(config, order)], max_shard_size)
    tensors = weight_map(config)
    tmp, lead = f"{path}.tmp-export", jax.process_index() == 0
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        plan.create(tmp)
    sync(f"jaxrlhf export {path}: files created")
    files = {name: os.open(os.path.join(tmp, name), os.O_WRONLY) for name in plan.headers}
    bad = len(order)  # the first parameter with a NaN or inf in a slice this process wrote
    try:
        for n, (param_path, variable) in enumerate(params):
            tensor, view = tensors[param_path]
            layers = config.num_layers if _is_stacked(param_path) else None
            value = _exported_value(model, param_path, variable)
            if not _write_slices(value, tensor, view, layers, out_dtype, plan, files, spanning):
                bad = min(bad, n)
    finally:
        for fd in files.values():
            os.close(fd)
    sync(f"jaxrlhf export {path}: slices written")
    if spanning:  # what every process found, so that all refuse together
        bad = int(multihost_utils.process_allgather(np.int32(bad)).min())
    if bad < len(order):
        if lead:
            shutil.rmtree(tmp)
        raise NonFiniteValues(f"refusing to export {path}: {'.'.join(map(str, order[bad]))} holds a NaN or inf")
    if lead:
        _write_json(os.path.join(tmp, "config.json"), _hf_config(model, out_dtype, extra_config))
        if plan.index() is not None:
            _write_json(os.path.join(tmp, INDEX_NAME), plan.index())
        _install(tmp, path)
    sync(f"jaxrlhf export {path}: done")


def _exported_value(model, param_path: Path, variable) -> jax.Array:
    """The array to export for one parameter: a kernel with its LoRA adapter, if any, folded in."""
    if param_path[-1] == "kernel":
        return _module_at(model, param_path[:-1]).merged_kernel()
    return variable.get_value()


def _exported_tensors(config: DecoderConfig, present) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every HF tensor the parameters `present` fill, in the order transformers
    saves them: the tensors before the layers, layer by layer, then the rest."""
    weights = family(config.model_type).weights(config)
    first_layer = min(n for n, tensor in enumerate(weights) if _is_stacked(tensor.parts[0][0]))
    entries = []
    for position, tensor in enumerate(weights):
        found = [param_path in present for param_path, _ in tensor.parts]
        if not any(found):
            continue
        if not all(found):
            raise ValueError(f"{tensor.name}: the model has only some of the parameters it joins")
        if _is_stacked(tensor.parts[0][0]):
            entries += [((i, position), tensor.name.format(i=i), tensor.shape) for i in range(config.num_layers)]
        else:
            layer = -1 if position < first_layer else config.num_layers
            entries.append(((layer, position), tensor.name, tensor.shape))
    return [(name, shape) for _, name, shape in sorted(entries)]


def _write_slices(array, tensor: Tensor, view: View, layers, dtype, plan: FilePlan, files: dict, spanning: bool):
    """Writes the slices of one parameter that this process holds into the HF tensor(s) holding
    it; returns whether they were all finite. Each device's shard (one of each replica: replica_id
    0; an array on one process's devices only from process 0 when the model spans processes) is
    copied to the host, cast to `dtype` and written, layer by layer if stacked, through the
    family's view of the HF tensor. The view tells where each element lands, so a fused or
    transposed tensor (GPT-NeoX's query_key_value, GPT-2's c_attn, any torch Linear) is written
    by slice like any other."""
    finite = True
    if spanning and array.is_fully_addressable and jax.process_index() != 0:
        return finite
    for shard in array.addressable_shards:
        if shard.replica_id != 0:
            continue
        host = np.asarray(shard.data)  # one device's slice: [layers?, ...]
        index = shard.index if layers is None else shard.index[1:]
        offset, strides = region(tensor.shape, dtype, view, index)
        if layers is None:
            blocks = [(tensor.name, host)]
        else:
            blocks = [(tensor.name.format(i=i), host[n]) for n, i in enumerate(range(layers)[shard.index[0]])]
        for name, block in blocks:
            block = block.astype(dtype, copy=False)
            finite = finite and bool(np.isfinite(block).all())
            file, start = plan.location[name]
            write_strided(files[file], start + offset, strides, block)
    return finite


def _hf_config(model, dtype: np.dtype, extra_config: dict | None) -> dict:
    config: DecoderConfig = model.config
    causal_lm, sequence_classification = family(config.model_type).ARCHITECTURES[config.model_type]
    hf_config = config.to_hf()
    if isinstance(model, ValueModel):
        hf_config.update(architectures=[sequence_classification], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    else:
        hf_config.update(architectures=[causal_lm])
    hf_config.update(dtype=str(dtype), **(extra_config or {}))
    hf_config.pop("torch_dtype", None)
    return hf_config


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def _install(tmp: str, path: str) -> None:
    """Moves a finished export from `tmp` into `path`, file by file, each replacing its old
    version atomically: the weights and index first, then the old export's other weight files
    are removed, config.json last (its presence marks a complete export)."""
    os.makedirs(path, exist_ok=True)
    new = set(os.listdir(tmp))
    for name in sorted(new - {"config.json"}):
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    for name in os.listdir(path):
        if name not in new and (name in (WEIGHTS_NAME, INDEX_NAME) or SHARD_NAME.fullmatch(name)):
            os.remove(os.path.join(path, name))
    os.replace(os.path.join(tmp, "config.json"), os.path.join(path, "config.json"))
    os.rmdir(tmp)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in _TOKENIZER_FILES)


def load_tokenizer(path: str):
    """The tokenizer saved beside the model, through transformers.AutoTokenizer."""
    import transformers

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: model directory does not exist")
    if not has_tokenizer(path):
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    return transformers.AutoTokenizer.from_pretrained(path)


def tokenizer_size(path: str) -> int | None:
    """Every id of the tokenizer beside a model, added tokens included (len(tokenizer)); None without one."""
    return len(load_tokenizer(path)) if has_tokenizer(path) else None


def check_model_dir(path: str, resize_embeddings: bool = False) -> None:
    """What a model directory can be refused for without reading its weights: an integer or
    quantized tensor (from the safetensors headers), a tokenizer with more ids than the embedding table."""
    config = DecoderConfig.from_hf(read_hf_config(path))
    index_checkpoint(path)
    vocab_rows(path, config.vocab_size, tokenizer_size(path), resize_embeddings)


def export_model(
    model, directory: str, tokenizer_source: str, extra_config: dict | None = None, max_shard_size: int | str = "5GB"
) -> str:
    """Writes model (LoRA merged, in files of at most `max_shard_size`) + config + tokenizer files
    that transformers loads. Every process must call it."""
    tokenizer = load_tokenizer(tokenizer_source)
    extra = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, **(extra_config or {})}
    save_pretrained(model, directory, extra_config=extra, max_shard_size=max_shard_size)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(directory)
    barrier(f"jaxrlhf export {directory}")  # later steps on every process read what process 0 wrote
    return directory
