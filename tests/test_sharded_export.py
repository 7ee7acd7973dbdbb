"""HF exports in several safetensors files and an index, written slice by slice by the devices
(and processes) that hold them: transformers' file names and split, transformers and our loader
read them back exactly, fused tensors included, and a process allocates far less than the model."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import padded_batch, save_tiny_model, torch_logits
from test_multihost import free_port

from jaxrlhf.models import load_pretrained, save_pretrained
from jaxrlhf.models.families.base import per_head_qkv_views
from jaxrlhf.models.safetensors_io import index_checkpoint, parse_shard_size, plan_files, region, write_strided
from jaxrlhf.parallel import TRAINING_RULES, make_mesh, shard_model

NAMES = ["llama_gqa_llama3", "neox_parallel_rot25", "gpt2"]  # plain, fused query_key_value, fused c_attn


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    return {name: save_tiny_model(name, root, centred_biases=True) for name in NAMES}


def stored(directory) -> dict[str, np.ndarray]:
    return {name: ref.array() for name, ref in index_checkpoint(str(directory)).items()}


def weight_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("model"))


def test_shard_sizes_read_like_transformers():
    from transformers.utils.hub import convert_file_size_to_int

    for size in ["5GB", "500MB", "2GiB", "10KiB", "64KB", "5Gb", "3MiB", 123456]:
        assert parse_shard_size(size) == convert_file_size_to_int(size), size
    assert parse_shard_size("123456") == 123456  # how a YAML integer arrives in a str setting
    with pytest.raises(ValueError, match="max_shard_size '5 parsecs'"):
        parse_shard_size("5 parsecs")


@pytest.mark.parametrize("limit", [100, 1000, 2500, 10**6])
def test_files_split_and_named_like_transformers(limit):
    """The same tensors in the same files as huggingface_hub's splitter (which transformers uses):
    a tensor over the limit alone, a file closed when the next tensor would tip it over."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    shapes = [(40, 10), (3,), (200,), (16, 16), (5,), (600,), (7, 7), (1,)]
    tensors = [(f"t{i}", shape, np.float32) for i, shape in enumerate(shapes)]
    plan = plan_files(tensors, limit)
    split = split_torch_state_dict_into_shards({n: torch.empty(s) for n, s, _ in tensors}, max_shard_size=limit)
    assert {name: file for name, (file, _) in plan.location.items()} == split.tensor_to_filename
    index = plan.index()
    if split.is_sharded:
        assert index == {
            "metadata": {"total_parameters": sum(np.prod(s) for s in shapes), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
    else:
        assert index is None and list(plan.headers) == ["model.safetensors"]


def test_slices_written_through_a_fused_view_equal_the_joined_tensor(tmp_path):
    """q, k and v slices (split over hidden and heads, as fsdp x tensor would) written through
    GPT-NeoX's strided views of query_key_value, cast to bfloat16: the file holds exactly the
    tensor numpy builds by assigning each whole parameter to its view."""
    heads, head_dim, hidden = 4, 3, 6
    shape = (3 * heads * head_dim, hidden)
    parts = np.random.RandomState(0).randn(3, hidden, heads, head_dim).astype(np.float32)
    dtype = np.dtype(ml_dtypes.bfloat16)
    expected = np.zeros(shape, dtype)
    for part, values in enumerate(parts):
        per_head_qkv_views(part, heads, head_dim, hidden)[0](expected)[...] = values
    plan = plan_files([("qkv", shape, dtype)], "1GB")
    plan.create(str(tmp_path))
    fd = os.open(tmp_path / "model.safetensors", os.O_WRONLY)
    for part, values in enumerate(parts):
        view = per_head_qkv_views(part, heads, head_dim, hidden)[0]
        for rows in (slice(0, 4), slice(4, 6)):
            for cols in (slice(0, 2), slice(2, 4)):
                offset, strides = region(shape, dtype, view, (rows, cols))
                write_strided(fd, plan.location["qkv"][1] + offset, strides, values[rows, cols].astype(dtype))
    os.close(fd)
    np.testing.assert_array_equal(stored(tmp_path)["qkv"], expected)


@pytest.mark.parametrize("layout", [dict(fsdp=8), dict(fsdp=4, tensor=2)], ids=["fsdp8", "fsdp4xtp2"])
@pytest.mark.parametrize("name", NAMES)
def test_sharded_export_loads_in_transformers_and_back(model_dirs, name, layout, tmp_path):
    """A model over 8 devices exported in files of at most 40 KB: several files and transformers'
    index; every tensor equals the checkpoint it was loaded from, transformers gives the same
    logits, and our loader reads it back to the same parameters."""
    model = load_pretrained(model_dirs[name], mesh=make_mesh(**layout), rules=TRAINING_RULES)
    out = tmp_path / "export"
    save_pretrained(model, str(out), max_shard_size="40KB")
    index = json.load(open(out / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and weight_files(out) == [*files, "model.safetensors.index.json"]
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    exported, original = stored(out), stored(model_dirs[name])
    assert index["metadata"]["total_size"] == sum(array.nbytes for array in exported.values())
    assert exported.keys() == original.keys()
    for tensor, array in original.items():
        np.testing.assert_array_equal(exported[tensor], array, err_msg=tensor)
    ids, mask = padded_batch([12, 7, 3, 10], 12, left=True)
    np.testing.assert_array_equal(torch_logits(str(out), ids, mask), torch_logits(model_dirs[name], ids, mask))
    reloaded = nnx.to_flat_state(nnx.state(load_pretrained(str(out)), nnx.Param))
    for (path, ours), (_, theirs) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), reloaded):
        np.testing.assert_array_equal(np.asarray(ours.get_value()), np.asarray(theirs.get_value()), err_msg=path)


def test_bfloat16_export_casts_each_slice(model_dirs, tmp_path):
    model = load_pretrained(model_dirs["neox_parallel_rot25"], mesh=make_mesh(fsdp=4, tensor=2))
    save_pretrained(model, str(tmp_path / "bf16"), dtype="bfloat16", max_shard_size="20KB")
    for tensor, array in stored(model_dirs["neox_parallel_rot25"]).items():
        np.testing.assert_array_equal(stored(tmp_path / "bf16")[tensor], array.astype(ml_dtypes.bfloat16))


def test_one_file_when_it_fits_and_a_new_export_replaces_the_old_files(model_dirs, tmp_path):
    """As transformers: model.safetensors without an index when one file holds everything; an
    export over an older one removes the weight files the new one does not use."""
    model = load_pretrained(model_dirs["llama_gqa_llama3"], mesh=make_mesh(fsdp=8))
    out = tmp_path / "export"
    save_pretrained(model, str(out), max_shard_size="40KB")
    assert "model.safetensors.index.json" in weight_files(out)
    save_pretrained(model, str(out))
    assert weight_files(out) == ["model.safetensors"] and not os.path.exists(f"{out}.tmp-export")
    save_pretrained(model, str(out), max_shard_size="100KB")
    assert "model.safetensors" not in weight_files(out)
    assert len(weight_files(out)) == 1 + len(
        set(json.load(open(out / "model.safetensors.index.json"))["weight_map"].values())
    )


def test_lora_merged_into_a_sharded_fused_export(model_dirs, tmp_path):
    """Adapters on q, k and v fold into their slices of GPT-2's c_attn, written per device."""
    from jaxrlhf.models.layers import LoraParam
    from jaxrlhf.models.lora import apply_lora

    mesh = make_mesh(fsdp=4, tensor=2)
    model = load_pretrained(model_dirs["gpt2"], mesh=mesh, rules=TRAINING_RULES)
    apply_lora(model, rank=2, alpha=4.0, target_modules=["c_attn"])
    for path, variable in nnx.to_flat_state(nnx.state(model, LoraParam)):
        variable.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), variable.get_value().shape))
    model = shard_model(model, TRAINING_RULES, mesh)
    ids, mask = padded_batch([12, 7, 3, 10], 12, left=True)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    save_pretrained(model, str(tmp_path / "merged"), max_shard_size="40KB")
    exported = torch_logits(str(tmp_path / "merged"), ids, mask)
    np.testing.assert_allclose(exported[mask == 1], ours[mask == 1], atol=1e-4, rtol=1e-4)


