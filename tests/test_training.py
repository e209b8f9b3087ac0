"""train.py end to end on a tiny model and generated data; every recipe parses."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import GenerationConfig

from configuration_mmcoconut import MMCoconutConfig
from mmcoconut.cli.train import main as train_main
from mmcoconut.processing import load_internvl_processor
from mmcoconut.training.arguments import CurriculumArguments, DataArguments, ModelArguments, SetupError
from mmcoconut.training.build import build_model_and_processor
from mmcoconut.training.checks import HUB_PROBE_TIMEOUT_S, check_distributed_setup, require_hub
from mmcoconut.training.recipe import parse_args
from mmcoconut.training.report import model_card_info
from modeling_mmcoconut import MMCoconutForConditionalGeneration
from trainer_curriculum import CurriculumTrainer, render_model_card

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.name for p in Path("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_parses(recipe):
    model_args, data_args, curriculum_args, eval_args, training_args = parse_args(
        [f"recipes/{recipe}", "--use_cpu", "true"]
    )
    assert curriculum_args.mode in ("cot", "coconut", "no_cot", "no_thoughts", "pause")
    assert training_args.output_dir


def test_recipe_base_chain_and_flag_overrides():
    _, _, curriculum, _, training = parse_args(
        ["recipes/pause.yaml", "--use_cpu", "true", "--learning_rate", "3e-6"]
    )
    assert curriculum.mode == "pause" and curriculum.first_stage == 1  # pause <- coconut <- base
    assert curriculum.c_thought == 2 and training.learning_rate == 3e-6


def test_unknown_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("mode: coconut\nc_thougt: 2\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['c_thougt'\]"):
        parse_args([str(recipe)])


def test_demo_recipe_trains_through_stages_and_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    trainer = train_main([
        "recipes/tiny.yaml", "--output_dir", str(out), "--synthetic_dir", str(tmp_path / "data"),
        "--synthetic_train", "8", "--synthetic_val", "4", "--num_train_epochs", "2", "--first_stage_epochs", "1",
        "--epochs_per_stage", "1", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--report_to", "tensorboard",
    ])
    stages = [entry["stage"] for entry in trainer.state.log_history if "loss" in entry]
    assert stages == [0, 0, 1, 1]
    model = MMCoconutForConditionalGeneration.from_pretrained(out)
    assert model.config.latent_stage == 1 and model.config.c_thought == 1
    processor = load_internvl_processor(out, max_tiles=1)
    assert processor.tokenizer.convert_tokens_to_ids("<|latent|>") == model.config.latent_token_id
    assert len(processor.tokenizer) <= 512 + 4  # the task tokenizer (+ <video> and the three latent tokens)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # the demo keeps one
    card = (out / "README.md").read_text()
    assert "| final curriculum stage | 1 |" in card and "| c_thought | 1 |" in card and "eval_loss" in card
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 2  # once per epoch: the last epoch's is the final evaluation, not run twice
    assert [entry["eval_stage"] for entry in evals] == [0, 1]
    assert all(0.0 <= entry["eval_mc_accuracy"] <= 1.0 and entry["eval_num_samples"] == 4 for entry in evals)
    assert json.loads((out / "eval_results.json").read_text())["eval_mc_accuracy"] == evals[-1]["eval_mc_accuracy"]
    assert "eval_mc_accuracy" in card
    metadata = ModelCard.load(out / "README.md").data  # the header parses back as the Hub reads it
    assert metadata.base_model is None  # no Hub model to name
    results = {result.metric_name: result for result in metadata.eval_results}
    assert results["MC accuracy"].metric_value == evals[-1]["eval_mc_accuracy"]
    assert results["loss"].metric_value == evals[-1]["eval_loss"]
    assert results["MC accuracy"].dataset_name == "mmcoconut synthetic (colour_chain)"
    assert list((out / "runs").rglob("events.out.tfevents.*")), "tensorboard logged nothing"
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, trainer.model.state_dict()[name], msg=name)


def test_training_logs_never_average_over_a_stage_boundary(tmp_path):
    # 2 steps per epoch, a log every 3 steps: without the forced log at each stage's end, the log at step 3 would
    # average stage 0's and stage 1's losses and latents.
    trainer = train_main([
        "recipes/tiny.yaml", "--output_dir", str(tmp_path / "run"), "--synthetic_dir", str(tmp_path / "data"),
        "--synthetic_train", "8", "--num_train_epochs", "3", "--first_stage_epochs", "1", "--epochs_per_stage", "1",
        "--per_device_train_batch_size", "4", "--logging_steps", "3", "--eval_strategy", "no",
        "--save_strategy", "no",
    ])
    logs = [(entry["step"], entry["stage"], entry["latents_per_sample"])
            for entry in trainer.state.log_history if "loss" in entry]
    assert logs == [(2, 0, 0), (3, 1, 1), (4, 1, 1), (6, 2, 2)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_intermediate_checkpoints_are_ready_for_inference_as_the_final_save(tmp_path, lora):
    """checkpoint-2 (end of stage 0) gets what the final directory (stage 1) gets: its stage's chat template, the
    generation budget, and with LoRA the run's config beside the adapters."""
    from mmcoconut.text.prompt import chat_template, default_latents

    out = tmp_path / "run"
    train_main([
        "recipes/tiny.yaml", "--output_dir", str(out), "--synthetic_dir", str(tmp_path / "data"),
        "--synthetic_train", "8", "--num_train_epochs", "2", "--first_stage_epochs", "1", "--epochs_per_stage", "1",
        "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--eval_accuracy", "false",
        "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "3", "--eval_max_new_tokens", "7",
        "--use_lora", str(lora).lower(),
    ])
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "config.json").is_file()
    configs = {path: MMCoconutConfig.from_pretrained(path) for path in (checkpoint, out)}
    assert (configs[checkpoint].latent_stage, configs[out].latent_stage) == (0, 1)
    assert configs[checkpoint].latent_ids == configs[out].latent_ids != (None, None, None)  # the run's config
    for path, config in configs.items():
        processor = load_internvl_processor(path)
        assert processor.chat_template == chat_template(processor.image_token, default_latents(config)), path
    assert chat_template("<IMG_CONTEXT>", 0) != chat_template("<IMG_CONTEXT>", 1)  # the stages' templates differ
    if not lora:  # LoRA directories hold adapters only (no generation config); merged/ is the full model
        budgets = [GenerationConfig.from_pretrained(path).max_new_tokens for path in (checkpoint, out)]
        assert budgets == [7, 7]


