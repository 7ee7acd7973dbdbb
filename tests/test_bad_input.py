"""Bad input gets a one-line error that names the offending thing."""

import json
import os
import shutil

import pytest
from hf_fixtures import save_tiny_model

from jaxrlhf.models import load_pretrained
from jaxrlhf.models.safetensors_io import read_header
from jaxrlhf.parallel import make_mesh


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("qwen2_bias_tied", str(tmp_path_factory.mktemp("hf")))


def copy_model(model_dir, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(model_dir, target)
    return target


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="/no/such/model: model directory does not exist"):
        load_pretrained("/no/such/model")


def test_missing_weights_file(model_dir, tmp_path):
    path = copy_model(model_dir, tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(path)


def rewrite_without(path, drop=(), reshape=None):
    file = os.path.join(path, "model.safetensors")
    refs = read_header(file)
    arrays = {name: ref.array().copy() for name, ref in refs.items() if name not in drop}
    if reshape:
        arrays[reshape] = arrays[reshape][:-1]
    from safetensors.numpy import save_file

    save_file(arrays, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(model_dir, tmp_path):
    path = copy_model(model_dir, tmp_path)
    rewrite_without(path, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(path)


def test_misshaped_tensor_is_named(model_dir, tmp_path):
    path = copy_model(model_dir, tmp_path)
    rewrite_without(path, reshape="model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(31, 64\)"):
        load_pretrained(path)


def test_unknown_model_type(model_dir, tmp_path):
    path = copy_model(model_dir, tmp_path)
    config = json.load(open(os.path.join(path, "config.json")))
    config["model_type"] = "falcon"
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(
        ValueError, match="unsupported model_type 'falcon'; supported: llama, mistral, .*, bloom, gemma2"
    ):
        load_pretrained(path)


def test_mesh_that_does_not_divide_the_devices():
    with pytest.raises(ValueError, match="mesh data=1 x fsdp=3 x tensor=1 does not divide the 8 available devices"):
        make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="mesh data=2 x fsdp=2 x tensor=1 needs 4 devices, but 8 are available"):
        make_mesh(data=2, fsdp=2, tensor=1)
