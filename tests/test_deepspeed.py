"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo), driven through `accelerate launch`, against DDP.

Every run is README's 2-process command on recipes/tiny.yaml (the demo's model, from scratch), 6 steps: 32
questions / (2 ranks x 8) = 2 steps per epoch, a stage per epoch, so steps 1-2 are stage 0, 3-4 stage 1, 5-6 stage 2, and the optimizer and LR schedule
restart at steps 3 and 5. Runs that need to be seen from inside go through `tests/deepspeed_probe.py`, which is
`train.py` plus an observing callback (it writes one JSON per rank).

Loss comparisons start every run from the same checkpoint (`--load_model_path`, the DDP from-scratch run's
output). A from-scratch ZeRO-3 run starts from DDP's weights too (`test_zero3_from_scratch_starts_from_ddps_weights`):
transformers would build the sub-models of a model made from a config inside `deepspeed.zero.Init` without its weight
initialisation, which `mmcoconut.training.build.build_tiny_model` avoids.

Tolerance: per-step logged losses within 2e-5 (absolute) of DDP's. Everything is float32; what differs is the
order of the gradient reductions (DDP's all-reduce buckets against ZeRO's reduce-scatter), which moves the
weights by float rounding (observed differences up to ~1e-6 after 6 steps); a wrong stage, a missed reset, a
scaled loss or a lost gradient shard move it by 1e-2 or more.

DeepSpeed compiles a C++ op (`deepspeed_shm_comm`) on its first start on a machine (about 30 s with ninja and g++
here); later starts reuse it from ~/.cache/torch_extensions.
"""

import ast
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Not importorskip: importing deepspeed at collection would cost the fast suite seconds.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="the deepspeed extra is not installed (pip install -e '.[deepspeed]')"),
]

REPO = Path(__file__).resolve().parents[1]
PROBE = "tests/deepspeed_probe.py"
LOSS_ATOL = 2e-5
STEPS = 6


def demo_flags(steps=STEPS):
    """README's DDP command's flags (tests/test_distributed.py), with a log per step."""
    return ["--max_steps", str(steps), "--first_stage_epochs", "1", "--epochs_per_stage", "1", "--synthetic_train", "32",
            "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--logging_steps", "1"]


DEMO_FLAGS = demo_flags()
STAGE_OF_STEP = {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}
STAGE_STARTS = (3, 5)  # the first steps of stages 1 and 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_config(name):
    return str(REPO / "ds_configs" / name)


def launch(config, script, args, probe_dir=None, timeout=900):
    """`accelerate launch --config_file CONFIG --num_processes 2 SCRIPT recipes/tiny.yaml ARGS`; returns the log."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
        "--main_process_port", str(free_port()), script, "recipes/tiny.yaml", *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    if probe_dir is not None:
        env["MMCOCONUT_PROBE_DIR"] = str(probe_dir)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-10000:]
    return log


def probed(probe_dir):
    """The probe's record of each rank, in rank order."""
    return [json.loads((Path(probe_dir) / f"rank{rank}.json").read_text()) for rank in range(2)]


def step_logs(log_history):
    """{step: training log entry} (full precision)."""
    return {entry["step"]: entry for entry in log_history if "loss" in entry}


def printed_losses(log):
    """{1-based log index: loss} from the Trainer's printed training logs (4 significant digits)."""
    entries = [ast.literal_eval(m) for m in re.findall(r"\{'loss': [^{}]*\}", log)]
    return {i + 1: float(e["loss"]) for i, e in enumerate(entries)}


def zero3_partitioned_config(tmp_path):
    """ds_configs/accelerate_zero3.yaml with zero3.json's stage3_param_persistence_threshold at 0.

    With the shipped 1e5, every parameter of the tiny demo model (the largest has 65,536 elements) stays whole on
    every rank, which would not test ZeRO-3 at all.
    """
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    text = (REPO / "ds_configs" / "accelerate_zero3.yaml").read_text()
    assert "deepspeed_config_file: ds_configs/zero3.json" in text
    text = text.replace("ds_configs/zero3.json", str(tmp_path / "zero3.json"))
    (tmp_path / "accelerate_zero3.yaml").write_text(text)
    return str(tmp_path / "accelerate_zero3.yaml")


