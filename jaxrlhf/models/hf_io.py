"""Hugging Face checkpoints in and out: config.json + safetensors <-> our NNX models.

Loading places each tensor straight into its target sharding: every device copies only its own
slice out of the memory-mapped file (`jax.make_array_from_callback`), so no device, and no host
buffer, ever holds the whole model. Per-layer HF tensors are stacked onto our leading "layers"
axis on the way in and split again on the way out.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jaxrlhf.checkpoint import NonFiniteValues
from jaxrlhf.models.checks import check_finite, pad_rows, vocab_rows
from jaxrlhf.models.config import LLAMA_FAMILY, DecoderConfig
from jaxrlhf.models.decoder import CausalLM, ValueModel
from jaxrlhf.models.layers import LoraParam
from jaxrlhf.models.safetensors_io import index_checkpoint, write_safetensors
from jaxrlhf.parallel.mesh import barrier, to_host
from jaxrlhf.parallel.rules import TRAINING_RULES, Rules, state_shardings

# Our module names -> the family's names in HF state dicts.
_RENAMES = {
    "llama": {
        "decoder": "model",
        "value_head": "score",
        "attn": "self_attn",
        "final_norm": "norm",
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
    },
    "opt": {
        "decoder": "model.decoder",
        "value_head": "score",
        "attn": "self_attn",
        "mlp": None,
        "o_proj": "out_proj",
        "up_proj": "fc1",
        "down_proj": "fc2",
        "final_norm": "final_layer_norm",
        "attn_norm": "self_attn_layer_norm",
        "mlp_norm": "final_layer_norm",
    },
}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_FAMILY_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "opt": "OPT"}
# Parameters a checkpoint may lack, e.g. the value head of a critic started from a causal LM.
_OPTIONAL = {("value_head", "kernel")}


def hf_tensor_name(path: tuple[str, ...], model_type: str) -> str:
    """('decoder', 'layers', 'attn', 'q_proj', 'kernel') -> 'model.layers.{i}.self_attn.q_proj.weight'."""
    renames = _RENAMES["llama" if model_type in LLAMA_FAMILY else model_type]
    *modules, leaf = path
    parts = [renames.get(m, m) + (".{i}" if m == "layers" else "") for m in modules if renames.get(m, m)]
    parts.append(_LEAVES.get(leaf, leaf + ".weight"))
    return ".".join(parts)


def _kernel_layout(path, shape):
    """For a Dense kernel (*in, *out) stored by torch as [prod(out), prod(in)]: (in_dims, out_dims)."""
    if path[-1] == "kernel":
        in_ndim = 2 if path[-2] == "o_proj" else 1
        return shape[:in_ndim], shape[in_ndim:]
    if path[-1] == "lm_head":
        return shape[:1], shape[1:]
    if path[-1] == "bias" and len(shape) > 1:  # per-head bias [heads, head_dim], flat in HF
        return (), shape
    return None


def _to_ours(hf_array: np.ndarray, layout) -> np.ndarray:
    """HF layout -> ours, as a view (no copy), so slicing it reads only the slice."""
    if layout is None:
        return hf_array
    in_dims, out_dims = layout
    if not in_dims:
        return hf_array.reshape(out_dims)
    w = hf_array.reshape(*out_dims, *in_dims)
    n_out = len(out_dims)
    return w.transpose(*range(n_out, n_out + len(in_dims)), *range(n_out))


def _to_hf(array: np.ndarray, layout) -> np.ndarray:
    if layout is None:
        return array
    in_dims, out_dims = layout
    if not in_dims:
        return array.reshape(-1)
    n_in = len(in_dims)
    w = array.transpose(*range(n_in, n_in + len(out_dims)), *range(n_in))
    return w.reshape(int(np.prod(out_dims)), int(np.prod(in_dims)))


def _hf_shape(our_shape, layout):
    if layout is None:
        return tuple(our_shape)
    in_dims, out_dims = layout
    if not in_dims:
        return (int(np.prod(out_dims)),)
    return (int(np.prod(out_dims)), int(np.prod(in_dims)))


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
    refs = index_checkpoint(path)
    rows = vocab_rows(path, config.vocab_size, tokenizer_size(path), resize_embeddings)
    if rows > config.vocab_size:
        refs = _padded_vocab(refs, config.model_type, rows)
        config = DecoderConfig.from_hf({**hf, "vocab_size": rows}, **settings)
    head = hf_tensor_name(("value_head", "kernel"), config.model_type)
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
    _check_tensors(plan, refs, config, path)

    loaded, placed = [], []
    for param_path, variable in plan:
        if param_path in flat_shardings:
            sharding = flat_shardings[param_path].get_value()
        else:
            sharding = SingleDeviceSharding(jax.local_devices()[0])
        abstract_value = variable.get_value()
        if param_path in _OPTIONAL and hf_tensor_name(param_path, config.model_type) not in refs:
            array = jax.device_put(np.zeros(abstract_value.shape, abstract_value.dtype), sharding)
        else:
            array = _place(param_path, abstract_value, refs, config, sharding)
            stacked = param_path[:2] == ("decoder", "layers")
            placed.append(
                (hf_tensor_name(param_path, config.model_type), array, config.num_layers if stacked else None)
            )
        loaded.append((param_path, variable.replace(value=array)))
    check_finite(path, placed)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


@dataclasses.dataclass(frozen=True)
class _InMemory:
    """A tensor already in host memory (a padded vocabulary table), read like a TensorRef."""

    value: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    def array(self) -> np.ndarray:
        return self.value


def _padded_vocab(refs: dict, model_type: str, rows: int) -> dict:
    """`refs` with the embedding table (and an untied LM head) padded to `rows` tokens."""
    names = {hf_tensor_name(("decoder", "embed_tokens"), model_type), hf_tensor_name(("lm_head",), model_type)}
    return {name: _InMemory(pad_rows(ref.array(), rows)) if name in names else ref for name, ref in refs.items()}


def _check_tensors(plan, refs, config: DecoderConfig, path: str):
    for param_path, variable in plan:
        shape = variable.get_value().shape
        stacked = param_path[:2] == ("decoder", "layers")
        name = hf_tensor_name(param_path, config.model_type)
        if param_path in _OPTIONAL and name not in refs:
            continue
        expected = _hf_shape(
            shape[1:] if stacked else shape, _kernel_layout(param_path, shape[1:] if stacked else shape)
        )
        for layer in range(config.num_layers) if stacked else [None]:
            tensor = name.format(i=layer)
            if tensor not in refs:
                raise ValueError(f"{path}: missing tensor {tensor}")
            if refs[tensor].shape != expected:
                raise ValueError(f"{path}: tensor {tensor} has shape {refs[tensor].shape}, expected {expected}")


def _place(param_path, abstract, refs, config: DecoderConfig, sharding):
    """One parameter as a global jax.Array; each device's callback reads only its own slice."""
    stacked = param_path[:2] == ("decoder", "layers")
    name = hf_tensor_name(param_path, config.model_type)
    layer_shape = abstract.shape[1:] if stacked else abstract.shape
    layout = _kernel_layout(param_path, layer_shape)

    def read_slice(index):
        if not stacked:
            return np.asarray(_to_ours(refs[name].array(), layout)[index], dtype=abstract.dtype)
        layers = range(config.num_layers)[index[0]]
        return np.stack(
            [
                np.asarray(_to_ours(refs[name.format(i=i)].array(), layout)[index[1:]], dtype=abstract.dtype)
                for i in layers
            ]
        )

    return jax.make_array_from_callback(abstract.shape, sharding, read_slice)


