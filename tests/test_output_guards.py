"""Nothing lost: a new run never writes over a previous run's results unless asked, and resuming is one flag."""

import json
from pathlib import Path

import pytest

from mmcoconut.cli import evaluate as evaluate_aokvqa
from mmcoconut.cli.train import main as train_main
from mmcoconut.training.checks import prepare_output_dir
from mmcoconut.training.recipe import parse_args

DEMO = str(Path("recipes/tiny.yaml").resolve())


def _previous_run(out):
    """What a finished run leaves: rotated checkpoints and a final model."""
    for step in (2, 10):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"old")
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")  # written last: the save completed
    (out / "config.json").write_text("{}")
    (out / "data").mkdir()  # the demo's generated data lives here: not a run's result


def _training_args(out, *flags):
    return parse_args([DEMO, "--output_dir", str(out), *flags])[-1]


def test_new_run_into_a_previous_run_is_refused_before_loading(tmp_path, no_loading):
    out = tmp_path / "run"
    _previous_run(out)
    with pytest.raises(FileExistsError, match=r"holds a previous run \(checkpoint-2, checkpoint-10, config.json\)"):
        train_main([DEMO, "--output_dir", str(out)])
    assert (out / "checkpoint-2" / "model.safetensors").read_bytes() == b"old"
    assert (out / "config.json").is_file()


def test_an_output_dir_without_a_run_is_fine(tmp_path):
    (tmp_path / "run" / "data").mkdir(parents=True)
    assert prepare_output_dir(_training_args(tmp_path / "run")) is None
    assert prepare_output_dir(_training_args(tmp_path / "missing")) is None


def test_overwrite_output_dir_removes_only_the_old_checkpoints(tmp_path):
    out = tmp_path / "run"
    _previous_run(out)
    # Left in place, checkpoint-10 would outlive the new run's checkpoint-2 in save_total_limit rotation.
    assert prepare_output_dir(_training_args(out, "--overwrite_output_dir", "true")) is None
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "data"]


@pytest.mark.parametrize("flag", ["True", "true", "latest"])
def test_resume_true_picks_the_latest_checkpoint(tmp_path, flag):
    out = tmp_path / "run"
    _previous_run(out)
    resume = prepare_output_dir(_training_args(out, "--resume_from_checkpoint", flag))
    assert resume == str(out / "checkpoint-10")


def test_resume_true_without_a_checkpoint_is_an_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"resume_from_checkpoint true: no complete checkpoint-\* folder in"):
        prepare_output_dir(_training_args(tmp_path / "run", "--resume_from_checkpoint", "true"))


def test_resume_false_is_a_new_run(tmp_path):
    out = tmp_path / "run"
    _previous_run(out)
    with pytest.raises(FileExistsError, match="holds a previous run"):
        prepare_output_dir(_training_args(out, "--resume_from_checkpoint", "false"))


def test_yaml_true_resumes(tmp_path):
    out = tmp_path / "run"
    _previous_run(out)
    recipe = tmp_path / "resume.yaml"
    recipe.write_text(f"base: {DEMO}\noutput_dir: {out}\nresume_from_checkpoint: true\n")
    args = parse_args([str(recipe)])[-1]
    assert prepare_output_dir(args) == str(out / "checkpoint-10")


def test_rerun_is_refused_and_resume_true_continues(tmp_path):
    out = tmp_path / "run"
    command = [
        DEMO, "--output_dir", str(out), "--synthetic_dir", str(tmp_path / "data"), "--synthetic_train", "8",
        "--synthetic_val", "4", "--per_device_train_batch_size", "4", "--epochs_per_stage", "1",
        "--eval_strategy", "no", "--eval_accuracy", "false", "--logging_steps", "1", "--save_total_limit", "2",
    ]
    first = train_main([*command, "--num_train_epochs", "1"])
    assert first.state.global_step == 2 and (out / "checkpoint-2").is_dir()
    with pytest.raises(FileExistsError, match="holds a previous run"):
        train_main([*command, "--num_train_epochs", "2"])
    resumed = train_main([*command, "--num_train_epochs", "2", "--resume_from_checkpoint", "True"])
    steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    assert steps == [1, 2, 3, 4]  # steps 1-2 come from checkpoint-2's trainer state, 3-4 were trained now
    assert resumed.state.global_step == 4 and sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-4",
    ]


# ---- evaluate_aokvqa.py ----


def _eval_args(model, out, data_file, split="val", *extra):
    return ["--model", str(model), "--data-file", str(data_file), "--split", split, "--mode", "coconut",
            "--max-new-tokens", "2", "--max-tiles", "4", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("name", ["metrics_val.json", "predictions_val.json", "samples_val.jsonl"])
def test_evaluation_refuses_to_overwrite_before_loading(tiny_checkpoint, tmp_path, no_loading, name):
    out = tmp_path / "eval"
    out.mkdir()
    (out / name).write_text("earlier run")
    with pytest.raises(FileExistsError, match=rf"already holds results of split 'val' \(.*{name}\).*--overwrite"):
        evaluate_aokvqa.main(_eval_args(tiny_checkpoint, out, tmp_path / "val.jsonl"))
    assert (out / name).read_text() == "earlier run"


def test_evaluation_results_are_named_per_split(tiny_checkpoint, synthetic_aokvqa, tmp_path):
    out = tmp_path / "eval"
    canonical = synthetic_aokvqa["canonical_dir"]
    evaluate_aokvqa.main(_eval_args(tiny_checkpoint, out, canonical / "val.jsonl", "val", "--limit", "2"))
    evaluate_aokvqa.main(_eval_args(tiny_checkpoint, out, canonical / "train.jsonl", "train", "--limit", "1"))
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics_train.json", "metrics_val.json", "predictions_train.json", "predictions_val.json",
        "samples_train.jsonl", "samples_val.jsonl",
    ]
    assert json.loads((out / "metrics_val.json").read_text())["num_samples"] == 2
    assert json.loads((out / "metrics_train.json").read_text())["num_samples"] == 1
    with pytest.raises(FileExistsError, match="already holds results of split 'val'"):
        evaluate_aokvqa.main(_eval_args(tiny_checkpoint, out, canonical / "val.jsonl", "val"))
    evaluate_aokvqa.main(_eval_args(tiny_checkpoint, out, canonical / "val.jsonl", "val", "--overwrite"))
    assert json.loads((out / "metrics_val.json").read_text())["num_samples"] == 3