# ---- the runs (each once per session) ----


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def data_flags(work):
    return ["--synthetic_dir", str(work / "data")]


@pytest.fixture(scope="module")
def ddp_scratch(work, data_flags):
    """README's DDP command from scratch; its final model is every comparison's starting checkpoint."""
    out = work / "ddp-scratch"
    launch(accelerate_config("accelerate_ddp.yaml"), PROBE,
           DEMO_FLAGS + data_flags + ["--save_strategy", "no", "--output_dir", str(out)], probe_dir=out / "probe")
    return {"out": out, "ranks": probed(out / "probe")}


@pytest.fixture(scope="module")
def start_flags(ddp_scratch, data_flags):
    return DEMO_FLAGS + data_flags + ["--load_model_path", str(ddp_scratch["out"])]


@pytest.fixture(scope="module")
def zero2_readme(work, data_flags):
    """README's ZeRO-2 command, as written (train.py itself), from scratch."""
    out = work / "zero2-readme"
    log = launch(accelerate_config("accelerate_zero2.yaml"), "train.py",
                 DEMO_FLAGS + data_flags + ["--save_strategy", "no", "--output_dir", str(out)])
    return {"out": out, "log": log}


@pytest.fixture(scope="module")
def zero3_readme(work, data_flags):
    """README's ZeRO-3 command with the shipped configs, from scratch (observed: the probe in train.py's place)."""
    out = work / "zero3-readme"
    log = launch(accelerate_config("accelerate_zero3.yaml"), PROBE,
                 DEMO_FLAGS + data_flags + ["--save_strategy", "no", "--output_dir", str(out)], probe_dir=out / "probe")
    return {"out": out, "log": log, "ranks": probed(out / "probe")}


@pytest.fixture(scope="module")
def ddp_run(work, start_flags):
    out = work / "ddp"
    launch(accelerate_config("accelerate_ddp.yaml"), PROBE, start_flags + ["--save_strategy", "no", "--output_dir",
                                                                            str(out)], probe_dir=out / "probe")
    return {"out": out, "ranks": probed(out / "probe")}


@pytest.fixture(scope="module")
def zero2_run(work, start_flags):
    out = work / "zero2"
    log = launch(accelerate_config("accelerate_zero2.yaml"), PROBE,
                 start_flags + ["--save_strategy", "no", "--output_dir", str(out)], probe_dir=out / "probe")
    return {"out": out, "log": log, "ranks": probed(out / "probe")}


@pytest.fixture(scope="module")
def zero3_config(work):
    (work / "cfg").mkdir(exist_ok=True)
    return zero3_partitioned_config(work / "cfg")


