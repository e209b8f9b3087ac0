import json
import random

import numpy as np
import pytest
from PIL import Image

from mmcoconut.cli.data import main
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.synthetic import COLOURS, ShapeGridTask, write_synthetic_aokvqa

OFFICIAL_FIELDS = {
    "question_id", "image_id", "question", "choices", "correct_choice_idx",
    "direct_answers", "difficult_direct_answer", "rationales",
}


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    write_synthetic_aokvqa(tmp_path / "a", 4, 2, seed=3)
    write_synthetic_aokvqa(tmp_path / "b", 4, 2, seed=3)
    write_synthetic_aokvqa(tmp_path / "c", 4, 2, seed=4)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_official_layout_and_fields(synthetic_aokvqa):
    for split, count in (("train", 6), ("val", 3)):
        questions = json.loads((synthetic_aokvqa["aokvqa_dir"] / f"aokvqa_v1p0_{split}.json").read_text())
        assert len(questions) == count
        for q in questions:
            assert OFFICIAL_FIELDS <= set(q)
            assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
            assert q["correct_choice_idx"] in range(4)
            assert len(q["direct_answers"]) == 10 and len(q["rationales"]) == 3
            image = synthetic_aokvqa["coco_dir"] / f"{split}2017" / f"{q['image_id']:012d}.jpg"
            with Image.open(image) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 128
    ids = [q["question_id"] for s in ("train", "val")
           for q in json.loads((synthetic_aokvqa["aokvqa_dir"] / f"aokvqa_v1p0_{s}.json").read_text())]
    assert len(ids) == len(set(ids))


def _cell_colour(image, row, col, cell):
    centre = np.asarray(image)[row * cell + cell // 2, col * cell + cell // 2].astype(int)
    return min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - centre).sum())


def test_answers_are_read_from_the_image_in_several_steps(synthetic_aokvqa):
    """The answer is the colour drawn in the cell the steps point to: the question alone cannot give it."""
    cell = ShapeGridTask().cell
    records = load_canonical(synthetic_aokvqa["canonical_dir"] / "train.jsonl")
    for record in records:
        assert len(record["steps"]) >= 2
        target = record["steps"][1]  # "The shape ... it, in row R, column C, is a SHAPE."
        row, col = (int(target.split(f"{word} ")[1].split(",")[0]) - 1 for word in ("row", "column"))
        with Image.open(record["image"]) as image:
            colour = _cell_colour(image.convert("RGB"), row, col, cell)
        assert record["answer"] == f"{'ABCD'[record['choices'].index(colour)]}. {colour}"
        assert record["steps"][-1].endswith(f" is {colour}.")


def test_same_question_text_has_different_answers():
    task, rng = ShapeGridTask(), random.Random(0)
    answers = {}
    for _ in range(200):
        example = task.sample(rng)
        answers.setdefault(example.question, set()).add(example.choices[example.correct_choice_idx])
    assert max(len(a) for a in answers.values()) >= 3


def test_command_line(tmp_path):
    main(["--out", str(tmp_path), "--n-train", "2", "--n-val", "1", "--seed", "5", "--hf"])
    assert len(load_canonical(tmp_path / "canonical" / "train.jsonl")) == 2
    assert len(load_canonical(tmp_path / "canonical" / "val.jsonl")) == 1
    assert (tmp_path / "hf" / "dataset_dict.json").is_file()


def test_unknown_task_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        write_synthetic_aokvqa(tmp_path, 1, 1, task="nope")