# A GPT-NeoX of 58 MB in float32: big enough that one process holding the model would show.
MEDIUM_NEOX = dict(
    vocab_size=16000, hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4
)


def test_two_processes_write_their_own_slices(tmp_path):
    """A 58 MB GPT-NeoX over 2 processes x 4 devices (fsdp=4 x tensor=2) exported in 10 MB files:
    transformers loads it with the original's logits, every tensor is exact, and each process's
    export allocates (numpy buffers, and growth of its peak resident set) well under the model.
    Then a NaN in one process's slice: both processes refuse the export."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**MEDIUM_NEOX)).eval()
    model_dir, out = str(tmp_path / "neox"), str(tmp_path / "run" / "export")
    hf.save_pretrained(model_dir)
    model_bytes = sum(p.numel() * 4 for p in hf.parameters())
    port, here = str(free_port()), os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    env.pop("XLA_FLAGS", None)
    worker = os.path.join(here, "sharded_export_worker.py")
    workers = [
        subprocess.Popen(
            [sys.executable, worker, str(i), port, model_dir, out, "10MB"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=240)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)

    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 5 and weight_files(out) == [*files, "model.safetensors.index.json"]
    exported, original = stored(out), stored(model_dir)
    assert exported.keys() == original.keys() and index["metadata"]["total_size"] == model_bytes
    for tensor, array in original.items():
        np.testing.assert_array_equal(exported[tensor], array, err_msg=tensor)
    ids, mask = padded_batch([12, 7, 3, 10], 12, left=True)
    np.testing.assert_array_equal(torch_logits(out, ids, mask), torch_logits(model_dir, ids, mask))
    for i in range(2):
        result = json.load(open(tmp_path / "run" / f"result{i}.json"))
        memory = result["memory"]
        print(f"process {i}: model {model_bytes / 2**20:.1f} MiB in {len(files)} files, {memory}")
        assert memory["export"]["numpy_peak"] < model_bytes / 8, memory
        assert memory["export"]["rss_peak_growth"] < model_bytes / 4, memory
        assert memory["gather"]["rss_peak_growth"] > model_bytes * 0.9, memory  # the measure would see a model
        # a NaN in a slice only one process writes: both refuse, naming it
        assert (
            result["refused"] == f"refusing to export {out}-nan: decoder.layers.attn.k_proj.kernel holds a NaN or inf"
        )
    assert sorted(os.listdir(tmp_path / "run")) == ["export", "result0.json", "result1.json"]


def test_the_file_size_of_exports_is_a_run_setting():
    from jaxrlhf.config import ConfigError, load_config

    assert load_config([]).export_max_shard_size == "5GB"  # transformers 4's default (transformers 5 writes 50GB)
    assert load_config(["export_max_shard_size=500MB"]).export_max_shard_size == "500MB"
    assert parse_shard_size(load_config(["export_max_shard_size=1000000"]).export_max_shard_size) == 10**6
    with pytest.raises(ConfigError, match="export_max_shard_size: max_shard_size '5 parsecs'"):
        load_config(["export_max_shard_size=5 parsecs"])
    with pytest.raises(ConfigError, match="export_max_shard_size: must be more than 0 bytes"):
        load_config(["export_max_shard_size=0"])
