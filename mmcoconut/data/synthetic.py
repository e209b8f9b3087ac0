"""A small, deterministic, A-OKVQA-shaped visual reasoning set for tests and the demo.

    mmcoconut-data --out data/synthetic --n-train 64 --n-val 16 --seed 0

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

The multi-hop task, `colour_chain` (`--task colour_chain`), draws a 4×4 board of mostly empty cells; five
cells are pointer tiles, each split in half: its left half's colour points to its right half's colour. The question
and the four choices are the same for every image ("Start at red and follow the pointers 3 times. Which colour do
you reach?", A. green B. blue C. yellow D. purple), so only the image decides the answer, and a model that does not
see it cannot beat chance (25%). Each step starts from the colour the previous step reached: "red points to
blue.", "blue points to yellow.", "yellow points to green." (short steps: at the real 151k vocabulary every label
token costs a full LM-head row on CPU). Sizes match the tiny model of the
experiment (`experiments/learning_curve.py`): a 56-px image of 14-px cells, i.e. one InternVL image token (2×2
patches of 7 px after the pixel shuffle) per cell, the left patches holding the key colour and the right ones
the value.

The variable-depth task, `colour_chain_depth`, is the same board with 1 to 4 hops drawn per question and stated
in it ("... follow the pointers 2 times ..."): the question tells how deep to think, only the image tells the
answer (for adaptive thinking, where the model decides how many thoughts a question needs).

The search task, `graph_search`, draws a small directed graph of 8 to 10 colours on the same 4×4 board: every tile
is one arrow, its left half the source colour and its right half the target (a colour may head several tiles). The
question "Starting at red and following the arrows, which colour can you reach?" offers the same four colours in the
same order for every image (A. green B. blue C. yellow D. purple, as `colour_chain`), of which exactly one is
reachable. Every choice is entered by one arrow and left by one, and red always has a second arrow, so a reader who
follows the first arrow it sees often goes astray. The steps are the arrows of the shortest path from red to the
answer, ProsQA-style: "red leads to cyan.", "cyan leads to pink.".

A new task is a class with `name` and `sample(rng) -> SyntheticExample`, registered in `TASKS`.
"""

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# `datasets` and data_aokvqa (which imports it) are imported where they are used: `--help` answers at once, and
# drawing the images needs neither.

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
# Colours of the colour_chain task: the start (red) and the four answers.
CHAIN_COLOURS = ("red", "green", "blue", "yellow", "purple")
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