def test_demo_card_says_random_init_and_loads_from_its_real_path(tmp_path):
    out = tmp_path / "demo"
    trainer = train_main([
        "recipes/tiny.yaml", "--output_dir", str(out), "--synthetic_dir", str(tmp_path / "data"),
        "--synthetic_train", "8", "--synthetic_val", "4", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "4", "--save_strategy", "no", "--use_lora", "true",
    ])
    card = (out / "README.md").read_text()
    assert "base_model:" not in card  # no Hub model to name: the model was built from a config
    assert ModelCard.load(out / "README.md").data.base_model is None
    assert "| base model | random init: tiny config (task tokenizer) |" in card
    merged = out / "merged"
    assert f'AutoModel.from_pretrained("{merged}", trust_remote_code=True)' in card
    assert "PEFT adapters" in card
    MMCoconutForConditionalGeneration.from_pretrained(merged)  # what the card points at loads
    assert trainer.model_card_info["lora"]


def card_for(checkpoint, config):
    """`render_model_card` for a run that saved `checkpoint`, without training one."""
    trainer = SimpleNamespace(
        model=SimpleNamespace(config=config), model_card_info={"mode": "coconut", "load_path": str(checkpoint)},
        state=SimpleNamespace(log_history=[], epoch=3), args=SimpleNamespace(output_dir=str(checkpoint)),
    )
    return render_model_card(trainer, "run")


