"""A-OKVQA multiple-choice and direct-answer accuracy, as an `evaluate` metric.

Follows the official protocol of allenai/aokvqa `evaluation/eval_predictions.py`:

- Multiple choice (MC): a prediction is right when it equals the correct choice's text; averaged
  over all questions.
- Direct answer (DA): a prediction scores min(#matching human answers / 3, 1) against the ten
  `direct_answers`; averaged over the questions *not* marked `difficult_direct_answer`.
- Matching is exact string equality. The official script normalises neither side (no
  lowercasing, no stripping, no VQA punctuation rules): A-OKVQA's choices and direct answers are
  already in one normalised answer vocabulary, so a prediction taken from the choices matches
  verbatim. We do the same, so our numbers equal the leaderboard's.

Unlike the official script, which prints percentages, accuracies here are fractions in [0, 1]
(the `evaluate` convention). An unparseable answer is passed as `None`: it scores 0 and is counted
in `num_unparseable`; it is never mapped to a default choice.

This file imports only `evaluate`, `datasets` and the standard library, because
`evaluate.load` copies it alone into its module cache.
"""

import logging

import datasets
import evaluate

logger = logging.getLogger(__name__)

_CITATION = """\
@inproceedings{schwenk2022aokvqa,
  title={A-OKVQA: A Benchmark for Visual Question Answering using World Knowledge},
  author={Schwenk, Dustin and Khandelwal, Apoorv and Clark, Christopher and Marino, Kenneth and Mottaghi, Roozbeh},
  booktitle={ECCV},
  year={2022}
}
"""

_DESCRIPTION = """\
A-OKVQA accuracy with the official protocol: multiple-choice accuracy over all questions, and
direct-answer accuracy min(#matching human answers / 3, 1) by exact match over the questions not
marked `difficult_direct_answer`. Unparseable answers (None) are wrong and counted.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per question with
        `multiple_choice` (str or None): the predicted choice's text, verbatim one of `choices`;
            None when the model's answer could not be parsed.
        `direct_answer` (str or None): the predicted direct answer; None when unparseable.
    references: one dict per question with
        `choices` (list of str): the answer choices.
        `correct_choice_idx` (int): index of the correct choice.
        `direct_answers` (list of str): the ten human direct answers.
        `difficult_direct_answer` (bool): True excludes the question from DA accuracy.
Returns:
    mc_accuracy (float): fraction of questions whose MC prediction is the correct choice.
    da_accuracy (float): mean of min(#matches / 3, 1) over the non-difficult questions; NaN (with a
        warning) when every question is difficult.
    num_unparseable (int): questions with a None prediction (MC or DA).
    num_samples (int): questions scored for MC.
    num_da_samples (int): questions scored for DA (not difficult).
Examples:
    >>> metric = evaluate.load("/abs/path/to/metrics/aokvqa")
    >>> metric.compute(
    ...     predictions=[{"multiple_choice": "umbrella", "direct_answer": "umbrella"}],
    ...     references=[{"choices": ["hat", "umbrella", "coat", "bag"], "correct_choice_idx": 1,
    ...                  "direct_answers": ["umbrella"] * 2 + ["parasol"] * 8,
    ...                  "difficult_direct_answer": False}],
    ... )
    {'mc_accuracy': 1.0, 'da_accuracy': 0.6666666666666666, 'num_unparseable': 0, 'num_samples': 1, 'num_da_samples': 1}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Aokvqa(evaluate.Metric):
    """A-OKVQA MC and DA accuracy (official protocol); see the module docstring."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "multiple_choice": datasets.Value("string"),
                        "direct_answer": datasets.Value("string"),
                    },
                    "references": {
                        "choices": datasets.Sequence(datasets.Value("string")),
                        "correct_choice_idx": datasets.Value("int32"),
                        "direct_answers": datasets.Sequence(datasets.Value("string")),
                        "difficult_direct_answer": datasets.Value("bool"),
                    },
                }
            ),
            reference_urls=[
                "https://github.com/allenai/aokvqa/blob/main/evaluation/eval_predictions.py",
                "https://arxiv.org/abs/2206.01718",
            ],
        )

    def _enforce_nested_string_type(self, schema, obj):
        # `evaluate` rejects None where a string feature is declared, but None is how an
        # unparseable answer is passed (Arrow stores it as null). Other type checks still apply.
        if obj is None:
            return None
        return super()._enforce_nested_string_type(schema, obj)

    def _compute(self, predictions, references):
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


__all__ = ["Aokvqa"]