class ColourChainTask:
    """Visual pointer chasing: follow `hops` colour pointers, drawn in the image, from red.

    The board is `size × size` cells of `cell` px on white. `len(CHAIN_COLOURS)` cells (placed at random) are pointer
    tiles: the left half is the key colour, the right half the value colour; every colour is a key exactly once.
    The chain red → x1 → … → x_hops visits distinct non-red colours, drawn uniformly, so the answer x_hops is uniform
    over the four fixed choices; the other pointers are random. The answer is a function of the pixels alone:
    `read_pointers(image)` recovers the pointers and `follow` the chain (the tests check both).
    """

    name = "colour_chain"
    start = "red"
    choices = ("green", "blue", "yellow", "purple")  # the same four choices, in the same order, for every image

    # One reasoning step; `parse_step` reads it back (the probes' targets, `probe_latents.py`).
    step_template = "{key} points to {value}."
    _step_pattern = re.compile(r"^(\w+) points to (\w+)\.$")

    def __init__(self, hops=3, size=4, cell=14, min_hops=None):
        """`hops` pointers to follow; with `min_hops`, each question draws its own count in `min_hops..hops`
        (and states it), so the chain's depth varies per question."""
        min_hops = hops if min_hops is None else min_hops
        if not 1 <= min_hops <= hops <= len(self.choices):
            raise ValueError(
                f"hops must satisfy 1 <= min_hops <= hops <= {len(self.choices)} (a chain visits distinct colours), "
                f"got min_hops={min_hops}, hops={hops}"
            )
        if size * size < len(CHAIN_COLOURS):
            raise ValueError(f"a {size}×{size} board cannot hold {len(CHAIN_COLOURS)} pointer tiles")
        if cell % 2:
            raise ValueError(f"cell must be even (two halves of equal width), got {cell}")
        self.hops, self.min_hops, self.size, self.cell = hops, min_hops, size, cell

    @property
    def question(self):
        return self.question_for(self.hops)

    def question_for(self, hops):
        times = "time" if hops == 1 else "times"
        return (
            f"Each tile's left colour points to its right colour. Start at {self.start} and follow the pointers "
            f"{hops} {times}. Which colour do you reach?"
        )

    @classmethod
    def parse_step(cls, step):
        """(key, value) colours of a step written by `sample`; a ValueError for any other text."""
        match = cls._step_pattern.match(step)
        if match is None:
            raise ValueError(f"not a {cls.name} step ({cls.step_template!r}): {step!r}")
        return match.groups()

    def render(self, placement, pointers):
        """`placement`: {(row, col): key colour}; `pointers`: {key colour: value colour}."""
        side = self.size * self.cell
        image = Image.new("RGB", (side, side), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        half = self.cell // 2
        for (row, col), key in placement.items():
            left, top = col * self.cell, row * self.cell
            draw.rectangle((left, top, left + half - 1, top + self.cell - 1), fill=COLOURS[key])
            draw.rectangle((left + half, top, left + self.cell - 1, top + self.cell - 1), fill=COLOURS[pointers[key]])
        return image

    def read_pointers(self, image):
        """{key colour: value colour} read back from the pixels (nearest palette colour at each half's centre)."""
        pixels = image.convert("RGB").load()
        quarter = self.cell // 4
        pointers = {}
        for row in range(self.size):
            for col in range(self.size):
                top, left = row * self.cell, col * self.cell
                y = top + self.cell // 2
                key = _nearest_colour(pixels[left + quarter, y])
                value = _nearest_colour(pixels[left + self.cell - 1 - quarter, y])
                if key is None and value is None:
                    continue
                if key is None or value is None or key in pointers:
                    raise ValueError(f"cell ({row}, {col}) is not a pointer tile of a valid board")
                pointers[key] = value
        return pointers

    def follow(self, pointers, hops=None):
        """The colours reached after 1..hops steps from `start` (`hops` defaults to the task's)."""
        chain, colour = [], self.start
        for _ in range(self.hops if hops is None else hops):
            colour = pointers[colour]
            chain.append(colour)
        return chain

    def sample(self, rng):
        # A fixed depth draws nothing here, so fixed-depth sets stay byte-identical to earlier ones.
        hops = self.hops if self.min_hops == self.hops else rng.randint(self.min_hops, self.hops)
        path = rng.sample(self.choices, hops)  # distinct, so the end is uniform over the choices
        pointers = dict(zip([self.start, *path[:-1]], path))
        for key in CHAIN_COLOURS:
            if key not in pointers:
                pointers[key] = rng.choice(CHAIN_COLOURS)
        cells = rng.sample([(r, c) for r in range(self.size) for c in range(self.size)], len(CHAIN_COLOURS))
        placement = dict(zip(cells, CHAIN_COLOURS))
        answer = path[-1]

        sources = [self.start, *path[:-1]]
        steps = [self.step_template.format(key=key, value=value) for key, value in zip(sources, path)]
        rationales = [
            " ".join(steps),
            " ".join(f"From {key} the pointer leads to {value}." for key, value in zip(sources, path)),
            f"Following the pointers from {self.start} visits {', '.join(path)}, so the answer is {answer}.",
        ]
        return SyntheticExample(
            image=self.render(placement, pointers),
            question=self.question_for(hops),
            choices=list(self.choices),
            correct_choice_idx=self.choices.index(answer),
            steps=steps,
            rationales=rationales,
            direct_answers=[answer] * 10,
        )


def _nearest_colour(rgb, max_distance=60):
    """The palette colour of `CHAIN_COLOURS` nearest to `rgb`, or None for background (white)."""
    best = min(CHAIN_COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb)))
    if sum((a - b) ** 2 for a, b in zip(COLOURS[best], rgb)) ** 0.5 > max_distance:
        return None
    return best


