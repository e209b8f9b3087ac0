import json
import logging

import numpy as np
import pytest
from PIL import Image

from mmcoconut.data.aokvqa import (
    aokvqa_to_canonical,
    load_canonical,
    load_hf_aokvqa,
    load_official_aokvqa,
    split_sentences,
)
from mmcoconut.data.synthetic import STEPS_FROM, official_to_hf

EXAMPLE = {
    "question_id": "q1",
    "image_id": 7,
    "question": "What is the man by the bags awaiting? ",
    "choices": ["skateboarder", "train", "delivery", "cab"],
    "correct_choice_idx": 3,
    "direct_answers": ["cab"] * 8 + ["taxi"] * 2,
    "difficult_direct_answer": False,
    "rationales": [
        "He stands at the curb with bags. A cab stops at curbs.",
        "He is waiting for a ride.",
        "Taxis carry luggage",
    ],
}


def _pixels(image):
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    with Image.open(image) as opened:
        return np.asarray(opened.convert("RGB"))


def _comparable(record):
    return {k: v for k, v in record.items() if k != "image"}


def test_three_sources_give_the_same_records(synthetic_aokvqa):
    for split, hf_split in (("train", "train"), ("val", "validation")):
        canonical = load_canonical(synthetic_aokvqa["canonical_dir"] / f"{split}.jsonl")
        official = load_official_aokvqa(
            synthetic_aokvqa["aokvqa_dir"], synthetic_aokvqa["coco_dir"], split, steps_from=STEPS_FROM
        )
        hub = load_hf_aokvqa(hf_split, synthetic_aokvqa["hf_dir"], steps_from=STEPS_FROM)
        assert len(canonical) == len(official) == len(hub) > 0
        for a, b, c in zip(canonical, official, hub):
            assert _comparable(a) == _comparable(b) == _comparable(c)
            assert np.array_equal(_pixels(a["image"]), _pixels(b["image"]))
            assert np.array_equal(_pixels(a["image"]), _pixels(c["image"]))


def test_formatting_renders_choices_steps_and_answer():
    record, reason = aokvqa_to_canonical(EXAMPLE, "img.jpg", steps_from="rationales")
    assert reason is None
    assert record["question"] == (
        "What is the man by the bags awaiting?\nA. skateboarder\nB. train\nC. delivery\nD. cab"
    )
    assert record["answer"] == "D. cab"
    assert record["steps"] == EXAMPLE["rationales"]
    assert record["id"] == "q1" and record["image"] == "img.jpg"
    assert record["direct_answers"] == EXAMPLE["direct_answers"]
    first, _ = aokvqa_to_canonical(EXAMPLE, None, steps_from="first_rationale_sentences")
    assert first["steps"] == ["He stands at the curb with bags.", "A cab stops at curbs."]


def test_split_sentences():
    assert split_sentences(" One. Two!  Three? four") == ["One.", "Two!", "Three?", "four"]
    assert split_sentences("No final stop") == ["No final stop"]


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"choices": ["a", "b", "c"]}, "choices"),
        ({"choices": ["a", "b", "c", "d", "e"]}, "choices"),
        ({"correct_choice_idx": 4}, "correct_choice_idx"),
        ({"correct_choice_idx": -1}, "correct_choice_idx"),
        ({"rationales": []}, "no_rationales"),
        ({"rationales": ["  "]}, "no_rationales"),
    ],
)
def test_bad_examples_are_skip_reasons(change, reason):
    assert aokvqa_to_canonical({**EXAMPLE, **change}, None) == (None, reason)


def test_unlabeled_test_example_has_no_answer():
    unlabeled = {k: v for k, v in EXAMPLE.items() if k not in ("correct_choice_idx", "direct_answers", "rationales")}
    record, reason = aokvqa_to_canonical(unlabeled, None, require_rationales=False)
    assert reason is None and record["answer"] is None and record["steps"] == []


def test_unknown_steps_option_is_an_error():
    with pytest.raises(ValueError, match="steps_from"):
        aokvqa_to_canonical(EXAMPLE, None, steps_from="all")


def _write_official(tmp_path, split, examples):
    (tmp_path / "aokvqa").mkdir(exist_ok=True)
    (tmp_path / "aokvqa" / f"aokvqa_v1p0_{split}.json").write_text(json.dumps(examples))
    images = tmp_path / "coco" / f"{split}2017"
    images.mkdir(parents=True, exist_ok=True)
    for example in examples:
        Image.new("RGB", (8, 6), (10, 20, 30)).save(images / f"{example['image_id']:012d}.jpg")
    return tmp_path / "aokvqa", tmp_path / "coco"


