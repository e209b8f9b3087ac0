"""The A-OKVQA metric (`mmcoconut.evaluation.metric.aokvqa_accuracy`, a plain function) on hand-computed cases."""

import logging
import math
import socket
from types import SimpleNamespace

import pytest

from mmcoconut.evaluation.metric import aokvqa_accuracy

CHOICES = ["hat", "umbrella", "coat", "bag"]


def no_network(*args, **kwargs):
    raise OSError("network access attempted while scoring")


@pytest.fixture
def metric(monkeypatch):
    """The metric, with every network connection refused: scoring is arithmetic on the given answers."""
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return SimpleNamespace(compute=lambda predictions, references: aokvqa_accuracy(predictions, references))


def ref(direct_answers=("umbrella",) * 10, correct=1, difficult=False, choices=CHOICES):
    return {
        "choices": list(choices),
        "correct_choice_idx": correct,
        "direct_answers": list(direct_answers),
        "difficult_direct_answer": difficult,
    }


def pred(mc, da="same"):
    return {"multiple_choice": mc, "direct_answer": mc if da == "same" else da}


@pytest.mark.parametrize(
    ("num_matches", "expected"),
    [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (4, 1.0), (10, 1.0)],
)
def test_direct_answer_score_is_min_matches_over_three(metric, num_matches, expected):
    answers = ["umbrella"] * num_matches + ["parasol"] * (10 - num_matches)
    result = metric.compute(predictions=[pred("umbrella")], references=[ref(answers)])
    assert result["da_accuracy"] == pytest.approx(expected)
    assert result["mc_accuracy"] == 1.0


def test_hand_computed_batch(metric):
    predictions = [
        pred("umbrella"),  # MC right; DA 2 matches -> 2/3
        pred("hat"),  # MC wrong; DA 1 match -> 1/3
        pred(None, None),  # unparseable: MC wrong, DA 0
        pred("coat", "raincoat"),  # MC right; difficult: no DA score
        pred("bag", "backpack"),  # MC wrong; DA 4 matches -> 1
    ]
    references = [
        ref(["umbrella"] * 2 + ["parasol"] * 8, correct=1),
        ref(["hat"] + ["cap"] * 9, correct=2),
        ref(["umbrella"] * 10, correct=1),
        ref(["coat"] * 10, correct=2, difficult=True),
        ref(["backpack"] * 4 + ["bag"] * 6, correct=1),
    ]
    result = metric.compute(predictions=predictions, references=references)
    assert result == {
        "mc_accuracy": pytest.approx(2 / 5),
        "da_accuracy": pytest.approx((2 / 3 + 1 / 3 + 0 + 1) / 4),
        "num_unparseable": 1,
        "num_samples": 5,
        "num_da_samples": 4,
    }


def test_difficult_questions_count_for_mc_but_not_for_da(metric):
    predictions = [pred("umbrella"), pred("hat", "sombrero")]
    references = [ref(["umbrella"] * 10), ref(["cap"] * 10, correct=0, difficult=True)]
    result = metric.compute(predictions=predictions, references=references)
    # A wrong DA on the difficult question would halve da_accuracy if it were counted.
    assert result["da_accuracy"] == 1.0
    assert result["mc_accuracy"] == 1.0
    assert (result["num_samples"], result["num_da_samples"]) == (2, 1)


def test_unparseable_is_wrong_and_counted_never_a_default_choice(metric):
    # The correct choice is A, the choice a silent default would pick.
    result = metric.compute(
        predictions=[pred(None, None), pred(None, None)],
        references=[ref(["hat"] * 10, correct=0, choices=CHOICES)] * 2,
    )
    assert result["mc_accuracy"] == 0.0 and result["da_accuracy"] == 0.0
    assert result["num_unparseable"] == 2


def test_missing_direct_answer_alone_is_counted(metric):
    result = metric.compute(predictions=[pred("umbrella", None)], references=[ref()])
    assert (result["mc_accuracy"], result["da_accuracy"], result["num_unparseable"]) == (1.0, 0.0, 1)


@pytest.mark.parametrize("prediction", ["Umbrella", " umbrella", "umbrella.", "umbrellas"])
def test_matching_is_exact_like_the_official_script(metric, prediction):
    # allenai/aokvqa compares `pred == da` with no normalisation; choices and direct answers share
    # one lower-case answer vocabulary, so a choice text matches verbatim and nothing else does.
    result = metric.compute(predictions=[pred("umbrella", prediction)], references=[ref()])
    assert result["da_accuracy"] == 0.0


def test_batches_accumulate(metric):
    """Scores of two batches together: the concatenation, as evaluation gathers every rank's answers."""
    batches = [([pred(None, None)], [ref()]), ([pred("umbrella")], [ref()])]
    result = metric.compute(
        predictions=[p for preds, _ in batches for p in preds], references=[r for _, refs in batches for r in refs]
    )
    assert result["mc_accuracy"] == 0.5 and result["num_unparseable"] == 1


def test_all_difficult_gives_nan_da_with_a_warning(metric, caplog):
    with caplog.at_level(logging.WARNING):
        result = metric.compute(predictions=[pred("umbrella")], references=[ref(difficult=True)])
    assert math.isnan(result["da_accuracy"]) and result["num_da_samples"] == 0
    assert "difficult_direct_answer" in caplog.text


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ([pred("parasol")], [ref()], "not one of the choices"),
        ([pred("umbrella")], [ref(correct=None)], "test split has no answers"),
        ([pred("umbrella")], [ref(correct=4)], "not an index"),
        ([pred("umbrella")], [ref(direct_answers=())], "no direct_answers"),
        ([], [], "no samples"),
    ],
)
def test_invalid_inputs_raise(metric, predictions, references, message):
    with pytest.raises(ValueError, match=message):
        metric.compute(predictions=predictions, references=references)