class ColourChainDepthTask(ColourChainTask):
    """`colour_chain` with 1 to 4 hops, drawn per question and stated in it (variable-depth reasoning)."""

    name = "colour_chain_depth"

    def __init__(self, hops=4, size=4, cell=14, min_hops=1):
        super().__init__(hops=hops, size=size, cell=cell, min_hops=min_hops)


# Colours of the graph_search task: the start (red) and up to nine others, far apart in RGB after JPEG.
GRAPH_COLOURS = {
    **{name: COLOURS[name] for name in ("red", "green", "blue", "yellow", "purple", "orange")},
    "cyan": (20, 200, 210),
    "pink": (250, 150, 200),
    "brown": (130, 75, 25),
    "black": (20, 20, 20),
}


class GraphSearchTask:
    """Visual graph search: which of four colours is reachable from red along the arrows drawn on the board?

    The four choices are `choices`, in that order, for every question (as in `ColourChainTask`), so the answer's
    letter follows from its colour and only the search is left to learn. A graph of `n` colours (`sizes`, drawn per
    question) holds red, the four choices and `n - 5` other colours. Each choice is entered by exactly one arrow and
    left by exactly one, both from or to a colour that is not a choice, so no choice stands out by its own arrows; the
    other arrows join the colours that are not choices at random. Graphs are drawn until exactly one choice is
    reachable from red, its shortest path has `hops` arrows (`1..max_hops` as the size allows) and red has a second
    arrow (a way astray). The steps are that shortest path. Every arrow is a `cell`-px tile on a `size × size` board
    (source colour left, target right), so 16 arrows at most. `read_edges(image)` recovers the graph from the pixels
    (the tests use it).
    """

    name = "graph_search"
    start = "red"
    question = "Each tile is an arrow from its left colour to its right colour. Starting at red and following the " \
        "arrows, which colour can you reach?"
    step_template = "{key} leads to {value}."
    _step_pattern = re.compile(r"^(\w+) leads to (\w+)\.$")
    choices = ("green", "blue", "yellow", "purple")  # the same four choices, in the same order, for every image

    def __init__(self, sizes=(8, 9, 10), max_hops=3, size=4, cell=14):
        if not all(8 <= n <= len(GRAPH_COLOURS) for n in sizes):
            raise ValueError(f"graph sizes must be in 8..{len(GRAPH_COLOURS)} (the palette), got {sizes}")
        if not 1 <= max_hops <= max(sizes) - 6:
            raise ValueError(f"max_hops must be in 1..{max(sizes) - 6} (the largest graph's colours that are not choices "
                             f"hold the path and ways astray; smaller graphs draw shorter paths), got {max_hops}")
        self.sizes, self.max_hops, self.size, self.cell = tuple(sizes), max_hops, size, cell

    @classmethod
    def parse_step(cls, step):
        """(source, target) colours of a step written by `sample`; a ValueError for any other text."""
        match = cls._step_pattern.match(step)
        if match is None:
            raise ValueError(f"not a {cls.name} step ({cls.step_template!r}): {step!r}")
        return match.groups()

    def render(self, placement):
        """`placement`: {(row, col): (source colour, target colour)}."""
        side = self.size * self.cell
        image = Image.new("RGB", (side, side), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        half = self.cell // 2
        for (row, col), (source, target) in placement.items():
            left, top = col * self.cell, row * self.cell
            draw.rectangle((left, top, left + half - 1, top + self.cell - 1), fill=GRAPH_COLOURS[source])
            draw.rectangle((left + half, top, left + self.cell - 1, top + self.cell - 1), fill=GRAPH_COLOURS[target])
        return image

    def read_edges(self, image):
        """The arrows `[(source, target)]` read back from the pixels (nearest palette colour at each half's centre)."""
        pixels = image.convert("RGB").load()
        quarter = self.cell // 4
        edges = []
        for row in range(self.size):
            for col in range(self.size):
                top, left = row * self.cell, col * self.cell
                y = top + self.cell // 2
                source = _nearest(pixels[left + quarter, y], GRAPH_COLOURS)
                target = _nearest(pixels[left + self.cell - 1 - quarter, y], GRAPH_COLOURS)
                if source is None and target is None:
                    continue
                if source is None or target is None:
                    raise ValueError(f"cell ({row}, {col}) is not an arrow tile of a valid board")
                edges.append((source, target))
        return edges

    @staticmethod
    def num_nodes(edges):
        """The graph's size: the colours its arrows touch."""
        return len({node for edge in edges for node in edge})

    @staticmethod
    def shortest_paths(edges, start):
        """{colour: the first shortest path [start, …, colour] along `edges`} (breadth first, arrows in order)."""
        paths, frontier = {start: [start]}, [start]
        while frontier:
            node = frontier.pop(0)
            for source, target in edges:
                if source == node and target not in paths:
                    paths[target] = [*paths[node], target]
                    frontier.append(target)
        return paths

    @staticmethod
    def reachable(edges, start):
        """The colours reachable from `start` (itself excluded unless on a cycle) along `edges`."""
        seen, frontier = set(), [start]
        while frontier:
            node = frontier.pop()
            for source, target in edges:
                if source == node and target not in seen:
                    seen.add(target)
                    frontier.append(target)
        return seen

    def sample(self, rng):
        n = rng.choice(self.sizes)
        hops = rng.randint(1, min(self.max_hops, n - 6))
        others = rng.sample([c for c in GRAPH_COLOURS if c != self.start and c not in self.choices], n - 5)
        inner = [self.start, *others]  # the colours that are not choices
        pairs = [(u, v) for u in inner for v in inner if u != v]
        num_inner_arrows = min(len(pairs), min(self.size * self.size, n + 5) - 2 * len(self.choices))
        while True:  # a random graph, kept when its shape is right: the choices play symmetric parts in the drawing
            # Each choice is entered by one arrow and left by one, both from or to a colour that is not a choice.
            edges = {(rng.choice(inner), choice) for choice in self.choices}
            edges |= {(choice, rng.choice(inner)) for choice in self.choices}
            edges = sorted(edges | set(rng.sample(pairs, num_inner_arrows)))
            paths = self.shortest_paths(edges, self.start)
            reached = [choice for choice in self.choices if choice in paths]
            red_out = [target for source, target in edges if source == self.start]
            if len(reached) == 1 and len(paths[reached[0]]) - 1 == hops and self.num_nodes(edges) == n \
                    and len(red_out) >= 2:
                break
        answer = reached[0]
        path = paths[answer]
        cells = rng.sample([(r, c) for r in range(self.size) for c in range(self.size)], len(edges))
        choices = list(self.choices)
        steps = [self.step_template.format(key=key, value=value) for key, value in zip(path, path[1:])]
        rationales = [
            " ".join(steps),
            " ".join(f"An arrow goes from {key} to {value}." for key, value in zip(path, path[1:])),
            f"From {self.start} the arrows lead through {', '.join(path[1:])}, so {answer} is reachable.",
        ]
        return SyntheticExample(
            image=self.render(dict(zip(cells, edges))),
            question=self.question,
            choices=choices,
            correct_choice_idx=choices.index(answer),
            steps=steps,
            rationales=rationales,
            direct_answers=[answer] * 10,
        )


def _nearest(rgb, palette, max_distance=60):
    """The colour of `palette` nearest to `rgb`, or None for background (white)."""
    best = min(palette, key=lambda name: sum((a - b) ** 2 for a, b in zip(palette[name], rgb)))
    if sum((a - b) ** 2 for a, b in zip(palette[best], rgb)) ** 0.5 > max_distance:
        return None
    return best


TASKS = {task.name: task for task in (ShapeGridTask, ColourChainTask, ColourChainDepthTask, GraphSearchTask)}


def write_synthetic_aokvqa(out, n_train, n_val, seed=0, task="shape_grid", jpeg_quality=95):
    """Write the set described in the module docstring under `out`; returns the paths written.

    Deterministic: the same arguments give byte-identical files.
    """
    from mmcoconut.data.aokvqa import aokvqa_to_canonical

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
    import datasets

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


__all__ = ["SyntheticExample", "ShapeGridTask", "ColourChainTask", "ColourChainDepthTask", "GraphSearchTask",
           "CHAIN_COLOURS", "GRAPH_COLOURS", "TASKS", "STEPS_FROM", "write_synthetic_aokvqa", "official_to_hf"]