def _bad_examples():
    good = [{**EXAMPLE, "question_id": f"g{i}", "image_id": i} for i in range(3)]
    bad = [
        {**EXAMPLE, "question_id": "no_rat", "image_id": 10, "rationales": []},
        {**EXAMPLE, "question_id": "three", "image_id": 11, "choices": ["a", "b", "c"]},
        {**EXAMPLE, "question_id": "idx", "image_id": 12, "correct_choice_idx": 9},
    ]
    return good + bad


def test_official_skips_are_counted_and_logged_once(tmp_path, caplog):
    aokvqa_dir, coco_dir = _write_official(tmp_path, "train", _bad_examples())
    with caplog.at_level(logging.INFO, logger="mmcoconut.data.aokvqa"):
        records = load_official_aokvqa(aokvqa_dir, coco_dir, "train")
    assert [r["id"] for r in records] == ["g0", "g1", "g2"]
    assert records[0]["image"] == str(coco_dir / "train2017" / "000000000000.jpg")
    messages = [r.getMessage() for r in caplog.records if r.name == "mmcoconut.data.aokvqa"]
    assert len(messages) == 1
    assert "kept 3 records, skipped 3" in messages[0]
    assert "choices: 1" in messages[0] and "correct_choice_idx: 1" in messages[0] and "no_rationales: 1" in messages[0]


def test_rationales_are_only_required_for_training(tmp_path):
    aokvqa_dir, coco_dir = _write_official(tmp_path, "val", _bad_examples())
    assert len(load_official_aokvqa(aokvqa_dir, coco_dir, "val")) == 4
    assert len(load_official_aokvqa(aokvqa_dir, coco_dir, "val", require_rationales=True)) == 3


def test_official_missing_file_and_unknown_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="aokvqa_v1p0_train.json"):
        load_official_aokvqa(tmp_path, tmp_path, "train")
    with pytest.raises(ValueError, match="unknown A-OKVQA split"):
        load_official_aokvqa(tmp_path, tmp_path, "dev")


def test_hub_copy_skips_and_parses_direct_answers(tmp_path):
    aokvqa_dir, coco_dir = _write_official(tmp_path, "train", _bad_examples())
    official_to_hf(aokvqa_dir, coco_dir, splits=("train",)).save_to_disk(tmp_path / "hf")
    hub = load_hf_aokvqa("train", tmp_path / "hf")
    assert hub["id"] == ["g0", "g1", "g2"]
    assert hub[0]["direct_answers"] == EXAMPLE["direct_answers"]
    assert hub[2]["image"].size == (8, 6)
    with pytest.raises(ValueError, match="has splits"):
        load_hf_aokvqa("validation", tmp_path / "hf")


def test_hub_copy_with_malformed_direct_answers(tmp_path):
    aokvqa_dir, coco_dir = _write_official(tmp_path, "train", [{**EXAMPLE, "image_id": 1}])
    hub = official_to_hf(aokvqa_dir, coco_dir, splits=("train",))["train"]
    hub.map(lambda _: {"direct_answers": "cab, taxi"}).save_to_disk(tmp_path / "hf")
    with pytest.raises(ValueError, match="q1: direct_answers"):
        load_hf_aokvqa("train", tmp_path / "hf")


def test_canonical_json_and_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    records = [
        {"id": "a", "image": "img/a.png", "question": "Q?", "steps": ["s1", "s2"], "answer": "x"},
        {"question": "Text only?", "steps": [], "answer": "y"},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    for name in ("data.json", "data.jsonl"):
        loaded = load_canonical(tmp_path / name)
        assert loaded[0]["image"] == str(tmp_path / "img" / "a.png")
        assert loaded[1]["image"] is None and loaded[1]["id"] == "1"
        assert loaded[0]["steps"] == ["s1", "s2"] and loaded[1]["choices"] is None


@pytest.mark.parametrize(
    "record, match",
    [
        ({"id": "r", "steps": [], "answer": "x"}, "'r'.*'question' must be a string"),
        ({"id": "r", "question": "q", "steps": "one", "answer": "x"}, "'steps' must be a list"),
        ({"id": "r", "question": "q", "steps": [], "answer": 3}, "'answer' must be a string"),
        ({"id": "r", "question": "q", "steps": [], "answer": "x", "image": 5}, "'image' must be a path"),
        ({"id": "r", "question": "q", "steps": [], "answer": "x", "rationale": "?"}, "unknown fields"),
    ],
)
def test_canonical_errors_name_file_and_record(tmp_path, record, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=match) as error:
        load_canonical(path)
    assert "bad.jsonl" in str(error.value)


def test_canonical_bad_json_and_duplicate_ids(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "q", "steps": [], "answer": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_canonical(path)
    path = tmp_path / "dup.json"
    path.write_text(json.dumps([{"id": "d", "question": "q", "steps": [], "answer": "a"}] * 2))
    with pytest.raises(ValueError, match="duplicate record id 'd'"):
        load_canonical(path)
