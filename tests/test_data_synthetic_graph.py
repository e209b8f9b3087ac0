"""The graph_search task's guarantees, checked from the pixels: exactly one choice is reachable from red, the steps
are a path of drawn arrows to it, red can go astray, and the set is deterministic."""

import random
from collections import Counter

import pytest

from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.synthetic import GRAPH_COLOURS, TASKS, GraphSearchTask, write_synthetic_aokvqa


@pytest.fixture(scope="module")
def examples():
    task, rng = GraphSearchTask(), random.Random(0)
    return task, [task.sample(rng) for _ in range(300)]


def test_registered():
    assert TASKS["graph_search"] is GraphSearchTask


def test_exactly_one_choice_is_reachable_and_it_is_the_answer(examples):
    task, examples = examples
    for e in examples:
        reachable = task.reachable(task.read_edges(e.image), task.start)
        assert [c for c in e.choices if c in reachable] == [e.choices[e.correct_choice_idx]]
        assert e.choices == list(task.choices)  # one order for every image: the letter follows from the colour
    counts = Counter(e.correct_choice_idx for e in examples)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) >= 50, counts


def test_steps_are_a_path_of_drawn_arrows_from_red_to_the_answer(examples):
    task, examples = examples
    for e in examples:
        edges = set(task.read_edges(e.image))
        arrows = [task.parse_step(step) for step in e.steps]
        assert arrows[0][0] == task.start and arrows[-1][1] == e.choices[e.correct_choice_idx]
        assert all(a[1] == b[0] for a, b in zip(arrows, arrows[1:]))  # each step starts where the last one ended
        assert set(arrows) <= edges
        assert len({node for arrow in arrows for node in arrow}) == len(arrows) + 1  # a simple path


def test_red_can_go_astray_and_no_choice_stands_out_by_its_own_arrows(examples):
    task, examples = examples
    for e in examples:
        edges = task.read_edges(e.image)
        assert sum(source == task.start for source, _ in edges) >= 2  # the path and a way astray
        for choice in e.choices:  # one arrow in, one arrow out, both from or to a colour that is not a choice
            entering = [source for source, target in edges if target == choice]
            leaving = [target for source, target in edges if source == choice]
            assert len(entering) == 1 and len(leaving) == 1, (e.choices, edges)
            assert entering[0] not in e.choices and leaving[0] not in e.choices


def test_following_the_first_arrow_fails_often(examples):
    task, examples = examples

    def first_arrow_reader(e):
        edges, node, seen = task.read_edges(e.image), task.start, {task.start}
        while True:
            nexts = [t for s, t in edges if s == node and t not in seen]
            if not nexts:
                return None
            node = nexts[0]
            seen.add(node)
            if node in e.choices:
                return node

    right = sum(first_arrow_reader(e) == e.choices[e.correct_choice_idx] for e in examples)
    assert right < 0.7 * len(examples), right


def test_sizes_and_path_lengths_vary(examples):
    task, examples = examples
    sizes = Counter(task.num_nodes(task.read_edges(e.image)) for e in examples)
    hops = Counter(len(e.steps) for e in examples)
    assert set(sizes) == {8, 9, 10} and set(hops) == {1, 2, 3}
    for e in examples:
        size = task.num_nodes(task.read_edges(e.image))
        assert len(e.steps) <= size - 6 and len(task.read_edges(e.image)) <= 16


def test_deterministic_given_the_seed(tmp_path):
    first = write_synthetic_aokvqa(tmp_path / "a", 6, 3, seed=1, task="graph_search")
    second = write_synthetic_aokvqa(tmp_path / "b", 6, 3, seed=1, task="graph_search")
    other = write_synthetic_aokvqa(tmp_path / "c", 6, 3, seed=2, task="graph_search")
    for split in ("train", "val"):
        assert (first["canonical_dir"] / f"{split}.jsonl").read_text() == (
            second["canonical_dir"] / f"{split}.jsonl").read_text()
        assert (first["canonical_dir"] / f"{split}.jsonl").read_text() != (
            other["canonical_dir"] / f"{split}.jsonl").read_text()
    images = sorted((first["coco_dir"]).rglob("*.jpg"))
    assert images and all(path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
                          for path in images)
    records = load_canonical(first["canonical_dir"] / "val.jsonl")
    assert all(record["question"].startswith(GraphSearchTask.question) for record in records)


def test_the_palette_survives_jpeg(tmp_path):
    task, rng = GraphSearchTask(), random.Random(3)
    for _ in range(20):
        e = task.sample(rng)
        e.image.save(tmp_path / "g.jpg", format="JPEG", quality=95)
        from PIL import Image

        assert task.read_edges(Image.open(tmp_path / "g.jpg")) == task.read_edges(e.image)
    assert len(GRAPH_COLOURS) == 10


@pytest.mark.parametrize("kwargs, match", [
    ({"sizes": (7, 8)}, "graph sizes must be in 8..10"),
    ({"max_hops": 5}, "max_hops must be in 1..4"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GraphSearchTask(**kwargs)
