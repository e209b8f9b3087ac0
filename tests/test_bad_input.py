"""Nothing silently wrong: every bad input is a clear error naming what is wrong, or a counted skip naming the record.
README's "Bad input" table lists these cases."""

import io
import json
import logging
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcoconut.cli import analyze as analyze_cli
from mmcoconut.cli import evaluate as evaluate_aokvqa
from mmcoconut.cli.train import main as train_main
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.curriculum import CurriculumDataset
from mmcoconut.evaluation.aokvqa import format_summary
from mmcoconut.processing import check_checkpoint_dir, load_internvl_processor
from mmcoconut.training.recipe import parse_args

DEMO = str(Path("recipes/demo.yaml").resolve())
CHOICES = ["green", "red", "blue", "yellow"]


def record(rid, image=None, steps=("One.", "Two."), answer="B. red", **extra):
    return {"id": rid, "image": image, "question": "Q?", "steps": list(steps), "answer": answer, **extra}


def photo(path, size=(64, 48)):
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def truncated_jpeg(path):
    """A JPEG cut in half: its header reads fine, decoding fails."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return str(path)


def bomb_png(path):
    """A 20000x20000 PNG (one row of data; PIL refuses it from the header, before decoding)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 20001))
                     + chunk(b"IEND", b""))
    return str(path)


# ---- images ----


def test_truncated_jpeg_is_skipped_at_build_when_skipping(latent_processor, tmp_path, caplog):
    records = [record("good", photo(tmp_path / "ok.png")), record("cut", truncated_jpeg(tmp_path / "cut.jpg"))]
    with caplog.at_level(logging.WARNING, logger="mmcoconut.data.curriculum"):
        dataset = CurriculumDataset(records, latent_processor, skip_bad_samples=True)
    assert len(dataset) == 1 and dataset.skipped == {"bad_image": 1} and dataset.skipped_ids == {"bad_image": ["cut"]}
    messages = [r.getMessage() for r in caplog.records]
    assert any("record 'cut'" in m and "cut.jpg" in m and "truncated" in m for m in messages)
    assert any("kept 1 of 2 records, skipped bad_image: 1 ('cut')" in m for m in messages)
    assert dataset[0]["pixel_values"].shape[0] > 0  # the kept one still loads


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_jpeg_is_an_error_naming_record_and_file_without_skipping(latent_processor, tmp_path, num_workers):
    records = [record("good", photo(tmp_path / "ok.png")), record("cut", truncated_jpeg(tmp_path / "cut.jpg"))]
    dataset = CurriculumDataset(records, latent_processor)  # only headers are read at build
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=lambda x: x)
    with pytest.raises(ValueError, match=r"record 'cut': cannot read image .*cut\.jpg: image file is truncated"):
        list(loader)


def test_image_broken_after_build_names_record_in_dataloader_workers(latent_processor, tmp_path):
    path = tmp_path / "late.jpg"
    photo(path)
    dataset = CurriculumDataset([record("late", str(path))], latent_processor, skip_bad_samples=True)
    truncated_jpeg(path)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=lambda x: x)
    with pytest.raises(ValueError, match=r"record 'late': cannot read image .*late\.jpg"):
        list(loader)


@pytest.mark.parametrize("skip", [False, True])
def test_decompression_bomb_names_record_and_file(latent_processor, tmp_path, skip):
    records = [record("good", photo(tmp_path / "ok.png")), record("huge", bomb_png(tmp_path / "huge.png"))]
    if not skip:
        with pytest.raises(ValueError, match=r"record 'huge': cannot read image .*huge\.png: Image size \(400000000"):
            CurriculumDataset(records, latent_processor)
        return
    dataset = CurriculumDataset(records, latent_processor, skip_bad_samples=True)
    assert dataset.skipped_ids == {"bad_image": ["huge"]} and len(dataset) == 1


def test_bad_image_skip_reaches_the_printed_evaluation_table(tiny_checkpoint, synthetic_aokvqa, tmp_path, capsys):
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "val.jsonl")
    records[1]["image"] = truncated_jpeg(tmp_path / "cut.jpg")
    data_file = tmp_path / "val.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval"
    metrics = evaluate_aokvqa.main([
        "--model", str(tiny_checkpoint), "--data-file", str(data_file), "--split", "val", "--mode", "coconut",
        "--max-new-tokens", "2", "--max-tiles", "4", "--output-dir", str(out), "--skip-bad-samples",
    ])
    assert metrics["num_samples"] == 2 and metrics["num_skipped"] == 1
    assert metrics["skipped_ids"] == {"bad_image": [records[1]["id"]]}
    table = capsys.readouterr().out
    assert any(line.startswith("| questions skipped") and "1 (bad_image 1)" in line for line in table.splitlines())
    assert json.loads((out / "metrics_val.json").read_text())["skipped"] == {"bad_image": 1}