def test_model_card_of_an_adaptive_checkpoint_says_the_model_decides_and_its_snippet_runs(
    inference_checkpoint, question_image, tmp_path
):
    fixed = MMCoconutForConditionalGeneration.from_pretrained(inference_checkpoint).config  # stage 1, c_thought 2
    card = card_for(inference_checkpoint, fixed)
    assert "| continuous thoughts at inference | 2 |" in card
    assert "Prompts end with `<|start-latent|>` + 2 x `<|latent|>` + `<|end-latent|>`" in card
    assert "adaptive" not in card

    path = tmp_path / "adaptive"
    shutil.copytree(inference_checkpoint, path)
    model = MMCoconutForConditionalGeneration.from_pretrained(path)
    model.config.supervise_end_latent = True  # as train.py records it
    model.save_pretrained(path)
    card = card_for(path, model.config)
    assert "| continuous thoughts at inference | adaptive, at most 2 |" in card
    assert "thinks adaptively" in card and "prompts end with `<|start-latent|>`" in card
    assert "`max_thoughts` (default 2: latent_stage 1 x c_thought 2)" in card
    assert 'thinking="fixed"' in card and "num_latents=N" in card
    assert "+ 2 x `<|latent|>`" not in card

    # The card's snippet answers as written, thinking as the model decides.
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    from PIL import Image

    scope = {"question": "Which colour is on the left?", "image": Image.open(question_image)}
    exec(snippet, scope)
    assert scope["prompt"].endswith("<|start-latent|>")
    assert scope["out"].num_thoughts.shape == (1,) and 0 <= int(scope["out"].num_thoughts[0]) <= 2


def run_card_info(output_dir, model_args=None):
    """`model_card_info` of a run with the default arguments: the Hub base model, trained on the Hub's A-OKVQA."""
    return model_card_info(
        model_args or ModelArguments(), DataArguments(), CurriculumArguments(),
        type("Args", (), {"output_dir": str(output_dir), "hub_model_id": None, "push_to_hub": False,
                          **{k: None for k in ("learning_rate", "num_train_epochs", "per_device_train_batch_size",
                                               "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps",
                                               "weight_decay", "bf16", "activation_checkpointing", "seed")}})(),
    )


def test_model_card_names_the_hub_base_model():
    info = run_card_info("outputs/x")
    assert info["base_model"] == "OpenGVLab/InternVL3-1B-Pretrained" and info["load_path"] == "outputs/x"
    assert info["license"] is None  # a fine-tune's license is its base model's
    assert run_card_info("outputs/x", ModelArguments(tiny_internvl={}))["license"] == "mit"  # all mmcoconut's


