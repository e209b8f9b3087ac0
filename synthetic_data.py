"""A small, deterministic, A-OKVQA-shaped visual reasoning set for tests and the demo.

    python synthetic_data.py --out data/synthetic --n-train 64 --n-val 16 --seed 0

writes

    {out}/aokvqa/aokvqa_v1p0_{train,val}.json     official A-OKVQA fields (load_official_aokvqa)
    {out}/coco/{train,val}2017/{image_id:012}.jpg COCO layout
    {out}/canonical/{train,val}.jsonl             canonical records (load_canonical), image paths relative
    {out}/hf/                                     with --hf: the Hub copy's layout (load_hf_aokvqa), save_to_disk

Every question needs the image and several steps. The default task, `shape_grid`, draws a grid of coloured
shapes and asks e.g. "What colour is the shape to the right of the circle?", with the steps "The circle is in
row 2, column 1.", "The shape to the right of it, in row 2, column 2, is a square.", "The square is red.".
The rationales are three phrasings of that chain; the canonical steps are the first rationale's sentences, so the
A-OKVQA loaders reproduce the canonical records with `steps_from="first_rationale_sentences"`.

A new task is a class with `name` and `sample(rng) -> SyntheticExample`, registered in `TASKS`.
"""

import argparse
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image, ImageDraw

from data_aokvqa import aokvqa_to_canonical

logger = logging.getLogger(__name__)

STEPS_FROM = "first_rationale_sentences"


@dataclass
class SyntheticExample:
    image: Image.Image
    question: str
    choices: list  # 4 strings
    correct_choice_idx: int
    steps: list  # the reasoning chain, one sentence each
    rationales: list  # 3 phrasings of the chain; rationales[0] == " ".join(steps)
    direct_answers: list  # 10 strings


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# relation → (row offset, column offset) of the asked-about shape from the anchor, and its phrase
RELATIONS = {
    "right": ((0, 1), "to the right of"),
    "left": ((0, -1), "to the left of"),
    "above": ((-1, 0), "above"),
    "below": ((1, 0), "below"),
}


def _draw_shape(draw, shape, colour, box):
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


