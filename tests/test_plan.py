"""The memory planner against XLA's own accounting, remat: auto, and refusals before any work."""

import copy
import os
import subprocess
import sys

import jax
import pytest
import transformers

from jaxrlhf.config import load_config
from jaxrlhf.models import DecoderConfig
from jaxrlhf.parallel import TRAINING_RULES, make_mesh
from jaxrlhf.plan.dry_run import compile_training_step, compiled_bytes
from jaxrlhf.plan.estimate import Job, estimate
from jaxrlhf.plan.planner import GIB, plan_run, resolved, target_for
from jaxrlhf.plan.report import dry_run_rows, plan_for_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DSCHAT = os.path.join(ROOT, "configs", "dschat-opt-1.3b.yaml")


def llama(dtype="float32"):
    hf = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    return DecoderConfig.from_hf(hf.to_dict(), dtype=dtype, param_dtype="float32")


def opt(dtype="float32"):
    hf = transformers.OPTConfig(
        vocab_size=50272,
        hidden_size=1024,
        ffn_dim=4096,
        num_hidden_layers=4,
        num_attention_heads=16,
        max_position_embeddings=2048,
        word_embed_proj_dim=1024,
    )
    return DecoderConfig.from_hf(hf.to_dict(), dtype=dtype, param_dtype="float32")


def family(name: str, dtype="float32"):
    """The other families at the same layer sizes: their blocks differ (parallel residual, ALiBi,
    soft-capped attention with windows, post-norms), the planner prices each from its own block."""
    shared = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16)
    hf = {
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**shared, intermediate_size=4096, rotary_pct=0.25),
        "bloom": lambda: transformers.BloomConfig(vocab_size=32000, hidden_size=1024, n_layer=4, n_head=16),
        "gemma2": lambda: transformers.Gemma2Config(
            **shared, num_key_value_heads=4, head_dim=64, intermediate_size=4096, sliding_window=128
        ),
    }[name]()
    return DecoderConfig.from_hf(hf.to_dict(), dtype=dtype, param_dtype="float32")


# (model, value head, LoRA rank, rows, accumulation, mesh, remat): 512-token rows, real layer sizes
CASES = {
    "llama one device, no remat": (llama(), False, 0, 2, 1, {"fsdp": 1}, "none"),
    "llama fsdp=8, no remat": (llama(), False, 0, 16, 1, {"fsdp": 8}, "none"),
    "llama fsdp=8 bf16, dots": (llama("bfloat16"), False, 0, 16, 1, {"fsdp": 8}, "dots"),
    "llama fsdp4 x tensor2 bf16": (llama("bfloat16"), False, 0, 8, 1, {"fsdp": 4, "tensor": 2}, "none"),
    "llama LoRA fsdp=8": (llama(), False, 8, 16, 1, {"fsdp": 8}, "none"),
    "opt reward model, one device": (opt(), True, 0, 4, 1, {"fsdp": 1}, "none"),
    "opt bf16 one device, dots": (opt("bfloat16"), False, 0, 4, 1, {"fsdp": 1}, "dots"),
    "llama fsdp=8, 2 micro-batches, dots": (llama(), False, 0, 32, 2, {"fsdp": 8}, "dots"),
    "gpt-neox fsdp=8, no remat": (family("gpt_neox"), False, 0, 16, 1, {"fsdp": 8}, "none"),
    "bloom fsdp4 x tensor2, dots": (family("bloom"), False, 0, 8, 1, {"fsdp": 4, "tensor": 2}, "dots"),
    "gemma2 reward model fsdp=8, no remat": (family("gemma2"), True, 0, 16, 1, {"fsdp": 8}, "none"),
}


PLANNER_GAPS = {  # known: the planner under-prices these by more than 15% (strict: a fix must remove the entry)
    "gemma2 reward model fsdp=8, no remat": (
        "planner 1299 MiB, XLA 1688 MiB; cause not found yet (first suspect: soft-capped attention's float32 scores)"
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=pytest.mark.xfail(reason=PLANNER_GAPS[case], strict=True))
        if case in PLANNER_GAPS
        else case
        for case in CASES
    ],
)
def test_the_estimate_is_within_15_percent_of_the_compiled_step(case):
    """Per device: arguments + outputs - donated + temporaries of the real jitted step, compiled
    from shapes on the mesh, against the planner's figure for the same platform."""
    config, value_head, lora, rows, accum, mesh_axes, remat = CASES[case]
    fsdp, tensor = mesh_axes["fsdp"], mesh_axes.get("tensor", 1)
    mesh = make_mesh(fsdp=fsdp, tensor=tensor, devices=jax.devices()[: fsdp * tensor])
    job = Job(case, config, value_head, lora, rows, accum, 512)
    planned = estimate(job, TRAINING_RULES, mesh, platform="cpu").total(remat)
    compiled = compiled_bytes(compile_training_step(job, remat, TRAINING_RULES, mesh))
    assert abs(planned / compiled - 1) <= 0.15, f"planner {planned / 2**20:.0f} MiB, XLA {compiled / 2**20:.0f} MiB"