def test_summary_table_shows_no_skips_as_zero():
    table = format_summary({"num_samples": 3, "num_skipped": 0})
    assert re.search(r"^\| questions skipped +\| +0 \|$", table, re.MULTILINE), table


# ---- canonical records ----


def _load(tmp_path, *records):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_canonical(path)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"answer": "C. blue"}, r"'answer' 'C. blue' does not name choices\[correct_choice_idx\] = B. 'red'"),
        ({"answer": "purple"}, r"'answer' 'purple' does not name .*matches no single choice"),
        ({"choices": CHOICES[:3]}, "'choices' must hold exactly 4 choices, got 3"),
        ({"choices": CHOICES + ["pink"]}, "'choices' must hold exactly 4 choices, got 5"),
        ({"choices": "green red"}, "'choices' must be a list of strings"),
        ({"correct_choice_idx": 4}, r"'correct_choice_idx' must be an integer in 0..3, got 4"),
        ({"correct_choice_idx": -1}, r"'correct_choice_idx' must be an integer in 0..3, got -1"),
        ({"correct_choice_idx": True}, r"'correct_choice_idx' must be an integer in 0..3, got True"),
        ({"choices": None}, "'correct_choice_idx' is given but 'choices' is not"),
        ({"direct_answers": "red"}, "'direct_answers' must be a list of strings"),
        ({"difficult_direct_answer": "no"}, "'difficult_direct_answer' must be true or false"),
    ],
)
def test_canonical_multiple_choice_is_cross_checked_at_load(tmp_path, fields, match):
    bad = record("q7", **{"choices": CHOICES, "correct_choice_idx": 1, **fields})
    with pytest.raises(ValueError, match=rf"records.jsonl record 'q7': {match}"):
        _load(tmp_path, record("q1", choices=CHOICES, correct_choice_idx=1), bad)


@pytest.mark.parametrize("answer", ["B. red", "B", "red", "b) Red", None])
def test_answers_that_name_the_correct_choice_are_accepted(tmp_path, answer):
    (loaded,) = _load(tmp_path, record("q1", answer=answer, choices=CHOICES, correct_choice_idx=1))
    assert loaded["answer"] == answer


def test_all_records_too_long_is_a_clear_error(latent_processor):
    records = [record("a", steps=["word " * 50]), record("b", steps=["word " * 60])]
    with pytest.raises(ValueError, match=r"all 2 records were skipped \(too_long: 2 \('a', 'b'\)\); the shortest "
                                         r"one needs max_length >= \d+ \(max_length is 20\)"):
        CurriculumDataset(records, latent_processor, mode="cot", max_length=20)
    with pytest.raises(ValueError, match="got no records"):
        CurriculumDataset([], latent_processor)


def test_skip_line_names_the_first_skipped_ids(latent_processor, caplog):
    records = [record("short", steps=["A."])] + [record(f"long{i}", steps=["word " * 60]) for i in range(7)]
    with caplog.at_level(logging.WARNING, logger="mmcoconut.data.curriculum"):
        dataset = CurriculumDataset(records, latent_processor, mode="cot", max_length=40)
    assert dataset.skipped_ids["too_long"] == [f"long{i}" for i in range(7)]
    assert any(
        "kept 1 of 8 records, skipped too_long: 7 ('long0', 'long1', 'long2', 'long3', 'long4', ...)" in r.getMessage()
        for r in caplog.records
    )


# ---- recipes: checked before any model or data is loaded ----


def _recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"base: {DEMO}\noutput_dir: {tmp_path / 'out'}\n{text}\n")
    return str(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("c_thought: 1.5", r"c_thought: 1.5 is float, expected int"),
        ("epochs_per_stage: 1.5", r"epochs_per_stage: 1.5 is float, expected int"),
        ("learning_rate: [1, 2]", r"learning_rate: \[1, 2\] is list, expected float"),
        ("skip_bad_samples: 1", r"skip_bad_samples: 1 is int, expected bool"),
        ("lora_target_modules: [q_proj, 3]", r"lora_target_modules: \['q_proj', 3\] is list, expected a list of str"),
        ("mode: cocnut", r"mode must be one of \('cot', 'coconut', 'no_cot', 'no_thoughts', 'pause'\), got 'cocnut'"),
        ("c_thought: 0", "c_thought must be >= 1, got 0"),
        ("max_latent_stage: -1", "max_latent_stage must be >= 0, got -1"),
        ("epochs_per_stage: 0", "epochs_per_stage must be >= 1, got 0"),
        ("first_stage: 5", r"first_stage must be in 0..max_latent_stage \+ 1 = 4, got 5"),
        ("lr_scheduler_type: polynomial", "lr_scheduler_type must be one of .*got 'polynomial'"),
        ("lr_scheduler_type: nonsense", "nonsense"),
        ("num_train_epochs: -1", r"num_train_epochs must be > 0, got -1"),
        ("num_train_epochs: 0", r"num_train_epochs must be > 0, got 0"),
        ("data_source: canonical\ntrain_file: missing.jsonl", "train_file missing.jsonl does not exist"),
        ("tiny_internvl: '{oops'", "tiny_internvl is not valid JSON"),
    ],
)
def test_bad_recipes_are_refused_before_loading(tmp_path, no_loading, text, match):
    with pytest.raises(ValueError, match=match):
        train_main([_recipe(tmp_path, text)])


