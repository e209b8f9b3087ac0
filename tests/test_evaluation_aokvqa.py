"""A-OKVQA evaluation: the CLI end to end on a tiny checkpoint in every mode, batch invariance of greedy answers,
and exact correct / wrong / unparseable accounting with a stub model."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import PartialState
from transformers import GenerationConfig, TrainingArguments

from mmcoconut.cli import evaluate as evaluate_aokvqa
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.evaluation import aokvqa as aokvqa_evaluation
from mmcoconut.evaluation.aokvqa import (
    UNPARSEABLE_PREDICTION,
    _shard,
    build_eval_dataset,
    evaluate_model,
    generate_answers,
    official_predictions,
)
from mmcoconut.processing import load_internvl_processor
from modeling_mmcoconut import MMCoconutForConditionalGeneration
from trainer_curriculum import CurriculumSchedule, CurriculumTrainer

C_THOUGHT, LATENT_STAGE = 2, 1


def _read_outputs(out, split):
    predictions = json.loads((out / f"predictions_{split}.json").read_text())
    samples = [json.loads(line) for line in (out / f"samples_{split}.jsonl").read_text().splitlines()]
    metrics = json.loads((out / f"metrics_{split}.json").read_text())
    return predictions, samples, metrics


@pytest.mark.parametrize(
    "mode, source",
    [("vanilla", "hf"), ("cot", "official"), ("coconut", "canonical")],
)
def test_cli_end_to_end(tiny_checkpoint, synthetic_aokvqa, tmp_path, mode, source):
    data = {
        "hf": ["--hf-dataset", str(synthetic_aokvqa["hf_dir"])],
        "official": [
            "--aokvqa-dir", str(synthetic_aokvqa["aokvqa_dir"]), "--coco-dir", str(synthetic_aokvqa["coco_dir"])
        ],
        "canonical": ["--data-file", str(synthetic_aokvqa["canonical_dir"] / "val.jsonl")],
    }[source]
    out = tmp_path / "eval"
    args = ["--model", str(tiny_checkpoint), "--split", "val", "--mode", mode, "--batch-size", "2",
            "--max-new-tokens", "5", "--max-tiles", "4", "--output-dir", str(out), *data]
    returned = evaluate_aokvqa.main(args)

    predictions, samples, metrics = _read_outputs(out, "val")
    val_ids = [record["id"] for record in load_canonical(synthetic_aokvqa["canonical_dir"] / "val.jsonl")]
    assert [s["question_id"] for s in samples] == val_ids  # dataset order, each question once
    assert list(predictions) == val_ids
    assert metrics == json.loads(json.dumps(returned))
    assert metrics["mode"] == mode and metrics["num_samples"] == len(samples) == 3
    assert metrics["num_da_samples"] == 3  # no synthetic question is marked difficult
    assert metrics["num_unparseable"] == sum(s["parsed_letter"] is None for s in samples)
    assert metrics["mc_accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
    assert metrics["mean_generated_tokens"] == pytest.approx(sum(s["num_generated_tokens"] for s in samples) / 3)
    assert metrics["num_without_eos"] == sum(not s["stopped_at_eos"] for s in samples)
    assert metrics["samples_per_second"] > 0
    for sample in samples:
        assert 1 <= sample["num_generated_tokens"] <= 5
        expected = {k: UNPARSEABLE_PREDICTION if v is None else v for k, v in sample["prediction"].items()}
        assert predictions[sample["question_id"]] == expected
        if sample["parsed_letter"] is None:
            assert sample["correct"] is False and sample["parse_error"]
        assert "<IMG_CONTEXT>×" in sample["prompt"] and sample["prompt"].endswith(
            "<|end-latent|>" if mode == "coconut" else "<|im_start|>assistant\n"
        )
    # coconut defaults to the checkpoint's latent_stage × c_thought latents; the other modes have none.
    assert {s["num_latents"] for s in samples} == {LATENT_STAGE * C_THOUGHT if mode == "coconut" else 0}
    assert [s["thoughts"] for s in samples] == [s["num_latents"] for s in samples]
    assert metrics["mean_thoughts"] == (LATENT_STAGE * C_THOUGHT if mode == "coconut" else 0)
    assert metrics["thinking"] == ("fixed" if mode == "coconut" else None)


def test_adaptive_thinking_logs_the_thoughts_each_question_used(tiny_checkpoint, synthetic_aokvqa, tmp_path, capsys):
    # The threshold on P(<|end-latent|>) decides: 1.0 is never reached (every question thinks the 3 thoughts
    # allowed), a tiny one at once (0 thoughts). Rows stopping at different steps are tested on generate itself
    # (tests/test_generate_adaptive.py); here the CLI's per-sample counts, their mean and the answer after
    # <|end-latent|>.
    model = MMCoconutForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    data_file = synthetic_aokvqa["canonical_dir"] / "val.jsonl"
    args = ["--model", str(tiny_checkpoint), "--data-file", str(data_file), "--split", "val", "--batch-size", "3",
            "--max-new-tokens", "4", "--thinking", "adaptive", "--max-thoughts", "3", "--output-dir"]
    metrics = evaluate_aokvqa.main([*args, str(tmp_path / "never"), "--end-latent-threshold", "1.0"])
    _, samples, saved = _read_outputs(tmp_path / "never", "val")
    assert metrics["thinking"] == "adaptive" and metrics["max_thoughts"] == 3 and saved == json.loads(json.dumps(metrics))
    assert [s["thoughts"] for s in samples] == [3, 3, 3] and metrics["mean_thoughts"] == 3  # P < 1: never stops early
    assert all(s["prompt"].endswith("<|start-latent|>") and s["num_latents"] == 0 for s in samples)
    assert "mean thoughts" in capsys.readouterr().out

    # Direct generate on the same prompts: the per-question counts the CLI logged are the model's own.
    processor = load_internvl_processor(tiny_checkpoint)
    dataset = build_eval_dataset(load_canonical(data_file), processor, "coconut", model.config, thinking="adaptive")
    threshold = 1e-12
    results = generate_answers(model, dataset, thinking="adaptive", max_thoughts=3, end_latent_threshold=threshold,
                               max_new_tokens=4, batch_size=3, show_progress=False)
    cli = evaluate_aokvqa.main([*args, str(tmp_path / "some"), "--end-latent-threshold", str(threshold)])
    _, samples, _ = _read_outputs(tmp_path / "some", "val")
    assert [r["thoughts"] for r in results] == [0, 0, 0]
    assert [s["thoughts"] for s in samples] == [r["thoughts"] for r in results]
    assert cli["mean_thoughts"] == pytest.approx(sum(r["thoughts"] for r in results) / 3)
    assert all(r["num_generated_tokens"] <= 4 for r in results)  # thoughts and <|end-latent|> are not counted


@pytest.fixture(scope="module")
def sampling_checkpoint(tiny_checkpoint, tmp_path_factory):
    """`tiny_checkpoint` whose saved generation_config samples at temperature 50 (over 151k tokens: far from the
    greedy answers) and allows 3 new tokens."""
    path = tmp_path_factory.mktemp("sampling_checkpoint") / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    generation_config = GenerationConfig.from_pretrained(path)
    generation_config.update(do_sample=True, temperature=50.0, top_k=0, max_new_tokens=3)
    generation_config.save_pretrained(path)
    return path


DECODING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens")


def test_cli_decodes_as_the_checkpoint_says_unless_a_flag_overrides(sampling_checkpoint, synthetic_aokvqa, tmp_path,
                                                                    capsys):
    data_file = synthetic_aokvqa["canonical_dir"] / "val.jsonl"

    def run(name, *flags):
        out = tmp_path / name
        metrics = evaluate_aokvqa.main(["--model", str(sampling_checkpoint), "--data-file", str(data_file),
                                        "--split", "val", "--mode", "vanilla", "--output-dir", str(out), *flags])
        table = capsys.readouterr().out
        return {key: metrics.get(key) for key in DECODING_KEYS}, _read_outputs(out, "val")[1], table

    saved, sampled, table = run("saved")
    assert saved == {"do_sample": True, "temperature": 50.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 3}
    assert "| decoding" in table and "sampled (temperature 50.0, top_p 1.0, top_k 0)" in table
    greedy_settings, greedy, table = run("greedy", "--no-do-sample")
    assert greedy_settings == {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                               "max_new_tokens": 3}
    assert any(line.startswith("| decoding") and line.endswith(" greedy |") for line in table.splitlines())
    # The saved settings were used, not only recorded: the checkpoint's budget, and sampled answers.
    assert [s["num_generated_tokens"] for s in greedy] == [3, 3, 3]
    assert all(s["num_generated_tokens"] <= 3 for s in sampled)
    assert [s["generated_text"] for s in sampled] != [s["generated_text"] for s in greedy]

    given, _, _ = run("given", "--do-sample", "--temperature", "0.5", "--top-p", "0.9", "--max-new-tokens", "5")
    assert given == {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "top_k": 0, "max_new_tokens": 5}


def test_generate_answers_keeps_the_checkpoints_decoding_and_validation_stays_greedy(
    sampling_checkpoint, synthetic_aokvqa, tmp_path, monkeypatch
):
    model = MMCoconutForConditionalGeneration.from_pretrained(sampling_checkpoint).eval()
    processor = load_internvl_processor(sampling_checkpoint, max_tiles=4)
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "val.jsonl")
    dataset = build_eval_dataset(records, processor, "vanilla", model.config, max_tiles=4)

    def answers(**kwargs):
        torch.manual_seed(0)
        samples = generate_answers(model, dataset, max_new_tokens=3, show_progress=False, **kwargs)
        return [s["generated_text"] for s in samples]

    greedy = answers(do_sample=False)
    assert answers() != greedy  # the checkpoint samples

    # Validation during training decodes greedily whatever the weights' generation_config says.
    evaluated = []
    original = aokvqa_evaluation.evaluate_model

    def recording(*args, **kwargs):
        evaluated.append(original(*args, **kwargs))
        return evaluated[-1]

    monkeypatch.setattr(aokvqa_evaluation, "evaluate_model", recording)
    trainer = CurriculumTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        eval_dataset=dataset, schedule=CurriculumSchedule(), generation_eval_kwargs={"max_new_tokens": 3},
    )
    trainer._add_eval_metrics(SimpleNamespace(metrics={}), "eval")
    assert [s["generated_text"] for s in evaluated[0].samples] == greedy


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    model = MMCoconutForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return model, load_internvl_processor(tiny_checkpoint, max_tiles=4)


def test_batch_size_does_not_change_greedy_answers(loaded, synthetic_aokvqa):
    model, processor = loaded
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "train.jsonl")[:4]
    dataset = build_eval_dataset(records, processor, "coconut", model.config, max_tiles=4)
    runs = [
        generate_answers(model, dataset, num_latents=3, batch_size=size, max_new_tokens=5, show_progress=False)
        for size in (1, 4)
    ]
    assert len(runs[0]) == len(records) == 4
    for one, batched in zip(*runs):
        assert one["question_id"] == batched["question_id"]
        assert one["generated_text"] == batched["generated_text"]
        assert one["num_generated_tokens"] == batched["num_generated_tokens"]
        assert one["num_latents"] == batched["num_latents"] == 3


class StubModel(torch.nn.Module):
    """`generate` answers each prompt with fixed token ids, padding finished rows with `pad_token_id`."""

    def __init__(self, replies, latent_token_id, eos_token_id, pad_token_id):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.replies = replies  # prompt ids (tuple) → reply ids
        self.config = SimpleNamespace(latent_token_id=latent_token_id)
        self.generation_config = SimpleNamespace(eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def generate(self, input_ids, attention_mask, max_new_tokens, return_dict_in_generate=False, **kwargs):
        rows = [
            self.replies[tuple(ids[mask.bool()].tolist())][:max_new_tokens]
            for ids, mask in zip(input_ids, attention_mask)
        ]
        width = max(len(row) for row in rows)
        new = torch.tensor([row + [self.generation_config.pad_token_id] * (width - len(row)) for row in rows])
        sequences = torch.cat([input_ids, new], dim=1)
        if not return_dict_in_generate:
            return sequences
        # As the model's output: the thoughts each answer followed, here the latents in its prompt.
        num_thoughts = ((input_ids == self.config.latent_token_id) & attention_mask.bool()).sum(-1)
        return SimpleNamespace(sequences=sequences, num_thoughts=num_thoughts)


def _stub(dataset, texts):
    tokenizer = dataset.tokenizer
    replies = {
        tuple(dataset.prompt_features(i)["input_ids"].tolist()): tokenizer(text, add_special_tokens=False)["input_ids"]
        for i, text in enumerate(texts)
    }
    return StubModel(replies, dataset.latent_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_scoring_counts_correct_wrong_and_unparseable(loaded, synthetic_aokvqa):
    _, processor = loaded
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "val.jsonl")
    config = SimpleNamespace(c_thought=1, latent_stage=0)
    dataset = build_eval_dataset(records, processor, "cot", config, max_tiles=4)
    right, wrong = records[0], records[1]
    wrong_idx = (wrong["correct_choice_idx"] + 1) % 4
    texts = [
        f"Some step.\nAnswer: {'ABCD'[right['correct_choice_idx']]}. "
        f"{right['choices'][right['correct_choice_idx']]}<|im_end|>",
        f"Answer: {'ABCD'[wrong_idx]}<|im_end|>",
        # No `Answer:` and no EOS (the longest row, as in a real batch): unparseable, never a default choice.
        "I cannot tell from the picture, it is far too dark to see any of it",
    ]
    result = evaluate_model(_stub(dataset, texts), dataset, batch_size=3, max_new_tokens=64, show_progress=False)
    samples, metrics = result.samples, result.metrics

    assert [s["correct"] for s in samples] == [True, False, False]
    assert [s["parsed_letter"] for s in samples] == ["ABCD"[right["correct_choice_idx"]], "ABCD"[wrong_idx], None]
    assert metrics["mc_accuracy"] == pytest.approx(1 / 3)
    assert metrics["da_accuracy"] == pytest.approx(1 / 3)  # synthetic direct answers are the correct choice ×10
    assert metrics["num_unparseable"] == 1 and metrics["num_without_eos"] == 1
    tokenizer = dataset.tokenizer
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    # EOS counts as generated; the pad columns of a batch after it do not.
    assert [s["num_generated_tokens"] for s in samples] == lengths
    assert metrics["mean_generated_tokens"] == pytest.approx(sum(lengths) / 3)
    assert samples[0]["generated_text"] == texts[0].removesuffix("<|im_end|>")

    predictions = official_predictions(samples)
    assert predictions[wrong["id"]] == {"multiple_choice": wrong["choices"][wrong_idx],
                                        "direct_answer": wrong["choices"][wrong_idx]}
    assert predictions[records[2]["id"]] == {"multiple_choice": "", "direct_answer": ""}


def test_unlabeled_split_is_predicted_not_scored(loaded, synthetic_aokvqa):
    _, processor = loaded
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "val.jsonl")
    for record in records:
        record.update(answer=None, correct_choice_idx=None, direct_answers=None)
    config = SimpleNamespace(c_thought=1, latent_stage=0)
    dataset = build_eval_dataset(records, processor, "vanilla", config, max_tiles=4)
    texts = [f"Answer: {record['choices'][0]}<|im_end|>" for record in records]
    result = evaluate_model(_stub(dataset, texts), dataset, batch_size=2, show_progress=False)
    assert result.metrics["mc_accuracy"] is None and result.metrics["da_accuracy"] is None
    assert result.metrics["num_unparseable"] == 0
    assert [s["correct"] for s in result.samples] == [None] * 3
    assert [s["prediction"]["multiple_choice"] for s in result.samples] == [r["choices"][0] for r in records]


class _Rank:
    """Process `rank` of `world_size` as accelerate splits for it: `PartialState.split_between_processes` itself,
    run on this process's index and count instead of the launched state's."""

    split_between_processes = PartialState.split_between_processes

    def __init__(self, rank, world_size):
        self.process_index, self.num_processes = rank, world_size
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")


@pytest.mark.parametrize("num_samples, world_size", [(3, 2), (7, 3), (1, 3), (4, 4)])
def test_shards_are_equal_length_and_cover_every_sample_once(num_samples, world_size):
    shards = [_shard(num_samples, _Rank(rank, world_size)) for rank in range(world_size)]
    assert len({len(positions) for positions, _ in shards}) == 1  # same number of generate calls per rank
    real = [p for positions, num_real in shards for p in positions[:num_real]]
    assert real == list(range(num_samples))
    assert math.ceil(num_samples / world_size) == len(shards[0][0])


@pytest.mark.parametrize(
    "num_samples, world_size",
    [(1, 1), (5, 1), (5, 2), (6, 2), (7, 3), (10, 4), (5, 4), (3, 4), (1, 2), (1, 8), (2, 5), (8, 8), (9, 8)],
)
def test_the_ranks_positions_with_padding_marked_are_each_question_exactly_once(num_samples, world_size):
    marked = []  # (position, rank, is_padding) over every rank, in gather order
    for rank in range(world_size):
        positions, num_real = _shard(num_samples, _Rank(rank, world_size))
        assert len(positions) == math.ceil(num_samples / world_size)  # lock-step: as many generate calls
        assert 0 <= num_real <= len(positions)
        marked += [(position, rank, index >= num_real) for index, position in enumerate(positions)]
    real = [position for position, _, padding in marked if not padding]
    assert real == list(range(num_samples))  # each question once, in dataset order, rank after rank
    padding = [position for position, _, is_padding in marked if is_padding]
    assert len(padding) == world_size * math.ceil(num_samples / world_size) - num_samples
    assert set(padding) <= {num_samples - 1}  # a repeat of a real question, never out of range
    # Contiguous slices, lower ranks first: the ranks' real positions are in rank order.
    ranks = [rank for _, rank, is_padding in marked if not is_padding]
    assert ranks == sorted(ranks)
    # One process (no accelerator) takes everything, unpadded.
    if world_size == 1:
        assert _shard(num_samples, None) == (list(range(num_samples)), num_samples)


def test_an_empty_dataset_is_refused_before_sharding():
    # No split of 0 questions is needed: there is nothing to generate, and generate_answers says so first.
    with pytest.raises(ValueError, match="empty"):
        generate_answers(object(), [], show_progress=False)


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rank_generates_as_often_and_the_padding_is_dropped(loaded, synthetic_aokvqa, monkeypatch, world_size):
    """3 questions, one per generate call, over 2 ranks (2 + 1, rank 1 repeats question 2) and 4 ranks (rank 3 has
    none of its own): each rank in turn, in this process; the gather hands back what each rank kept."""
    import accelerate.utils

    _, processor = loaded
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "val.jsonl")
    dataset = build_eval_dataset(records, processor, "cot", SimpleNamespace(c_thought=1, latent_stage=0), max_tiles=4)
    stub = _stub(dataset, [f"Answer: {'ABCD'[i]}<|im_end|>" for i in range(3)])
    alone = generate_answers(stub, dataset, batch_size=1, show_progress=False)

    calls, kept = [], []
    generate = stub.generate

    def counting(*args, **kwargs):
        calls[-1] += 1
        return generate(*args, **kwargs)

    def gathered(local):
        kept.append(local)
        return list(enumerate(alone))  # what the other ranks would add

    stub.generate = counting
    monkeypatch.setattr(accelerate.utils, "gather_object", gathered)
    for rank in range(world_size):
        calls.append(0)
        generate_answers(stub, dataset, batch_size=1, accelerator=_Rank(rank, world_size), show_progress=False)
    assert calls == [math.ceil(3 / world_size)] * world_size  # lock-step
    union = [item for local in kept for item in local]
    assert [position for position, _ in union] == [0, 1, 2]  # each question once, the padded repeats dropped
    assert [record for _, record in union] == alone


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mode", "cot", "--num-latents", "2", "--data-file", "x.jsonl"], "coconut only"),
        (["--data-file", "x.jsonl", "--hf-dataset", "y"], "exactly one data source"),
        (["--aokvqa-dir", "a"], "go together"),
        (["--thinking", "adaptive", "--num-latents", "2", "--data-file", "x.jsonl"], "cannot be combined"),
        (["--mode", "cot", "--thinking", "adaptive", "--data-file", "x.jsonl"], "coconut only"),
        (["--thinking", "fixed", "--max-thoughts", "2", "--data-file", "x.jsonl"], "apply to --thinking adaptive"),
    ],
)
def test_cli_rejects_conflicting_options(extra, message, capsys):
    with pytest.raises(SystemExit):
        evaluate_aokvqa.main(["--model", "m", "--output-dir", "o", *extra])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_two_processes_matches_one(tiny_checkpoint, synthetic_aokvqa, tmp_path):
    """5 questions over 2 CPU processes (3 + 2, the short rank repeats one): gathered in order, same answers,
    samples and metrics."""
    repo = Path(__file__).resolve().parents[1]
    common = ["--model", str(tiny_checkpoint), "--data-file", str(synthetic_aokvqa["canonical_dir"] / "train.jsonl"),
              "--split", "train", "--mode", "coconut", "--batch-size", "2", "--limit", "5", "--max-new-tokens", "5",
              "--max-tiles", "4"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(repo)}
    subprocess.run([*launcher, str(repo / "evaluate_aokvqa.py"), *common, "--output-dir", str(tmp_path / "two")],
                   check=True, env=env, cwd=repo, timeout=300)
    evaluate_aokvqa.main([*common, "--output-dir", str(tmp_path / "one")])
    two, one = _read_outputs(tmp_path / "two", "train"), _read_outputs(tmp_path / "one", "train")
    assert two[0] == one[0]  # predictions file
    assert [s["generated_text"] for s in two[1]] == [s["generated_text"] for s in one[1]]
    assert two[2]["num_processes"] == 2 and two[2]["num_samples"] == 5
    # Each question once, in dataset order: the whole per-sample log and every metric but the timing agree.
    assert two[1] == one[1]
    timing = {"num_processes", "seconds", "samples_per_second"}
    assert {k: v for k, v in two[2].items() if k not in timing} == {k: v for k, v in one[2].items() if k not in timing}