def test_written_model_card_parses_back_with_base_model_tags_and_eval_results(tmp_path):
    """`create_model_card` writes README.md into the output directory; huggingface_hub reads its header back."""
    last_eval = {"eval_loss": 0.8125, "eval_mc_accuracy": 0.75, "eval_da_accuracy": None,
                 "eval_mean_generated_tokens": 10.0, "eval_stage": 1, "epoch": 2.0}
    trainer = SimpleNamespace(
        model=SimpleNamespace(config=MMCoconutConfig(latent_stage=1, c_thought=2)),
        model_card_info=run_card_info(tmp_path), args=SimpleNamespace(output_dir=str(tmp_path)),
        state=SimpleNamespace(log_history=[{"loss": 1.0, "epoch": 1.0}, last_eval], epoch=2),
        is_world_process_zero=lambda: True,
    )
    CurriculumTrainer.create_model_card(trainer, "run")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "OpenGVLab/InternVL3-1B-Pretrained"
    assert card.data.license is None  # a fine-tune's license is its base model's
    assert card.data.datasets == ["HuggingFaceM4/A-OKVQA"]
    assert card.data.tags == ["mmcoconut", "coconut", "continuous-thought", "internvl", "a-okvqa"]
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "image-text-to-text")
    assert card.data.model_name == "run"
    results = {result.metric_name: result for result in card.data.eval_results}
    assert set(results) == {"MC accuracy", "loss"}  # da_accuracy is None: no direct answers to score
    assert (results["MC accuracy"].metric_type, results["MC accuracy"].metric_value) == ("accuracy", 0.75)
    assert results["loss"].metric_value == 0.8125
    assert {(r.dataset_type, r.dataset_name, r.dataset_split) for r in results.values()} == {
        ("HuggingFaceM4/A-OKVQA", "A-OKVQA", "val")}
    # The body keeps the run's facts.
    assert "| base model | `OpenGVLab/InternVL3-1B-Pretrained` |" in card.text
    assert "| final curriculum stage | 1 |" in card.text and "| c_thought | 2 |" in card.text
    assert "| eval_mc_accuracy | 0.75 |" in card.text and "| epochs | 2 |" in card.text
    assert f'AutoModel.from_pretrained("{tmp_path}", trust_remote_code=True)' in card.text
    assert "PEFT adapters" not in card.text


def test_task_tokenizer_needs_a_model_built_from_scratch():
    args = ModelArguments(tokenizer="task")
    with pytest.raises(ValueError, match="needs tiny_internvl"):
        build_model_and_processor(args, DataArguments(), CurriculumArguments())


def test_bf16_recipe_on_a_machine_without_gpu_says_so_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SetupError, match=r"needs a GPU.*--bf16 false --use_cpu true"):
        parse_args(["recipes/cot.yaml"])


def test_unreachable_hub_fails_in_seconds_naming_the_id_and_both_fixes(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    started = time.perf_counter()
    with pytest.raises(SetupError) as error:
        require_hub("OpenGVLab/InternVL3-1B-Pretrained", "model", "model_name_or_path")
    assert time.perf_counter() - started < HUB_PROBE_TIMEOUT_S + 1
    message = str(error.value)
    assert "'OpenGVLab/InternVL3-1B-Pretrained'" in message and "\n" not in message
    assert "model_name_or_path to a local copy" in message and "HF_HUB_OFFLINE=1" in message
    require_hub(".", "model", "model_name_or_path")  # a local directory needs no network


def test_offline_without_a_cached_copy_says_so(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SetupError, match=r"HF_HUB_OFFLINE is set and the model 'someone/model' is not in"):
        require_hub("someone/model", "model", "model_name_or_path")


def test_train_py_without_network_prints_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [sys.executable, "train.py", "recipes/cot.yaml", "--bf16", "false", "--use_cpu", "true",
         "--output_dir", str(tmp_path / "out"), "--report_to", "none"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: cannot reach http://127.0.0.1:") and "OpenGVLab/InternVL3-1B-Pretrained" in last


def closed_port():
    """A loopback port nothing listens on: connecting to it is refused at once, as without network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_launches_that_would_silently_run_something_else_are_refused(monkeypatch):
    class FakeTrainer:
        args = type("Args", (), {"world_size": 1})()
        is_fsdp_enabled = False
        is_deepspeed_enabled = False

    check_distributed_setup(FakeTrainer())  # a plain single-process run is fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="asks for FSDP"):
        check_distributed_setup(FakeTrainer())
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="asks for DeepSpeed.*told to run on CPU"):
        check_distributed_setup(FakeTrainer())
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="launched as 2 processes"):
        check_distributed_setup(FakeTrainer())


def test_the_train_command_leaves_the_process_group_before_exit(tmp_path):
    """Left to the interpreter's exit, gloo's threads could abort a rank after the run had saved (exit -6, and the
    launcher called the run failed): the command tears the group down itself, after a barrier."""
    import torch.distributed as dist

    from mmcoconut.cli.train import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    assert dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()
    leave_process_group()  # nothing to leave: a single-process run