def dschat(*overrides):
    return load_config([DSCHAT, *overrides], check_data_files=False)


def plan(config, devices=1):
    return {p.step: p for p in plan_run(config, target_for(config, devices, None), builtin_dir=None)}


def test_auto_keeps_everything_when_memory_is_plentiful_and_recomputes_when_it_is_not():
    roomy = plan(dschat("steps=[sft]", "plan.device_memory_gib=1000"))["sft"]
    assert roomy.remat == {"sft": "none"} and roomy.grad_accum == 1 and roomy.fits
    unknown = plan(dschat("steps=[sft]", "plan.device_memory_gib=null"))["sft"]  # CPU: nothing reported
    assert unknown.remat == {"sft": "none"} and unknown.budget is None
    tight = plan(dschat("steps=[sft]", "plan.device_memory_gib=40"))["sft"]
    assert tight.remat["sft"] in ("dots", "block") and tight.fits and tight.peak <= 40 * 0.9 * GIB
    assert tight.peak < roomy.peak
    tighter = plan(dschat("steps=[sft]", "plan.device_memory_gib=29"))["sft"]
    assert tighter.remat["sft"] == "block" and tighter.grad_accum == 1 and tighter.fits
    # then micro-batches: 64 rows of 512 tokens do not fit whole even with block recompute
    accumulating = plan(dschat("steps=[sft]", "sft.batch_size=64", "plan.device_memory_gib=33"))["sft"]
    assert accumulating.remat["sft"] == "block" and accumulating.grad_accum > 1 and accumulating.fits
    config = resolved(dschat("steps=[sft]", "sft.batch_size=64", "plan.device_memory_gib=33"), [accumulating])
    assert config.sft.model.remat == "block" and config.sft.grad_accum_steps == accumulating.grad_accum
    fixed = plan(dschat("steps=[sft]", "plan.device_memory_gib=40", "sft.model.remat=none"))["sft"]
    assert fixed.remat == {"sft": "none"} and not fixed.fits  # a remat that is set is kept, and judged


def test_deepspeed_chat_step_3_fits_one_80gb_gpu_with_default_settings():
    """OPT-1.3B actor, OPT-350m critic, 64 x (256 + 256), 4 minibatches, bf16 on float32 master
    weights: the shape that ran out of memory with remat none."""
    plans = plan(dschat())
    assert all(p.fits for p in plans.values()), "\n".join(p.table() for p in plans.values())
    ppo = plans["ppo"]
    assert ppo.remat["actor"] != "none" and ppo.peak <= 72 * GIB
    assert set(ppo.phases) == {"generate", "experience", "update"}
    assert {line.role for line in ppo.lines} >= {"actor", "critic", "reference", "reward model", "generation copy"}


# GRPO on a reward function with no KL term: the run holds no critic, reward model or reference
GRPO = (
    "ppo.algorithm=grpo",
    "ppo.samples_per_prompt=4",
    "ppo.kl_coef=0",
    "ppo.reward=[jaxrlhf.data.builtin:format_reward]",
)


def step3(*overrides):
    """The DeepSpeed-Chat step 3 alone (OPT-1.3B actor, OPT-350m critic and reward model), 80 GB."""
    shapes = os.path.join(ROOT, "configs", "shapes")
    models = (f"ppo.actor_model.path={shapes}/opt-1.3b", f"ppo.critic_model.path={shapes}/opt-350m")
    return plan(dschat("steps=[ppo]", *models, *overrides))["ppo"]


