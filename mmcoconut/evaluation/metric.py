"""A-OKVQA multiple-choice and direct-answer accuracy, as a plain function.

Follows the official protocol of allenai/aokvqa `evaluation/eval_predictions.py`:

- Multiple choice (MC): a prediction is right when it equals the correct choice's text; averaged
  over all questions.
- Direct answer (DA): a prediction scores min(#matching human answers / 3, 1) against the ten
  `direct_answers`; averaged over the questions *not* marked `difficult_direct_answer`.
- Matching is exact string equality. The official script normalises neither side (no
  lowercasing, no stripping, no VQA punctuation rules): A-OKVQA's choices and direct answers are
  already in one normalised answer vocabulary, so a prediction taken from the choices matches
  verbatim. We do the same, so our numbers equal the leaderboard's.

Unlike the official script, which prints percentages, accuracies here are fractions in [0, 1]. An
unparseable answer is passed as `None`: it scores 0 and is counted in `num_unparseable`; it is never
mapped to a default choice. (This was an `evaluate` metric loaded by path; 60 lines of arithmetic do
not need a module cache, and a plain function ships in the wheel like any other module.)
"""

import logging

logger = logging.getLogger(__name__)


def aokvqa_accuracy(predictions, references):
    """A-OKVQA MC and DA accuracy of `predictions` against `references` (the official protocol).

    Args:
        predictions: one dict per question with `multiple_choice` (the predicted choice's text, verbatim one of
            `choices`, or None when unparseable) and `direct_answer` (str or None).
        references: one dict per question with `choices`, `correct_choice_idx`, `direct_answers` (the ten human
            answers) and `difficult_direct_answer` (True excludes the question from DA accuracy).

    Returns:
        `mc_accuracy`, `da_accuracy` (NaN, with a warning, when every question is difficult), `num_unparseable`,
        `num_samples`, `num_da_samples`.

    >>> aokvqa_accuracy(
    ...     [{"multiple_choice": "umbrella", "direct_answer": "umbrella"}],
    ...     [{"choices": ["hat", "umbrella", "coat", "bag"], "correct_choice_idx": 1,
    ...       "direct_answers": ["umbrella"] * 2 + ["parasol"] * 8, "difficult_direct_answer": False}],
    ... )
    {'mc_accuracy': 1.0, 'da_accuracy': 0.6666666666666666, 'num_unparseable': 0, 'num_samples': 1, 'num_da_samples': 1}
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("A-OKVQA metric got no samples; nothing to score.")
    mc_correct = 0
    da_scores = []
    num_unparseable = 0
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        choices, answer_idx = ref["choices"], ref["correct_choice_idx"]
        if answer_idx is None or not 0 <= answer_idx < len(choices):
            # The A-OKVQA test split ships without answers: it can only be submitted.
            raise ValueError(
                f"sample {i}: correct_choice_idx {answer_idx!r} is not an index into "
                f"{len(choices)} choices (the test split has no answers to score)"
            )
        mc, da = pred["multiple_choice"], pred["direct_answer"]
        if mc is None or da is None:
            num_unparseable += 1
        if mc is not None and mc not in choices:
            # The official script asserts this in strict mode; a free-form prediction must be
            # mapped onto a choice before scoring, not silently scored as wrong.
            raise ValueError(
                f"sample {i}: multiple_choice prediction {mc!r} is not one of the choices "
                f"{choices}; pass the chosen choice's text, or None when unparseable"
            )
        mc_correct += int(mc == choices[answer_idx])

        if ref["difficult_direct_answer"]:
            continue
        if not ref["direct_answers"]:
            raise ValueError(f"sample {i}: no direct_answers to score the DA prediction against")
        matches = 0 if da is None else sum(da == answer for answer in ref["direct_answers"])
        # Three agreeing annotators make an answer fully right (the VQA accuracy rule).
        da_scores.append(min(matches / 3.0, 1.0))

    if da_scores:
        da_accuracy = sum(da_scores) / len(da_scores)
    else:
        logger.warning(
            "All %d samples are marked difficult_direct_answer; DA accuracy is undefined (NaN).",
            len(predictions),
        )
        da_accuracy = float("nan")
    return {
        "mc_accuracy": mc_correct / len(predictions),
        "da_accuracy": da_accuracy,
        "num_unparseable": num_unparseable,
        "num_samples": len(predictions),
        "num_da_samples": len(da_scores),
    }


__all__ = ["aokvqa_accuracy"]
