"""The demo (`make demo`) learns every time: the shipped CoT checkpoint it starts from, and its Coconut stages.

`recipes/demo.yaml` continues `checkpoints/demo-cot` (made by `make demo-cot`, recipes/demo_cot.yaml) through the
Coconut stages on the generated colour_chain task. Targets (docs/training.md#the-demo has the 10-run table): the CoT
model >= 90% MC accuracy, the final stage >= 80% (chance 25%), fewer generated tokens at every stage, whatever the
seed and the thread count.
"""

import json
from pathlib import Path

import pytest
import yaml

from mmcoconut.cli.train import main as train_main
from trainer_curriculum import stage_results

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "checkpoints" / "demo-cot"
COT_TARGET = 0.90
FINAL_TARGET = 0.80


def demo_recipe():
    with open(REPO / "recipes" / "demo.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_the_demo_starts_from_the_shipped_cot_checkpoint():
    recipe = demo_recipe()
    assert recipe["load_model_path"] == "checkpoints/demo-cot"
    assert recipe["first_stage"] == 1 and recipe["mode"] == "coconut"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (CHECKPOINT / name).is_file(), name
    # Small enough to live in git.
    assert sum(p.stat().st_size for p in CHECKPOINT.rglob("*") if p.is_file()) < 12 * 2**20


def test_the_shipped_cot_checkpoint_answers_the_demos_questions(tmp_path):
    """The CoT model the demo starts from, on the demo's own validation questions (generated here)."""
    from mmcoconut.data.aokvqa import load_records
    from mmcoconut.data.synthetic import write_synthetic_aokvqa
    from mmcoconut.evaluation.aokvqa import build_eval_dataset, evaluate_model
    from mmcoconut.inference.loading import load_model
    from mmcoconut.processing import load_internvl_processor

    recipe = demo_recipe()
    paths = write_synthetic_aokvqa(tmp_path / "data", 0, recipe["synthetic_val"], seed=0,
                                   task=recipe["synthetic_task"])
    records = load_records("canonical", "val", path=str(paths["canonical_dir"] / "val.jsonl"))
    model = load_model(str(CHECKPOINT), device="cpu")
    processor = load_internvl_processor(str(CHECKPOINT), max_tiles=1)
    dataset = build_eval_dataset(records, processor, "cot", model.config, max_tiles=1)
    metrics = evaluate_model(model, dataset, max_new_tokens=64, batch_size=50).metrics
    assert metrics["mc_accuracy"] >= COT_TARGET, metrics


def run_demo(tmp_path, seed):
    trainer = train_main(["recipes/demo.yaml", "--output_dir", str(tmp_path / f"demo-{seed}"),
                          "--synthetic_dir", str(tmp_path / "data"), "--seed", str(seed)])
    return stage_results(trainer.state.log_history)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_learns(tmp_path, seed):
    """`make demo` with three seeds: the final stage >= 80%, fewer tokens at every stage that thinks more.

    Stages past `max_latent_stage` keep its thoughts with every written step removed (as in Coconut), so the last
    two evaluations both answer after 3 thoughts."""
    recipe = demo_recipe()
    results = run_demo(tmp_path, seed)
    stages = sorted(results)
    assert stages[0] == recipe["first_stage"] and stages[-1] >= recipe["max_latent_stage"], stages
    accuracy = {stage: results[stage]["eval_mc_accuracy"] for stage in stages}
    latents = [results[stage]["eval_mean_latents"] for stage in stages]
    tokens = [results[stage]["eval_mean_generated_tokens"] for stage in stages]
    assert accuracy[stages[-1]] >= FINAL_TARGET, accuracy
    assert latents[-1] == recipe["max_latent_stage"] * recipe["c_thought"], latents
    for more, fewer, more_latents, fewer_latents in zip(tokens, tokens[1:], latents, latents[1:]):
        assert fewer < more if fewer_latents > more_latents else fewer == more, (tokens, latents)


@pytest.mark.slow
def test_make_demo_cot_remakes_the_checkpoint(tmp_path):
    """`make demo-cot` as shipped re-makes a CoT model that reaches the target (the one in git came from it)."""
    trainer = train_main(["recipes/demo_cot.yaml", "--output_dir", str(tmp_path / "cot"),
                          "--synthetic_dir", str(tmp_path / "data")])
    results = stage_results(trainer.state.log_history)
    assert results[0]["eval_mc_accuracy"] >= COT_TARGET, results
    saved = json.loads((tmp_path / "cot" / "config.json").read_text())
    shipped = json.loads((CHECKPOINT / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):  # the same model shape as the shipped one
        assert saved["internvl_config"]["text_config"][key] == shipped["internvl_config"]["text_config"][key], key