def test_every_problem_is_listed_at_once(tmp_path, no_loading):
    with pytest.raises(ValueError) as error:
        train_main([_recipe(tmp_path, "c_thought: 0\nepochs_per_stage: 0\nnum_train_epochs: -1")])
    assert str(error.value).count("\n  - ") == 3


def test_flags_after_the_recipe_are_checked_too(tmp_path, no_loading):
    with pytest.raises(ValueError, match="c_thought must be >= 1, got 0"):
        train_main([_recipe(tmp_path, ""), "--c_thought", "0"])
    with pytest.raises(SystemExit):  # argparse: invalid int value
        train_main([_recipe(tmp_path, ""), "--c_thought", "1.5"])


def test_string_numbers_in_yaml_still_work(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string; argparse converts string defaults, as before.
    training = parse_args([_recipe(tmp_path, "learning_rate: 1e-3")])[-1]
    assert training.learning_rate == 1e-3


@pytest.mark.parametrize("chain", [["a.yaml"], ["a.yaml", "b.yaml"], ["a.yaml", "b.yaml", "c.yaml"]])
def test_base_cycles_are_a_clear_error(tmp_path, chain):
    for name, base in zip(chain, chain[1:] + chain[:1]):
        (tmp_path / name).write_text(f"base: {base}\nc_thought: 1\n")
    loop = " -> ".join(str(tmp_path / name) for name in chain + chain[:1])
    with pytest.raises(ValueError, match=f"recipe base chain loops: {loop}$"):
        parse_args([str(tmp_path / chain[0])])


def test_missing_base_recipe_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"a.yaml: base recipe .*nowhere.yaml not found"):
        parse_args([str(tmp_path / "a.yaml")])


# ---- checkpoint directories ----


@pytest.fixture
def incomplete(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint without the file a test names."""

    def without(name):
        path = tmp_path / f"without-{name}"
        shutil.copytree(tiny_checkpoint, path)
        (path / name).unlink()
        return path

    return without


MISSING = [
    ("config.json", "missing config.json"),
    ("model.safetensors", r"missing model.safetensors \(or model.safetensors.index.json\)"),
    ("tokenizer.json", r"missing tokenizer.json \(or vocab.json \+ merges.txt\)"),
    ("processor_config.json", r"missing processor_config.json \(or preprocessor_config.json\)"),
]


@pytest.mark.parametrize("name, match", MISSING)
def test_incomplete_checkpoint_is_named_before_training_loads_anything(tmp_path, no_loading, incomplete, name, match):
    path = incomplete(name)
    with pytest.raises(FileNotFoundError, match=rf"{path} is not a complete checkpoint: {match}"):
        train_main([_recipe(tmp_path, f"load_model_path: {path}")])


@pytest.mark.parametrize("name, match", MISSING)
def test_incomplete_checkpoint_is_named_by_evaluate_and_analyze(tmp_path, no_loading, incomplete, name, match):
    path = incomplete(name)
    with pytest.raises(FileNotFoundError, match=match):
        evaluate_aokvqa.main(["--model", str(path), "--data-file", "x.jsonl", "--output-dir", str(tmp_path / "e")])
    with pytest.raises(FileNotFoundError, match=match):
        analyze_cli.main(["--model", str(path), "--data-file", "x.jsonl", "--output-dir", str(tmp_path / "a")])


def test_missing_tokenizer_is_named_by_the_processor_loader(incomplete):
    # transformers' own message for this is "You need to have sentencepiece or tiktoken installed".
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer.json \(or vocab.json \+ merges.txt\)"):
        load_internvl_processor(incomplete("tokenizer.json"))


def test_checkpoint_check_details(tiny_checkpoint, tmp_path):
    check_checkpoint_dir(tiny_checkpoint)  # complete
    check_checkpoint_dir("OpenGVLab/InternVL3-1B-Pretrained")  # a Hub id is left to from_pretrained
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory: ./not-there"):
        check_checkpoint_dir("./not-there")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_checkpoint_dir(tmp_path / "file")
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="missing model-00002-of-00002.safetensors$"):
        check_checkpoint_dir(sharded)
    adapters = tmp_path / "lora"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing config.json.*LoRA adapters: load the merged model"):
        check_checkpoint_dir(adapters, parts=("config",))