class ShapeGridTask:
    """A `rows × cols` grid of coloured shapes; the anchor shape occurs once, the question asks for the colour of
    its neighbour in one direction (three steps: locate the anchor, find the neighbour, read its colour)."""

    name = "shape_grid"

    def __init__(self, rows=3, cols=3, cell=32):
        self.rows, self.cols, self.cell = rows, cols, cell

    def render(self, grid):
        image = Image.new("RGB", (self.cols * self.cell, self.rows * self.cell), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        margin = self.cell // 6
        for (row, col), (shape, colour) in grid.items():
            box = (
                col * self.cell + margin, row * self.cell + margin,
                (col + 1) * self.cell - margin - 1, (row + 1) * self.cell - margin - 1,
            )
            _draw_shape(draw, shape, COLOURS[colour], box)
        return image

    def sample(self, rng):
        relation = rng.choice(sorted(RELATIONS))
        (d_row, d_col), phrase = RELATIONS[relation]
        anchors = [
            (r, c) for r in range(self.rows) for c in range(self.cols)
            if 0 <= r + d_row < self.rows and 0 <= c + d_col < self.cols
        ]
        anchor_pos = rng.choice(anchors)
        anchor = rng.choice(SHAPES)
        others = [s for s in SHAPES if s != anchor]  # the anchor shape is unique in the grid
        colours = sorted(COLOURS)
        grid = {(r, c): (rng.choice(others), rng.choice(colours)) for r in range(self.rows) for c in range(self.cols)}
        grid[anchor_pos] = (anchor, rng.choice(colours))
        target_pos = (anchor_pos[0] + d_row, anchor_pos[1] + d_col)
        target_shape, answer = grid[target_pos]

        distractors = [c for c in colours if c != answer]
        rng.shuffle(distractors)
        choices = [answer] + distractors[:3]
        rng.shuffle(choices)

        (ar, ac), (tr, tc) = [(r + 1, c + 1) for r, c in (anchor_pos, target_pos)]
        steps = [
            f"The {anchor} is in row {ar}, column {ac}.",
            f"The shape {phrase} it, in row {tr}, column {tc}, is a {target_shape}.",
            f"The {target_shape} is {answer}.",
        ]
        rationales = [
            " ".join(steps),
            f"The {anchor} sits at row {ar}, column {ac}. Row {tr}, column {tc} holds a {target_shape}. "
            f"That {target_shape} is {answer}.",
            f"Find the {anchor} in row {ar}, column {ac}. The {target_shape} {phrase} it is coloured {answer}.",
        ]
        return SyntheticExample(
            image=self.render(grid),
            question=f"What colour is the shape {phrase} the {anchor}?",
            choices=choices,
            correct_choice_idx=choices.index(answer),
            steps=steps,
            rationales=rationales,
            direct_answers=[answer] * 10,
        )


TASKS = {ShapeGridTask.name: ShapeGridTask}


def write_synthetic_aokvqa(out, n_train, n_val, seed=0, task="shape_grid", jpeg_quality=95):
    """Write the set described in the module docstring under `out`; returns the paths written.

    Deterministic: the same arguments give byte-identical files.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {sorted(TASKS)}")
    generator = TASKS[task]()
    out = Path(out)
    paths = {"aokvqa_dir": out / "aokvqa", "coco_dir": out / "coco", "canonical_dir": out / "canonical"}
    for directory in paths.values():
        directory.mkdir(parents=True, exist_ok=True)
    next_image_id = 1
    for split, count in (("train", n_train), ("val", n_val)):
        rng = random.Random(f"{task}:{seed}:{split}")
        image_dir = paths["coco_dir"] / f"{split}2017"
        image_dir.mkdir(parents=True, exist_ok=True)
        annotations, canonical = [], []
        for i in range(count):
            example = generator.sample(rng)
            image_id = next_image_id
            next_image_id += 1
            image_path = image_dir / f"{image_id:012d}.jpg"
            example.image.save(image_path, format="JPEG", quality=jpeg_quality)
            annotation = {
                "split": split,
                "image_id": image_id,
                "question_id": f"{task}_{seed}_{split}_{i:05d}",
                "question": example.question,
                "choices": example.choices,
                "correct_choice_idx": example.correct_choice_idx,
                "direct_answers": example.direct_answers,
                "difficult_direct_answer": False,
                "rationales": example.rationales,
            }
            annotations.append(annotation)
            relative_image = os.path.relpath(image_path, paths["canonical_dir"])
            record, reason = aokvqa_to_canonical(annotation, relative_image, steps_from=STEPS_FROM)
            if reason is not None or record["steps"] != example.steps:
                raise RuntimeError(f"task {task!r} produced an example the A-OKVQA formatter reads differently: {reason}")
            canonical.append(record)
        with open(paths["aokvqa_dir"] / f"aokvqa_v1p0_{split}.json", "w", encoding="utf-8") as f:
            json.dump(annotations, f, indent=1)
        with open(paths["canonical_dir"] / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for record in canonical:
                f.write(json.dumps(record) + "\n")
        logger.info("%s: %d %s questions", out, count, split)
    return paths


def official_to_hf(aokvqa_dir, coco_dir, splits=("train", "val")):
    """The official files as the Hub copy `HuggingFaceM4/A-OKVQA` holds them: splits train/validation/test, the
    image embedded, no image_id, and `direct_answers` as the repr of a Python list."""
    features = datasets.Features({
        "image": datasets.Image(),
        "question_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "correct_choice_idx": datasets.Value("int8"),
        "direct_answers": datasets.Value("string"),
        "difficult_direct_answer": datasets.Value("bool"),
        "rationales": datasets.List(datasets.Value("string")),
    })
    hub_split = {"train": "train", "val": "validation", "test": "test"}
    out = {}
    for split in splits:
        with open(Path(aokvqa_dir) / f"aokvqa_v1p0_{split}.json", encoding="utf-8") as f:
            annotations = json.load(f)
        rows = [
            {
                "image": str(Path(coco_dir) / f"{split}2017" / f"{a['image_id']:012d}.jpg"),
                "question_id": a["question_id"],
                "question": a["question"],
                "choices": a["choices"],
                "correct_choice_idx": a.get("correct_choice_idx"),
                "direct_answers": repr(a["direct_answers"]) if "direct_answers" in a else None,
                "difficult_direct_answer": a.get("difficult_direct_answer"),
                "rationales": a.get("rationales") or [],
            }
            for a in annotations
        ]
        # The Image feature embeds the file bytes on save_to_disk, as the Hub parquet files do.
        out[hub_split[split]] = datasets.Dataset.from_list(rows, features=features)
    return datasets.DatasetDict(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="shape_grid", choices=sorted(TASKS))
    parser.add_argument("--hf", action="store_true", help="also write {out}/hf as the Hub copy (save_to_disk)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_synthetic_aokvqa(args.out, args.n_train, args.n_val, args.seed, args.task)
    if args.hf:
        official_to_hf(paths["aokvqa_dir"], paths["coco_dir"]).save_to_disk(Path(args.out) / "hf")


__all__ = ["SyntheticExample", "ShapeGridTask", "TASKS", "STEPS_FROM", "write_synthetic_aokvqa", "official_to_hf", "main"]

if __name__ == "__main__":
    main()
