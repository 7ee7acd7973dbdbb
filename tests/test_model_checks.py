"""Weights checked against the model as they load: integer or quantized tensors, NaN or inf values
and tokenizers with more ids than the embedding table are refused in one line naming the model."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hf_fixtures import VOCAB, save_tiny_model, train_tiny_tokenizer
from pipeline_helpers import train

from jaxrlhf.models import load_pretrained, load_tokenizer, read_hf_config
from jaxrlhf.models.builtin import builtin_model_dir
from jaxrlhf.models.hf_io import check_model_dir
from jaxrlhf.parallel import make_mesh

UP_PROJ = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untied LLaMA (vocab 320) with the tiny tokenizer (300 ids) beside it."""
    path = save_tiny_model("llama_gqa_llama3", str(tmp_path_factory.mktemp("hf")))
    return train_tiny_tokenizer(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def copy_of(source, tmp_path, name="model"):
    return shutil.copytree(source, str(tmp_path / name))


def rewrite(path, change):
    """Rewrites model.safetensors with the safetensors library after `change(tensors)` (a dict)."""
    from safetensors.numpy import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def with_nan(tensors, name=UP_PROJ, count=3):
    tensors[name] = tensors[name].copy()
    tensors[name].reshape(-1)[:count] = np.nan


def with_int8(tensors, name=UP_PROJ):
    tensors[name] = (tensors[name] * 100).astype(np.int8)


def with_extra_tokens(path, beyond=10):
    """Adds tokens to the tokenizer beside a model until it has `beyond` more ids than the table."""
    tokenizer = load_tokenizer(path)
    extra = read_hf_config(path)["vocab_size"] + beyond - len(tokenizer)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(extra)])
    tokenizer.save_pretrained(path)
    return len(tokenizer)


def test_a_good_model_loads_and_passes_the_header_checks(tiny):
    check_model_dir(tiny)
    model = load_pretrained(tiny)
    assert model.decoder.embed_tokens.get_value().shape == (VOCAB, 64)


def test_an_int8_tensor_is_refused_by_name(tiny, tmp_path):
    path = rewrite(copy_of(tiny, tmp_path), with_int8)
    message = rf"{path}: tensor {UP_PROJ} is I8; quantized or integer checkpoints are not supported"
    with pytest.raises(ValueError, match=message):
        check_model_dir(path)
    with pytest.raises(ValueError, match=message):
        load_pretrained(path)


def test_quantization_scales_are_refused_by_name(tiny, tmp_path):
    scales = "model.layers.0.self_attn.q_proj.scales"
    path = rewrite(copy_of(tiny, tmp_path), lambda t: t.update({scales: np.ones((4, 64), np.float16)}))
    with pytest.raises(ValueError, match=rf"tensor {scales} is F16; quantized or integer checkpoints"):
        load_pretrained(path)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_nan_is_refused_naming_the_model_the_tensor_and_the_count(tiny, tmp_path, sharded):
    path = rewrite(copy_of(tiny, tmp_path), with_nan)
    check_model_dir(path)  # the headers are fine: only the values are not
    mesh = make_mesh() if sharded else None
    with pytest.raises(ValueError, match=rf"{path}: tensor {UP_PROJ} holds 3 NaN or inf values; 1 of \d+ tensors"):
        load_pretrained(path, mesh=mesh)


def test_an_inf_in_an_unstacked_tensor_counts_every_affected_tensor(tiny, tmp_path):
    def change(tensors):
        with_nan(tensors, "lm_head.weight", count=2)
        tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], np.inf)

    path = rewrite(copy_of(tiny, tmp_path), change)
    with pytest.raises(
        ValueError,
        match=r"tensor (model.norm.weight holds 64|lm_head.weight holds 2) NaN or inf values; 2 of \d+ tensors",
    ):
        load_pretrained(path)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_naming_both_sizes(tiny, tmp_path):
    path = copy_of(tiny, tmp_path)
    size = with_extra_tokens(path)
    message = rf"{path}: the tokenizer has {size} tokens .* vocab_size={VOCAB}"
    with pytest.raises(ValueError, match=message):
        check_model_dir(path)
    with pytest.raises(ValueError, match=message):
        load_pretrained(path)


def test_resize_embeddings_pads_the_table_and_the_head_with_the_mean_row(tiny, tmp_path):
    path = copy_of(tiny, tmp_path)
    size = with_extra_tokens(path)
    check_model_dir(path, resize_embeddings=True)
    model = load_pretrained(path, resize_embeddings=True)
    original = load_pretrained(tiny)
    assert model.config.vocab_size == size and model.config.hf_dict()["vocab_size"] == size
    table, old = (
        np.asarray(model.decoder.embed_tokens.get_value()),
        np.asarray(original.decoder.embed_tokens.get_value()),
    )
    np.testing.assert_array_equal(table[:VOCAB], old)
    np.testing.assert_allclose(table[VOCAB:], np.broadcast_to(old.mean(0), (size - VOCAB, old.shape[1])), rtol=1e-6)
    head = np.asarray(model.lm_head.get_value())  # [embed, vocab]
    np.testing.assert_allclose(
        head[:, VOCAB:],
        np.broadcast_to(np.asarray(original.lm_head.get_value()).mean(1)[:, None], (64, size - VOCAB)),
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.fixture(scope="module")
def builtin(cache):
    return builtin_model_dir(cache)


@pytest.mark.parametrize(
    "damage, cause",
    [
        (lambda p: rewrite(p, with_int8), f"tensor {UP_PROJ} is I8; quantized or integer checkpoints"),
        (lambda p: rewrite(p, with_nan), f"tensor {UP_PROJ} holds 3 NaN or inf values"),
        (with_extra_tokens, "the tokenizer has"),
    ],
    ids=["int8", "nan", "tokenizer"],
)
def test_the_cli_refuses_a_bad_model_with_exit_2_and_exports_nothing(builtin, cache, tmp_path, damage, cause):
    path = copy_of(builtin, tmp_path, "bad")
    damage(path)
    out = tmp_path / "run"
    result = train(out, cache, "steps=[sft]", f"sft.model.path={path}")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: ") and cause in last, result.stderr[-3000:]
    assert not (out / "sft" / "model").exists()


def test_chat_refuses_a_model_holding_a_nan_with_exit_2(builtin, tmp_path):
    path = rewrite(copy_of(builtin, tmp_path, "bad"), with_nan)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-m", "jaxrlhf.cli.chat", path],
        env=env,
        input="",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {path}: tensor {UP_PROJ} holds 3 NaN or inf values"), result.stderr[-3000:]
