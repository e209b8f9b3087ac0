"""The learning-curve experiment's tokenizer and an end-to-end run of `experiments/learning_curve.py` at toy size."""

import json

import pytest
from transformers import AutoTokenizer

from configuration_mmcoconut import MMCoconutConfig
from experiments import learning_curve
from mmcoconut.processing import (
    INTERNVL_SPECIAL_TOKENS,
    QWEN2_5_SPECIAL_TOKENS,
    build_task_tokenizer,
    tiny_internvl_config,
)

TEXTS = ["user\n", "assistant\n"] + [
    f"{a} points to {b}.\n" for a in ("red", "green", "blue") for b in ("yellow", "purple", "green")
] * 5 + ["Answer: D. purple", "Answer: A. green"] * 5


@pytest.fixture(scope="module")
def task_tokenizer():
    return build_task_tokenizer(TEXTS, vocab_size=400)


def test_task_tokenizer_keeps_internvl_special_tokens(task_tokenizer):
    tok = task_tokenizer
    for token in QWEN2_5_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS:
        assert len(tok.encode(token, add_special_tokens=False)) == 1, token
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_ids_to_tokens(tok.context_image_token_id) == "<IMG_CONTEXT>"
    assert tok.start_image_token == "<img>" and tok.end_image_token == "</img>"
    assert len(tok) <= 400 + 1  # + <video>, added after the trained vocabulary as in InternVL's tokenizer


def test_task_tokenizer_round_trips_any_text_and_merges_task_words(task_tokenizer):
    tok = task_tokenizer
    for text in ("red points to yellow.\nAnswer: D. purple", "héllo wörld 123 ✓\t", "<|im_start|>user\n<img>"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    for word in ("red", " yellow", " points", "Answer"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word


def test_task_tokenizer_is_deterministic_and_saves(task_tokenizer, tmp_path):
    assert build_task_tokenizer(TEXTS, vocab_size=400).get_vocab() == task_tokenizer.get_vocab()
    task_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == task_tokenizer.get_vocab()
    assert reloaded.context_image_token_id == task_tokenizer.context_image_token_id


def test_task_tokenizer_rejects_a_vocabulary_too_small_for_bytes_and_specials():
    with pytest.raises(ValueError, match="256 bytes"):
        build_task_tokenizer(TEXTS, vocab_size=100)


def test_tiny_config_for_a_task_vocabulary():
    config = tiny_internvl_config(vocab_size=400, image_token_id=24, tie_word_embeddings=True)
    assert config.image_token_id == 24 and config.text_config.vocab_size == 400
    assert config.tie_word_embeddings and config.text_config.tie_word_embeddings
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_internvl_config(vocab_size=400)  # InternVL3's <IMG_CONTEXT> id, 151667, does not fit


def test_plan_chains_the_coconut_stages_from_cot():
    plan = learning_curve.plan_runs(hops=3, epochs=4, stage_epochs=2)
    names = [run[0] for run in plan]
    assert names == ["no_cot", "cot", "coconut_1", "coconut_2", "coconut_3", "no_image_no_cot", "no_image_cot"]
    starts = {run[0]: (run[4], run[5]) for run in plan}
    assert starts["coconut_1"] == ("cot", 1) and starts["coconut_3"] == ("coconut_2", 3)
    assert starts["no_cot"] == (None, 0) and starts["no_image_cot"] == (None, 0)
    plan = learning_curve.plan_runs(hops=3, epochs=4, stage_epochs=2, final_stage_epochs=5, no_image_epochs=0)
    epochs = {run[0]: run[6] for run in plan}
    assert [epochs[f"coconut_{k}"] for k in (1, 2, 3)] == [2, 2, 5] and epochs["cot"] == 4
    assert epochs["no_image_cot"] == 0  # an explicit 0 is kept, not replaced by the default


def test_experiment_runs_end_to_end_at_toy_size(tmp_path):
    out = tmp_path / "experiment"
    argv = [
        "--out", str(out), "--n-train", "8", "--n-val", "4", "--epochs", "1", "--stage-samples", "4",
        "--task-vocab-size", "320", "--only", "cot", "coconut_1", "no_image_cot",
        "--", "--per_device_train_batch_size", "4", "--logging_steps", "1",
    ]
    summary = learning_curve.main(argv)

    rows = {row["name"]: row for row in summary["runs"]}
    assert set(rows) == {"cot", "coconut_1", "no_image_cot"}
    assert rows["coconut_1"]["num_latents"] == 1 and rows["cot"]["num_latents"] == 0
    assert not rows["no_image_cot"]["image"]
    for row in rows.values():
        assert row["num_samples"] == 4 and 0.0 <= row["mc_accuracy"] <= 1.0
        assert row["mean_generated_tokens"] > 0
    # The initial model carries the task tokenizer; every run starts from it and saves it.
    init_config = MMCoconutConfig.from_pretrained(out / "init")
    assert init_config.internvl_config.tie_word_embeddings  # the recipe's tie reaches the top-level config
    init_tokenizer = AutoTokenizer.from_pretrained(out / "init")
    assert init_config.internvl_config.image_token_id == init_tokenizer.context_image_token_id
    assert len(init_tokenizer) < 400
    assert AutoTokenizer.from_pretrained(out / "runs" / "coconut_1").get_vocab() == init_tokenizer.get_vocab()
    assert json.loads((out / "results.json").read_text())["runs"] == summary["runs"]
    assert "| coconut_1 | coconut stage 1 |" in (out / "results.md").read_text()

    # Finished runs are read back, not redone; a different initial model under the same --out is refused.
    again = learning_curve.main(argv)
    assert again["runs"] == summary["runs"]
    with pytest.raises(ValueError, match="holds a model built as"):
        learning_curve.main([*argv[:10], "--task-vocab-size", "330", *argv[12:]])
    # A finished run is not reused under other settings, nor after the run it continued from was redone.
    with pytest.raises(ValueError, match="other settings"):
        learning_curve.main([*argv, "--learning_rate", "1e-4"])
    with pytest.raises(SystemExit):
        learning_curve.main([*argv[:12], "--only", "coconut1"])
    learning_curve.main([*argv[:12], "--only", "cot", "--force", *argv[argv.index("--"):]])
    with pytest.raises(ValueError, match="has been redone since"):
        learning_curve.main(argv)


def test_prepare_writes_data_and_initial_model_only(tmp_path):
    out = tmp_path / "experiment"
    argv = ["--out", str(out), "--n-train", "4", "--n-val", "2", "--task-vocab-size", "320", "--prepare"]
    assert learning_curve.main(argv) is None
    assert (out / "init" / "init_manifest.json").is_file() and (out / "data_no_image" / "val.jsonl").is_file()
    assert not (out / "runs").exists() and not list(out.glob("init.tmp*"))


def test_step_time_by_vocabulary_times_both_vocabularies(tmp_path):
    from experiments import step_time_by_vocabulary
    from mmcoconut.data.synthetic import write_synthetic_aokvqa

    paths = write_synthetic_aokvqa(tmp_path, n_train=4, n_val=1, task="colour_chain")
    train_file = str(paths["canonical_dir"] / "train.jsonl")
    seconds = step_time_by_vocabulary.main(
        ["--train-file", train_file, "--batch-size", "2", "--steps", "1", "--warmup", "1", "--task-vocab-size", "320"]
    )
    assert set(seconds) == {"internvl", "task"} and all(s > 0 for s in seconds.values())
    with pytest.raises(ValueError, match="are needed"):
        step_time_by_vocabulary.main(["--train-file", train_file, "--batch-size", "4", "--steps", "2"])