def _module_at(model, module_path):
    for name in module_path:
        model = getattr(model, name)
    return model


def save_pretrained(model, path: str, dtype: str | None = None, extra_config: dict | None = None):
    """Writes model.safetensors + config.json that transformers' from_pretrained loads
    (AutoModelForCausalLM for a CausalLM, AutoModelForSequenceClassification for a ValueModel).
    LoRA adapters are merged into their kernels; `dtype` (default: the parameter dtype) sets
    the stored precision. Only process 0 writes; every process must call it (gathers)."""
    config: DecoderConfig = model.config
    out_dtype = np.dtype(dtype or config.param_dtype)
    state = nnx.state(model, nnx.Param)
    tensors = []
    for param_path, variable in nnx.to_flat_state(state):
        if isinstance(variable, LoraParam):
            continue
        if param_path[-1] == "kernel":  # LoRA adapters, if any, folded in
            value = to_host(_module_at(model, param_path[:-1]).merged_kernel())
        else:
            value = to_host(variable.get_value())
        if not np.isfinite(value).all():
            raise NonFiniteValues(f"refusing to export {path}: {'.'.join(map(str, param_path))} holds a NaN or inf")
        stacked = param_path[:2] == ("decoder", "layers")
        name = hf_tensor_name(param_path, config.model_type)
        layout = _kernel_layout(param_path, value.shape[1:] if stacked else value.shape)
        if stacked:
            for i in range(config.num_layers):
                hf = _to_hf(value[i], layout)
                tensors.append((name.format(i=i), hf.shape, out_dtype, lambda hf=hf: hf))
        else:
            hf = _to_hf(value, layout)
            tensors.append((name, hf.shape, out_dtype, lambda hf=hf: hf))
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "model.safetensors"), sorted(tensors, key=lambda t: t[0]))
    hf_config = config.hf_dict()
    family = _FAMILY_NAMES[config.model_type]
    if isinstance(model, ValueModel):
        hf_config.update(
            architectures=[f"{family}ForSequenceClassification"], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}
        )
    else:
        hf_config.update(architectures=[f"{family}ForCausalLM"])
    hf_config.update(dtype=str(out_dtype), tie_word_embeddings=config.tie_word_embeddings, **(extra_config or {}))
    hf_config.pop("torch_dtype", None)
    tmp = os.path.join(path, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, "config.json"))


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


def export_model(model, directory: str, tokenizer_source: str, extra_config: dict | None = None) -> str:
    """Writes model (LoRA merged) + config + tokenizer files that transformers loads."""
    tokenizer = load_tokenizer(tokenizer_source)
    extra = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, **(extra_config or {})}
    save_pretrained(model, directory, extra_config=extra)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(directory)
    barrier(f"jaxrlhf export {directory}")  # later steps on every process read what process 0 wrote
    return directory