def test_a_critic_free_run_on_reward_functions_plans_the_actor_alone():
    """16 prompts x 4 samples: the 64 answers of the DeepSpeed-Chat shape, without the critic, the
    reward model and the reference; the same config under PPO (a critic) costs more."""
    roomy = ("ppo.prompts_per_iteration=16", "plan.device_memory_gib=1000")  # remat none for all
    grpo, ppo = step3(*GRPO, *roomy), step3(*GRPO, *roomy, "ppo.algorithm=ppo")
    assert [line.role for line in grpo.lines] == ["actor", "actor EMA", "generation copy"], grpo.table()
    assert [line.role for line in ppo.lines] == ["actor", "critic", "actor EMA", "generation copy"], ppo.table()
    assert grpo.remat == {"actor": "none"} and "critic" not in grpo.choice()
    critic = ppo.lines[1]
    assert grpo.peak <= ppo.peak - critic.weights - critic.optimizer - critic.grads, (grpo.table(), ppo.table())
    # the rows are prompts x samples: the update's as 64 prompts x 1; the KV cache of the 64
    # decoded rows beside the 16 prefilled ones; the prefill's working set over the 16 prompts
    default = step3("plan.device_memory_gib=1000")
    assert [line.role for line in default.lines][2:4] == ["reference", "reward model"]
    assert grpo.lines[0].activations == default.lines[0].activations
    assert grpo.lines[-1].cache == default.lines[-1].cache * (64 + 16) // 64
    assert grpo.lines[-1].working < default.lines[-1].working
    # in 80 GB the actor keeps every activation, where under PPO it recomputes
    tight = step3(*GRPO, "ppo.prompts_per_iteration=16")
    assert tight.remat == {"actor": "none"} and tight.fits
    assert step3(*GRPO, "ppo.prompts_per_iteration=16", "ppo.algorithm=ppo").remat["actor"] != "none"
    config = resolved(dschat(*GRPO, "ppo.prompts_per_iteration=16"), [tight])
    assert config.ppo.actor_model.remat == "none" and config.ppo.critic_model.remat == "auto"  # no critic to plan


def test_a_critic_free_step_3_compiles_from_shapes(tmp_path):
    """The dry run of GRPO (4 samples of 8 prompts, a reward function, no reference) on 2
    simulated devices: the generate program with its samples (by the refill engine, 8 slots for
    the 32 rows), the experience and the update without the critic, the reward model and the
    reference."""
    config = load_config(
        ["steps=[ppo]", f"output_dir={tmp_path}", *GRPO, "ppo.prompts_per_iteration=8", "ppo.ppo_epochs=1"]
        + ["ppo.actor_model.path=builtin"]  # no SFT export to start from
        + ["generation.engine=refill", "generation.slots=8"],
        check_data_files=False,
    )
    devices = jax.devices()[:2]
    plans = plan_for_devices(config, devices)
    assert [line.role for line in plans[0].lines] == ["actor", "actor EMA", "generation copy"]
    assert plans[0].lines[-1].cache < plan_for_devices(refilled(config, 0), devices)[0].lines[-1].cache
    rows = list(dry_run_rows(config, plans, devices))
    assert [phase for _, phase, _, _ in rows] == ["generate", "experience", "update"]
    assert all(xla > 0 and planned > 0 for _, _, xla, planned in rows)
    generate_xla, generate_planned = rows[0][2], rows[0][3]
    assert 0.7 < generate_xla / generate_planned < 1.3, (generate_xla, generate_planned)


def refilled(config, slots: int):
    config = copy.deepcopy(config)
    config.generation.engine, config.generation.slots = ("refill", slots) if slots else ("static", 0)
    return config


def test_dpo_is_planned_with_its_frozen_reference():
    same = ("dpo.batch_size=8", "dpo.max_seq_len=512", "dpo.model.dtype=bfloat16")  # as the config's SFT
    plans = plan(dschat("steps=[sft,dpo]", *same, "plan.device_memory_gib=1000"))
    dpo, sft = plans["dpo"], plans["sft"]
    assert [line.role for line in dpo.lines] == ["dpo", "reference"]
    reference = dpo.lines[1].weights
    assert reference == dpo.lines[0].weights and dpo.peak > sft.peak + reference  # and both sides of each pair
    lora = plan(dschat("steps=[sft,dpo]", *same, "dpo.lora.rank=8", "plan.device_memory_gib=1000"))["dpo"]
    assert [line.role for line in lora.lines] == ["dpo"]  # the base with adapters off is the reference


def test_the_planner_shards_what_the_rules_shard_and_names_a_layout_that_cannot_be():
    # 32 heads over tensor=3: the rules leave attention whole, and so does the planner
    uneven = plan(dschat("mesh.tensor=3", "plan.device_memory_gib=1000"), devices=6)
    assert uneven["ppo"].fits and uneven["ppo"].mesh_shape == {"data": 1, "fsdp": 2, "tensor": 3}
    halves = plan(dschat("mesh.tensor=2", "plan.device_memory_gib=1000"), devices=8)
    assert halves["sft"].peak < plan(dschat("plan.device_memory_gib=1000"), devices=2)["sft"].peak
    with pytest.raises(ValueError, match="generation.tensor_parallel=3 does not divide the 8 devices"):
        plan(dschat("generation.tensor_parallel=3"), devices=8)
    with pytest.raises(ValueError, match="sizes must multiply to the device count"):
        plan(dschat("mesh.fsdp=2"), devices=8)


