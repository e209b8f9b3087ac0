"""A-OKVQA for lmms-eval (`aokvqa_mc`, `aokvqa_da`): the official files, read and scored by mmcoconut's own code.

The questions come from `mmcoconut.data.aokvqa.load_records` (what `evaluate_aokvqa.py --aokvqa-dir --coco-dir`
reads), the answer is read by `mmcoconut.text.answers.parse_answer` and scored by
`mmcoconut.evaluation.metric.aokvqa_accuracy`, so the numbers are those of `evaluate_aokvqa.py`.

Environment: `AOKVQA_DIR` (holding `aokvqa_v1p0_{split}.json`), `COCO_DIR` (holding `{split}2017/`), `AOKVQA_SPLIT`
(`val` by default; `train` works; `test` has no answers to score).
"""

import os

import datasets
from lmms_eval.api.task import ConfigurableTask

from mmcoconut.data.aokvqa import load_records
from mmcoconut.data.images import load_image
from mmcoconut.errors import UserFileNotFoundError, UserValueError
from mmcoconut.evaluation.metric import aokvqa_accuracy
from mmcoconut.text.answers import direct_answer_from, parse_answer

SPLIT_VARIABLE = "AOKVQA_SPLIT"


def _directory(variable, holds):
    path = os.environ.get(variable)
    if not path:
        raise UserFileNotFoundError(f"the A-OKVQA tasks read {holds} from ${variable}, which is not set "
                                    f"(e.g. {variable}=data/aokvqa python -m lmms_eval ...)")
    if not os.path.isdir(path):
        raise UserFileNotFoundError(f"${variable}={path}: no such directory (it should hold {holds})")
    return path


def official_records(split):
    """The split's canonical records as a `datasets.Dataset` (image = the COCO file's path)."""
    aokvqa_dir = _directory("AOKVQA_DIR", f"aokvqa_v1p0_{split}.json")
    coco_dir = _directory("COCO_DIR", f"the COCO images, {split}2017/")
    records = load_records("aokvqa_official", split, aokvqa_dir=aokvqa_dir, coco_dir=coco_dir,
                           require_rationales=False)
    unlabeled = [record["id"] for record in records if record["correct_choice_idx"] is None]
    if unlabeled:
        raise UserValueError(f"${SPLIT_VARIABLE}={split}: {len(unlabeled)} questions have no answer "
                             f"(first: {unlabeled[0]!r}); the A-OKVQA test split cannot be scored, only submitted")
    columns = ("id", "image", "question", "answer", "choices", "correct_choice_idx", "direct_answers",
               "difficult_direct_answer")
    return datasets.Dataset.from_list([{name: record[name] for name in columns} for record in records])


class OfficialAOKVQATask(ConfigurableTask):
    """A task whose documents are the official A-OKVQA split named by the environment (see the module docstring)."""

    def __init__(self, config=None):
        super().__init__(config={key: value for key, value in config.items() if key != "class"})

    def download(self, dataset_kwargs=None):
        split = os.environ.get(SPLIT_VARIABLE, "val")
        self.config.test_split = split
        self.dataset = datasets.DatasetDict({split: official_records(split)})
        self.dataset_no_image = self.dataset  # the images are paths, opened by doc_to_visual


def doc_to_visual(doc):
    return [load_image(doc["image"], doc["id"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question with its choices rendered `A. ..` to `D. ..` (`render_choices`), as in training."""
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]


def _scored(doc, completion):
    parsed = parse_answer(completion, doc["choices"])
    return {
        "question_id": doc["id"],
        "parsed_letter": parsed.letter,
        "parse_error": parsed.reason,
        "prediction": {"multiple_choice": parsed.choice_text, "direct_answer": direct_answer_from(parsed)},
        "reference": {
            "choices": list(doc["choices"]),
            "correct_choice_idx": doc["correct_choice_idx"],
            "direct_answers": list(doc["direct_answers"] or []),
            "difficult_direct_answer": bool(doc["difficult_direct_answer"]),  # unmarked: scored for DA
        },
    }


def process_results_mc(doc, results):
    scored = _scored(doc, results[0])
    return {"mc_accuracy": scored, "unparseable": scored}


def process_results_da(doc, results):
    scored = _scored(doc, results[0])
    return {"da_accuracy": scored, "unparseable": scored}


def _accuracy(items):
    return aokvqa_accuracy([item["prediction"] for item in items], [item["reference"] for item in items])


def mc_accuracy(items):
    return _accuracy(items)["mc_accuracy"]


def da_accuracy(items):
    return _accuracy(items)["da_accuracy"]


def num_unparseable(items):
    return _accuracy(items)["num_unparseable"]
