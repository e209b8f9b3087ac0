"""The colour_chain task's guarantees: the answer needs the image, the steps chain, the set is deterministic."""

import json
import random
from collections import Counter

import pytest
from PIL import Image

from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.synthetic import CHAIN_COLOURS, TASKS, ColourChainTask, write_synthetic_aokvqa


@pytest.fixture(scope="module")
def examples():
    task, rng = ColourChainTask(), random.Random(0)
    return task, [task.sample(rng) for _ in range(200)]


def test_registered():
    assert TASKS["colour_chain"] is ColourChainTask


def test_question_and_choices_do_not_depend_on_the_image(examples):
    task, examples = examples
    assert {e.question for e in examples} == {task.question}
    assert {tuple(e.choices) for e in examples} == {task.choices}
    # ... while the answer does: every choice is correct for some image, about equally often (chance is 25%).
    counts = Counter(e.correct_choice_idx for e in examples)
    assert set(counts) == {0, 1, 2, 3}
    assert all(35 <= n <= 65 for n in counts.values()), counts


def test_four_distinct_choices_exactly_one_correct(examples):
    _, examples = examples
    for e in examples:
        assert len(e.choices) == 4 and len(set(e.choices)) == 4
        assert e.correct_choice_idx in range(4)
        assert e.direct_answers == [e.choices[e.correct_choice_idx]] * 10


def test_answer_is_a_function_of_the_pixels(examples):
    # Read the pointers back from the rendered image and follow them: the chain and the answer come out.
    task, examples = examples
    for e in examples:
        pointers = task.read_pointers(e.image)
        assert set(pointers) == set(CHAIN_COLOURS)  # every colour is a key exactly once
        chain = task.follow(pointers)
        assert chain[-1] == e.choices[e.correct_choice_idx]
        assert e.steps == [f"{key} points to {value}." for key, value in zip([task.start, *chain[:-1]], chain)]


def test_steps_chain(examples):
    # Each step starts from the colour the previous step reached; the first from red; the last reaches the answer.
    task, examples = examples
    for e in examples:
        assert len(e.steps) == task.hops
        sources = [step.split(" points to ")[0] for step in e.steps]
        targets = [step.split(" points to ")[1].rstrip(".") for step in e.steps]
        assert sources[0] == task.start
        assert sources[1:] == targets[:-1]
        assert targets[-1] == e.choices[e.correct_choice_idx]
        assert len(set(targets)) == len(targets)  # no colour visited twice


def test_same_text_different_images_different_answers(examples):
    task, examples = examples
    by_answer = {}
    for e in examples:
        by_answer.setdefault(e.correct_choice_idx, e)
    images = [by_answer[i].image.tobytes() for i in range(4)]
    assert len(set(images)) == 4
    assert len({(by_answer[i].question, tuple(by_answer[i].choices)) for i in range(4)}) == 1


def test_hops_and_board_size():
    task = ColourChainTask(hops=2, size=3, cell=20)
    example = task.sample(random.Random(1))
    assert example.image.size == (60, 60) and len(example.steps) == 2
    assert task.follow(task.read_pointers(example.image))[-1] == example.choices[example.correct_choice_idx]
    with pytest.raises(ValueError, match="hops"):
        ColourChainTask(hops=5)
    with pytest.raises(ValueError, match="cannot hold"):
        ColourChainTask(size=2)


def test_written_set_is_deterministic_and_readable_from_jpeg(tmp_path):
    write_synthetic_aokvqa(tmp_path / "a", 8, 4, seed=1, task="colour_chain")
    write_synthetic_aokvqa(tmp_path / "b", 8, 4, seed=1, task="colour_chain")
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(tmp_path / "a") == files(tmp_path / "b")

    task = ColourChainTask()
    records = load_canonical(tmp_path / "a" / "canonical" / "train.jsonl")
    official = json.loads((tmp_path / "a" / "aokvqa" / "aokvqa_v1p0_train.json").read_text())
    for record, annotation in zip(records, official):
        with Image.open(record["image"]) as image:
            assert image.size == (56, 56)  # one tiny-model tile; one image token per cell
            chain = task.follow(task.read_pointers(image))  # survives JPEG compression
        assert record["answer"] == f"{'ABCD'[annotation['correct_choice_idx']]}. {chain[-1]}"
        assert record["steps"] == annotation["rationales"][0].replace(". ", ".\n").splitlines()


# ---- the variable-depth task (issue 17)


def test_variable_depth_task_states_its_depth_and_its_answer_needs_the_image():
    from mmcoconut.data.synthetic import ColourChainDepthTask

    task, rng = TASKS["colour_chain_depth"](), random.Random(0)
    assert isinstance(task, ColourChainDepthTask) and (task.min_hops, task.hops) == (1, 4)
    examples = [task.sample(rng) for _ in range(400)]
    depths = Counter(len(e.steps) for e in examples)
    assert set(depths) == {1, 2, 3, 4} and all(70 <= n <= 130 for n in depths.values()), depths
    for e in examples:
        hops = len(e.steps)
        assert e.question == task.question_for(hops)
        assert f"follow the pointers {hops} time" in e.question
        chain = task.follow(task.read_pointers(e.image), hops)
        assert chain[-1] == e.choices[e.correct_choice_idx]
        assert [task.parse_step(step) for step in e.steps] == list(zip([task.start, *chain[:-1]], chain))
    # At every depth the answer is spread over the four choices: the question alone does not give it away.
    for hops in range(1, 5):
        answers = Counter(e.correct_choice_idx for e in examples if len(e.steps) == hops)
        assert set(answers) == {0, 1, 2, 3}, (hops, answers)


def test_fixed_depth_sets_are_unchanged_by_the_depth_option():
    # A fixed depth draws no extra random number, so the data of the earlier experiment is reproduced exactly.
    fixed, explicit = ColourChainTask(hops=3), ColourChainTask(hops=3, min_hops=3)
    a, b = fixed.sample(random.Random(5)), explicit.sample(random.Random(5))
    assert (a.steps, a.question, a.image.tobytes()) == (b.steps, b.question, b.image.tobytes())


def test_parse_step_refuses_other_text():
    with pytest.raises(ValueError, match="not a colour_chain step"):
        ColourChainTask.parse_step("The circle is in row 2, column 1.")


@pytest.mark.parametrize("kwargs", [{"hops": 0}, {"hops": 5}, {"hops": 2, "min_hops": 3}, {"hops": 3, "min_hops": 0}])
def test_depth_range_is_validated(kwargs):
    with pytest.raises(ValueError, match="min_hops"):
        ColourChainTask(**kwargs)