def run_module(*args, cwd):
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=600
    )


@pytest.mark.slow  # ~30 s: the planner CLI compiles a pipeline from shapes
def test_a_config_that_cannot_fit_exits_2_with_the_table(tmp_path):
    result = run_module("jaxrlhf.plan", DSCHAT, "plan.device_memory_gib=12", "--devices", "1", cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "act none" in result.stdout and "does NOT fit" in result.stdout
    assert result.stderr.strip().startswith("error: step") and len(result.stderr.strip().splitlines()) <= 3
    # and training refuses up front, before anything is trained or written
    output = tmp_path / "run"
    result = run_module(
        "jaxrlhf.train", "steps=[sft]", "plan.device_memory_gib=0.0001", f"output_dir={output}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "act none" in result.stderr and "error: step sft needs" in result.stderr.splitlines()[-1]
    assert not (output / "sft").exists()


@pytest.mark.slow  # ~30 s: every program of the pipeline compiled
def test_plan_compiles_every_program_of_the_pipeline_from_shapes(tmp_path):
    """`--compile` on simulated devices: the SFT, RM and DPO steps and PPO's generate, experience
    and update programs, each reported beside the planner's figure."""
    result = run_module(
        "jaxrlhf.plan",
        "steps=[sft,rm,dpo,ppo]",
        f"output_dir={tmp_path}",
        "--devices",
        "2",
        "--compile",
        "--json",
        str(tmp_path / "plan.json"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    reported = [line.split()[:2] for line in result.stdout.splitlines() if "XLA memory_analysis" in line]
    assert reported == [
        ["sft", "train"],
        ["rm", "train"],
        ["dpo", "train"],
        ["ppo", "generate"],
        ["ppo", "experience"],
        ["ppo", "update"],
    ]
    assert "on 2 device(s)" in result.stdout


def plan_main(argv, monkeypatch) -> int:
    """`python -m jaxrlhf.plan ARGV` in this process (its --devices settings undone afterwards);
    the exit code, whether returned or exited with."""
    from jaxrlhf.plan.__main__ import main

    for name in ("XLA_FLAGS", "JAX_PLATFORMS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize(
    "argv, named",
    [
        (["{tmp}/missing.yaml"], "missing.yaml"),
        (["sft.bogus=1"], "sft.bogus"),
        (["steps=[sft]", "sft.model.path={tmp}"], "config.json: missing"),
        (["steps=[sft]", "--devices", "0"], "--devices"),
        (["steps=[sft]", "--devices"], "--devices needs a value"),
    ],
    ids=["missing-config", "unknown-key", "no-config-json", "zero-devices", "dangling-flag"],
)
def test_plan_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys, argv, named):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert plan_main([*argv[:1], f"output_dir={tmp_path / 'run'}", *argv[1:]], monkeypatch) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], lines


def test_plan_refuses_batch_sizes_train_would_refuse(tmp_path, monkeypatch, capsys):
    """The message is train's (preflight.check_batch_sizes), on the devices planned for."""
    argv = ["steps=[sft]", "sft.batch_size=32", f"output_dir={tmp_path}", "--devices", "3"]
    assert plan_main(argv, monkeypatch) == 2
    captured = capsys.readouterr()
    assert "[sft] GiB per device on 3 device(s)" in captured.out  # the plan is still printed
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sft.batch_size=32"), lines
    assert "do not divide over the 3 data-parallel devices" in lines[0]
    assert plan_main([*argv[:-1], "4"], monkeypatch) == 0


def test_the_planner_gives_the_refill_engine_fewer_slots_when_the_rows_cache_does_not_fit():
    """generation.engine auto: with room for every row's KV cache, static generation (no slots);
    on a device with room for about half of it, the most slots that fit, a multiple of the row
    shards, written into the config, which then generates by refill."""
    from jaxrlhf.evaluation import decode_engine

    roomy = step3("plan.device_memory_gib=1000")
    assert roomy.slots == 0 and "slots" not in roomy.choice()
    copy, generate = roomy.lines[-1], roomy.phases["generate"]
    fraction = dschat().plan.usable_fraction
    gib = (generate - copy.cache // 2) / GIB / fraction
    tight = step3(f"plan.device_memory_gib={gib}")
    assert 0 < tight.slots < 64 and f"generation.slots={tight.slots}" in tight.choice()
    assert tight.phases["generate"] <= tight.budget < roomy.phases["generate"]
    assert tight.lines[-1].cache <= copy.cache // 2
    config = resolved(dschat(f"plan.device_memory_gib={gib}"), [tight])
    assert config.generation.slots == tight.slots
    assert decode_engine(config.generation, 64) == ("refill", tight.slots)
