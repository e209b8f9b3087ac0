"""train.py end to end on a tiny model and generated data; every recipe parses."""

from pathlib import Path

import pytest
import torch

import train
from modeling_mmcoconut import MMCoconutForConditionalGeneration
from processing_mmcoconut import load_internvl_processor

RECIPES = sorted(p.name for p in Path("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_parses(recipe):
    model_args, data_args, curriculum_args, eval_args, training_args = train.parse_args(
        [f"recipes/{recipe}", "--use_cpu", "true"]
    )
    assert curriculum_args.mode in ("cot", "coconut", "no_cot", "no_thoughts", "pause")
    assert training_args.output_dir


def test_recipe_base_chain_and_flag_overrides():
    _, _, curriculum, _, training = train.parse_args(
        ["recipes/pause.yaml", "--use_cpu", "true", "--learning_rate", "3e-6"]
    )
    assert curriculum.mode == "pause" and curriculum.first_stage == 1  # pause <- coconut <- base
    assert curriculum.c_thought == 2 and training.learning_rate == 3e-6


def test_unknown_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("mode: coconut\nc_thougt: 2\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['c_thougt'\]"):
        train.parse_args([str(recipe)])


def test_demo_recipe_trains_through_stages_and_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    trainer = train.main([
        "recipes/demo.yaml", "--output_dir", str(out), "--synthetic_dir", str(tmp_path / "data"),
        "--synthetic_train", "8", "--synthetic_val", "4", "--num_train_epochs", "2", "--epochs_per_stage", "1",
        "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--report_to", "tensorboard",
    ])
    stages = [entry["stage"] for entry in trainer.state.log_history if "loss" in entry]
    assert stages == [0, 0, 1, 1]
    model = MMCoconutForConditionalGeneration.from_pretrained(out)
    assert model.config.latent_stage == 1 and model.config.c_thought == 1
    processor = load_internvl_processor(out, max_tiles=2)
    assert processor.tokenizer.convert_tokens_to_ids("<|latent|>") == model.config.latent_token_id
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    card = (out / "README.md").read_text()
    assert "| final curriculum stage | 1 |" in card and "| c_thought | 1 |" in card and "eval_loss" in card
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 3  # each epoch + the final evaluation
    assert all(0.0 <= entry["eval_mc_accuracy"] <= 1.0 and entry["eval_num_samples"] == 4 for entry in evals)
    assert "eval_mc_accuracy" in card
    assert list((out / "runs").rglob("events.out.tfevents.*")), "tensorboard logged nothing"
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, trainer.model.state_dict()[name], msg=name)


def test_launches_that_would_silently_run_something_else_are_refused(monkeypatch):
    class FakeTrainer:
        args = type("Args", (), {"world_size": 1})()
        is_fsdp_enabled = False
        is_deepspeed_enabled = False

    train.check_distributed_setup(FakeTrainer())  # a plain single-process run is fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="asks for FSDP"):
        train.check_distributed_setup(FakeTrainer())
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="asks for DeepSpeed"):
        train.check_distributed_setup(FakeTrainer())
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="launched as 2 processes"):
        train.check_distributed_setup(FakeTrainer())