@pytest.fixture(scope="module")
def zero3_run(work, start_flags, zero3_config):
    """ZeRO-3, really partitioned; checkpoints at step 3 (mid-curriculum: stage 1) and 6."""
    out = work / "zero3"
    flags = ["--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "2", "--output_dir", str(out)]
    log = launch(zero3_config, PROBE, start_flags + flags, probe_dir=out / "probe")
    return {"out": out, "log": log, "ranks": probed(out / "probe")}


def assert_losses_equal(ours, ddp, label):
    ours, ddp = step_logs(ours), step_logs(ddp)
    assert sorted(ours) == sorted(ddp) == list(range(1, STEPS + 1)), (sorted(ours), sorted(ddp))
    rows = [f"step {s}: {label} {ours[s]['loss']:.7f}  DDP {ddp[s]['loss']:.7f}  stage {ours[s]['stage']}"
            for s in ddp]
    print(f"{label} vs DDP (atol {LOSS_ATOL}):\n" + "\n".join(rows))
    for step in ddp:
        assert ours[step]["stage"] == ddp[step]["stage"] == STAGE_OF_STEP[step]
        assert abs(ours[step]["loss"] - ddp[step]["loss"]) <= LOSS_ATOL, "\n".join(rows)
        assert ours[step]["learning_rate"] == pytest.approx(ddp[step]["learning_rate"], rel=1e-9)


# ---- 1. README's commands run on CPU ----


def test_readme_zero2_command_trains_through_three_stages(zero2_readme, ddp_scratch):
    log, out = zero2_readme["log"], zero2_readme["out"]
    assert "Setting accelerator to CPU" in log
    for stage in (0, 1, 2):
        assert f"'stage': {stage}" in log, log[-4000:]
    assert (out / "model.safetensors").is_file()
    # From scratch ZeRO-2 builds the model as DDP does: the printed losses are DDP's.
    ddp = step_logs(ddp_scratch["ranks"][0]["log_history"])
    printed = printed_losses(log)
    assert sorted(printed) == list(range(1, STEPS + 1)), printed
    for step, loss in printed.items():
        assert loss == pytest.approx(ddp[step]["loss"], rel=1e-3), (printed, ddp)


def test_readme_zero3_command_trains_saves_and_keeps_tiny_parameters_whole(zero3_readme):
    log, out, ranks = zero3_readme["log"], zero3_readme["out"], zero3_readme["ranks"]
    for stage in (0, 1, 2):
        assert f"'stage': {stage}" in log, log[-4000:]
    assert (out / "model.safetensors").is_file()
    # The shipped stage3_param_persistence_threshold (1e5) keeps every parameter of this tiny model whole on every
    # rank: that is why the partitioning tests use 0.
    for rank in ranks:
        assert rank["deepspeed"] and "stage3" in " ".join(rank["optimizer_chain"])
        last = rank["partition"][-1]
        assert len(last["params_whole_here"]) == last["num_params"]
        assert last["materialised_numel"] == last["full_numel"]


def test_zero3_from_scratch_starts_from_ddps_weights(zero3_readme, ddp_scratch):
    ours, ddp = zero3_readme["ranks"][0]["initial_weights"], ddp_scratch["ranks"][0]["initial_weights"]
    assert ours.keys() == ddp.keys()
    different = [name for name in ddp if ours[name] != pytest.approx(ddp[name], rel=1e-5, abs=1e-6)]
    assert not different, f"{len(different)} of {len(ddp)} parameters differ, e.g. " + ", ".join(
        f"{n}: sum/std {ours[n]} vs DDP {ddp[n]}" for n in different[:3])


# ---- 2. the same numbers as DDP ----


def test_all_runs_start_from_the_same_weights(ddp_run, zero2_run, zero3_run):
    ddp = ddp_run["ranks"][0]["initial_weights"]
    for run in (zero2_run, zero3_run):
        for rank in run["ranks"]:
            assert rank["initial_weights"].keys() == ddp.keys()
            for name, value in ddp.items():
                assert rank["initial_weights"][name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


def test_zero2_logs_ddps_loss_at_every_step(zero2_run, ddp_run):
    assert "stage_1_and_2" in " ".join(zero2_run["ranks"][0]["optimizer_chain"])
    assert_losses_equal(zero2_run["ranks"][0]["log_history"], ddp_run["ranks"][0]["log_history"], "ZeRO-2")


def test_zero3_logs_ddps_loss_at_every_step(zero3_run, ddp_run):
    assert "stage3" in " ".join(zero3_run["ranks"][0]["optimizer_chain"])
    assert_losses_equal(zero3_run["ranks"][0]["log_history"], ddp_run["ranks"][0]["log_history"], "ZeRO-3")


def test_zero3_parameters_are_really_partitioned(zero3_run):
    """Each rank holds half of every parameter (padded to a multiple of 2) and, between steps, nothing else."""
    first, second = zero3_run["ranks"]
    for rank in (first, second):
        assert rank["world_size"] == 2
        assert len(rank["partition"]) == STEPS
        for entry in rank["partition"]:
            assert entry["params_whole_here"] == []
            assert entry["materialised_numel"] == 0
            assert entry["full_numel"] / 2 <= entry["local_numel"] <= entry["full_numel"] / 2 + entry["num_params"]
            name, full, local = entry["largest"]
            assert local == full // 2, entry["largest"]
    # Different halves: the two ranks' shards are not copies of each other.
    assert first["partition"][-1]["shard_checksum"] != pytest.approx(second["partition"][-1]["shard_checksum"])


# ---- 3. the curriculum under ZeRO ----


@pytest.mark.parametrize("run_name", ["zero2_run", "zero3_run"])
def test_stage_boundary_resets_deepspeeds_optimizer_and_lr_on_every_rank(run_name, request, ddp_run):
    run = request.getfixturevalue(run_name)
    ddp_steps = step_logs(ddp_run["ranks"][0]["log_history"])
    for rank in run["ranks"]:
        chain = rank["optimizer_chain"]
        assert chain[0].startswith("accelerate.utils.deepspeed") and chain[-1] == "torch.optim.adamw.AdamW", chain
        epochs = {e["global_step"]: e for e in rank["epochs"]}
        steps = {s["global_step"]: s for s in rank["steps"]}
        for start in STAGE_STARTS:
            # Before the new stage's first step: the base optimizer holds no moments (Adam's are zero when created).
            before = epochs[start - 1]
            assert before["num_states"] == 0 and before["max_abs_exp_avg"] == 0 == before["max_abs_exp_avg_sq"]
            assert steps[start - 1]["adam_steps"] == [2.0]  # the previous stage did have state
            # Its first step starts Adam afresh (bias correction at step 1); the second continues it.
            assert steps[start]["adam_steps"] == [1.0] and steps[start + 1]["adam_steps"] == [2.0]
            assert steps[start]["num_states"] > 0 and steps[start]["max_abs_exp_avg"] > 0
        # The warm-up restarts: the first step of each stage runs at the first step's learning rate.
        logs = step_logs(rank["log_history"])
        for start in STAGE_STARTS:
            assert logs[start]["learning_rate"] == logs[1]["learning_rate"] < logs[2]["learning_rate"]
            assert logs[start]["learning_rate"] == pytest.approx(ddp_steps[start]["learning_rate"], rel=1e-9)


def test_resume_from_mid_curriculum_zero3_checkpoint_reproduces_the_run(work, start_flags, zero3_config, zero3_run):
    checkpoint = zero3_run["out"] / "checkpoint-3"
    assert (checkpoint / "global_step3").is_dir() and (checkpoint / "trainer_state.json").is_file()
    out = work / "zero3-resumed"
    flags = ["--save_strategy", "steps", "--save_steps", "3", "--output_dir", str(out),
             "--resume_from_checkpoint", str(checkpoint)]
    log = launch(zero3_config, "train.py", start_flags + flags)
    resumed = step_logs(json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"])
    uninterrupted = step_logs(zero3_run["ranks"][0]["log_history"])
    rows = [f"step {s}: resumed {resumed[s]['loss']:.7f}  uninterrupted {uninterrupted[s]['loss']:.7f}  "
            f"stage {resumed[s]['stage']}" for s in (4, 5, 6)]
    print("ZeRO-3 resumed from checkpoint-3:\n" + "\n".join(rows))
    # Steps 1-3 come from the checkpoint's state; 4-6 were trained again: stage 1, then stage 2 after a reset.
    printed = [ast.literal_eval(m) for m in re.findall(r"\{'loss': [^{}]*\}", log)]
    assert [e["stage"] for e in printed] == [1, 2, 2], printed
    for step in (4, 5, 6):
        assert resumed[step]["stage"] == STAGE_OF_STEP[step]
        assert abs(resumed[step]["loss"] - uninterrupted[step]["loss"]) <= LOSS_ATOL, "\n".join(rows)
        assert resumed[step]["learning_rate"] == uninterrupted[step]["learning_rate"]


def test_final_zero3_save_loads_with_remote_code_and_generates(zero3_run, ddp_run):
    from safetensors.torch import load_file

    out = zero3_run["out"]
    # stage3_gather_16bit_weights_on_model_save: whole tensors, not the rank's empty placeholders; and DDP's.
    ours, ddp = load_file(out / "model.safetensors"), load_file(ddp_run["out"] / "model.safetensors")
    assert ours.keys() == ddp.keys()
    for name in ddp:
        assert ours[name].shape == ddp[name].shape and ours[name].numel() > 0, name
        torch.testing.assert_close(ours[name], ddp[name], atol=1e-4, rtol=1e-3, msg=name)
    # In a fresh interpreter, as a user loads it: once this process has imported modeling_mmcoconut (an earlier test
    # of the lane may have), transformers prefers that registered class to the checkpoint's remote code.
    script = """
import sys
from PIL import Image
from transformers import AutoModel, AutoProcessor
out = sys.argv[1]
model = AutoModel.from_pretrained(out, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert "modeling_mmcoconut" not in sys.modules, "the project's own module was imported"
assert model.config.latent_stage == 2
processor = AutoProcessor.from_pretrained(out)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.new("RGB", (56, 56), (200, 30, 30))], text=prompt, return_tensors="pt")
assert int((inputs["input_ids"] == model.config.latent_token_id).sum()) == 2  # stage 2 x c_thought 1
generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
assert generated.shape[1] > inputs["input_ids"].shape[1]
print("remote code ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=out, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "remote code ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_evaluation_with_generation_during_zero3_training(work, zero3_config, ddp_scratch):
    """Evaluation (loss + generated answers) at steps 2 and 4; generation lengths differ between the ranks'
    questions, so every rank must run the same language-model calls (synced decoding, agreed passes)."""
    out = work / "zero3-eval"
    flags = ["--max_steps", "4", "--first_stage_epochs", "1", "--epochs_per_stage", "1", "--synthetic_train", "32",
             "--synthetic_val", "8", "--synthetic_dir", str(work / "data-eval"), "--per_device_train_batch_size", "8",
             "--per_device_eval_batch_size", "4", "--eval_strategy", "steps", "--eval_steps", "2",
             "--eval_accuracy", "true", "--eval_max_new_tokens", "12", "--logging_steps", "1",
             "--save_strategy", "no", "--load_model_path", str(ddp_scratch["out"]), "--output_dir", str(out)]
    launch(zero3_config, PROBE, flags, probe_dir=out / "probe")
    first, second = probed(out / "probe")
    print("ZeRO-3 evaluation LM calls per rank:", [[e["lm_calls"] for e in r["evaluations"]] for r in (first, second)])
    assert [e["global_step"] for e in first["evaluations"]] == [2, 4]
    for mine, theirs in zip(first["evaluations"], second["evaluations"]):
        assert mine["lm_calls"] == theirs["lm_calls"] > 0
        assert "eval_mc_accuracy" in mine["metrics"] and "eval_loss" in mine["metrics"]
        assert mine["metrics"]["eval_mc_accuracy"] == theirs["metrics"]["eval_mc_accuracy"]
    # The second evaluation is at stage 1: its prompts carry a latent.
    assert first["evaluations"][1]["metrics"]["eval_mean_latents"] == 1
    assert first["partition"][-1]["params_whole_here"] == []


def test_lora_under_zero2_matches_ddp(work, data_flags):
    flags = demo_flags(steps=4) + ["--use_lora", "true", "--save_strategy", "no"]
    runs = {}
    for name, config in (("ddp", "accelerate_ddp.yaml"), ("zero2", "accelerate_zero2.yaml")):
        out = work / f"lora-{name}"
        log = launch(accelerate_config(config), PROBE, flags + data_flags + ["--output_dir", str(out)],
                     probe_dir=out / "probe")
        runs[name] = {"out": out, "log": log, "logs": step_logs(probed(out / "probe")[0]["log_history"])}
    ddp, zero2 = runs["ddp"], runs["zero2"]
    print("LoRA losses: " + ", ".join(f"step {s}: ZeRO-2 {zero2['logs'][s]['loss']:.7f} DDP {ddp['logs'][s]['loss']:.7f}"
                                      for s in sorted(ddp["logs"])))
    assert sorted(zero2["logs"]) == sorted(ddp["logs"]) == [1, 2, 3, 4]
    for step in ddp["logs"]:
        assert abs(zero2["logs"][step]["loss"] - ddp["logs"][step]["loss"]) <= LOSS_ATOL
    assert (zero2["out"] / "adapter_model.safetensors").is_file()
    assert "LoRA merge skipped" in zero2["log"]
    assert (ddp["out"] / "merged" / "model.safetensors").is_file()


def test_deepspeed_config_with_cpu_flag_is_refused_with_the_reason(work, data_flags):
    """What really cannot run: a DeepSpeed config launched with accelerate's CPU flag (`--cpu`, `use_cpu: true` in
    the accelerate config; both set ACCELERATE_USE_CPU), which would quietly train without DeepSpeed."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               accelerate_config("accelerate_zero2.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "train.py", "recipes/tiny.yaml", *demo_flags(steps=1), *data_flags,
               "--save_strategy", "no", "--output_dir", str(work / "refused")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "asks for DeepSpeed but the Trainer would not use it: accelerate was told to run on CPU" in log, log[-4000:]
    assert not (work / "refused" / "model.safetensors").exists()
