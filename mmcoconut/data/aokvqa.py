"""Sources of canonical records: A-OKVQA (Hugging Face or the official release) and JSON/JSONL files.

A canonical record is Coconut's `question / steps / answer` plus an image:

    {"id": str, "image": path | PIL.Image | None, "question": str, "steps": [str, ...], "answer": str | None,
     optional "choices": [str] * 4, "correct_choice_idx": int, "direct_answers": [str], "difficult_direct_answer": bool}

`question` is exactly the text the model reads (for A-OKVQA it ends with the four choices `A. ..`-`D. ..`),
`answer` is what follows `Answer: ` (for A-OKVQA `"{letter}. {choice}"`), `steps` are the reasoning steps the
curriculum replaces by continuous thoughts. `answer` is None only for unlabeled records (the A-OKVQA test split),
which can be prompted but not trained on.
"""

import ast
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import datasets

from mmcoconut.constants import CHOICE_LETTERS, HF_AOKVQA_ID, RECORD_SOURCES, STEPS_FROM
from mmcoconut.data.records import check_text_fields
from mmcoconut.errors import shorten
from mmcoconut.text.answers import parse_answer
from mmcoconut.text.prompt import answer_text, render_choices

logger = logging.getLogger(__name__)

# STEPS_FROM: "rationales": each of the (three) annotator rationales is one step; "first_rationale_sentences": the
# sentences of the first rationale are the steps.
CANONICAL_FIELDS = (
    "id", "image", "question", "steps", "answer",
    "choices", "correct_choice_idx", "direct_answers", "difficult_direct_answer",
)
# The Hub dataset names its splits train/validation/test; the official files train/val/test.
_HF_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
_OFFICIAL_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text):
    """Split on whitespace after `.`, `!` or `?`; a rationale without final punctuation stays one sentence."""
    return [sentence.strip() for sentence in _SENTENCE_END.split(text.strip()) if sentence.strip()]


def aokvqa_to_canonical(example, image, steps_from="rationales", require_rationales=True):
    """One A-OKVQA example (official or Hub fields) → `(record, None)`, or `(None, reason)` when it must be skipped.

    Skip reasons: `"choices"` (not exactly 4), `"correct_choice_idx"` (present but not an int in 0..3),
    `"no_rationales"` (no non-empty rationale while `require_rationales`). A missing `correct_choice_idx` (test split)
    gives an unlabeled record: `answer` None.
    """
    if steps_from not in STEPS_FROM:
        raise ValueError(f"steps_from must be one of {STEPS_FROM}, got {steps_from!r}")
    choices = example.get("choices")
    if not isinstance(choices, (list, tuple)) or len(choices) != 4:
        return None, "choices"
    idx = example.get("correct_choice_idx")
    if idx is not None and (isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < 4):
        return None, "correct_choice_idx"
    rationales = [r.strip() for r in (example.get("rationales") or []) if r and r.strip()]
    if require_rationales and not rationales:
        return None, "no_rationales"
    if not rationales:
        steps = []
    elif steps_from == "rationales":
        steps = rationales
    else:
        steps = split_sentences(rationales[0])
    record = {
        "id": str(example["question_id"]),
        "image": image,
        "question": render_choices(example["question"], choices),
        "steps": steps,
        "answer": None if idx is None else f"{CHOICE_LETTERS[idx]}. {choices[idx]}",
        "choices": list(choices),
        "correct_choice_idx": idx,
        "direct_answers": _direct_answers(example.get("direct_answers"), example["question_id"]),
        "difficult_direct_answer": example.get("difficult_direct_answer"),
    }
    return record, None


def _direct_answers(value, question_id):
    # The Hub copy stores the ten answers as the repr of a Python list; the official JSON as a list.
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"A-OKVQA {question_id}: direct_answers {value!r} is not a list literal") from error
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise ValueError(f"A-OKVQA {question_id}: direct_answers must be a list of strings, got {value!r}")
    return list(value)


def _require_rationales(require_rationales, split):
    return split == "train" if require_rationales is None else require_rationales


def log_skips(source, skipped, kept):
    """Report the skip counts of one build, once, at WARNING when anything was skipped."""
    if skipped:
        details = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
        logger.warning("%s: kept %d records, skipped %d (%s)", source, kept, sum(skipped.values()), details)
    else:
        logger.info("%s: kept %d records, skipped none", source, kept)


def _is_saved_dataset(path):
    path = Path(path)
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_hf_aokvqa(split, dataset_id=HF_AOKVQA_ID, steps_from="rationales", require_rationales=None, **load_kwargs):
    """A-OKVQA from the Hugging Face Hub (or a local copy) as a `datasets.Dataset` of canonical records.

    Args:
        split: `"train"`, `"validation"` (alias `"val"`) or `"test"`.
        dataset_id: a Hub id or anything `datasets.load_dataset` accepts; a directory written by
            `save_to_disk` (a `DatasetDict` with this split, or a single `Dataset`) is read with `load_from_disk`.
        steps_from: `"rationales"` (each rationale a step) or `"first_rationale_sentences"`.
        require_rationales: skip (and count) records without rationales; default: only for the train split.
        load_kwargs: passed to `datasets.load_dataset` (`cache_dir`, `revision`, ...).

    The images stay in the dataset's own (lazily decoded) `image` column, so nothing is decoded here and
    memory does not grow with the split; indexing the result decodes one image.
    """
    hf_split = _HF_SPLITS.get(split)
    if hf_split is None:
        raise ValueError(f"unknown A-OKVQA split {split!r}; expected one of {sorted(_HF_SPLITS)}")
    if _is_saved_dataset(dataset_id):
        loaded = datasets.load_from_disk(str(dataset_id))
        if isinstance(loaded, datasets.DatasetDict):
            if hf_split not in loaded:
                raise ValueError(f"{dataset_id} has splits {sorted(loaded)}, not {hf_split!r}")
            loaded = loaded[hf_split]
    else:
        loaded = datasets.load_dataset(dataset_id, split=hf_split, **load_kwargs)
    missing = {"image", "question_id", "question", "choices"} - set(loaded.column_names)
    if missing:
        raise ValueError(f"{dataset_id} ({hf_split}) lacks the A-OKVQA columns {sorted(missing)}")

    need_rationales = _require_rationales(require_rationales, hf_split)
    text = loaded.select_columns([c for c in loaded.column_names if c != "image"])
    rows, keep, skipped = [], [], Counter()
    empty = dict.fromkeys(CANONICAL_FIELDS[2:])
    for i, example in enumerate(text):
        record, reason = aokvqa_to_canonical(example, None, steps_from, need_rationales)
        if reason is not None:
            skipped[reason] += 1
            rows.append({"id": str(example["question_id"]), **empty, "steps": [], "choices": []})
            continue
        keep.append(i)
        rows.append({k: v for k, v in record.items() if k != "image"})
    log_skips(f"A-OKVQA {dataset_id} [{hf_split}]", skipped, len(keep))
    # Text columns built here, images joined by column: the image bytes are neither decoded nor copied.
    features = datasets.Features({
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "steps": datasets.List(datasets.Value("string")),
        "answer": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "correct_choice_idx": datasets.Value("int64"),
        "direct_answers": datasets.List(datasets.Value("string")),
        "difficult_direct_answer": datasets.Value("bool"),
    })
    canonical = datasets.Dataset.from_list(rows, features=features)
    joined = datasets.concatenate_datasets([canonical, loaded.select_columns(["image"])], axis=1)
    return joined.select(keep)


def load_official_aokvqa(aokvqa_dir, coco_dir, split, steps_from="rationales", require_rationales=None):
    """A-OKVQA from the official release: `{aokvqa_dir}/aokvqa_v1p0_{split}.json` and COCO 2017 images at
    `{coco_dir}/{split}2017/{image_id:012}.jpg`. Returns a list of canonical records (image = path string).

    Image files are checked when the training/evaluation dataset is built, not here.
    """
    official_split = _OFFICIAL_SPLITS.get(split)
    if official_split is None:
        raise ValueError(f"unknown A-OKVQA split {split!r}; expected one of {sorted(_OFFICIAL_SPLITS)}")
    path = Path(aokvqa_dir) / f"aokvqa_v1p0_{official_split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"A-OKVQA annotations not found: {path}")
    with open(path, encoding="utf-8") as f:
        examples = json.load(f)
    if not isinstance(examples, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(examples).__name__}")
    need_rationales = _require_rationales(require_rationales, official_split)
    records, skipped = [], Counter()
    for example in examples:
        image = os.path.join(coco_dir, f"{official_split}2017", f"{int(example['image_id']):012d}.jpg")
        record, reason = aokvqa_to_canonical(example, image, steps_from, need_rationales)
        if reason is not None:
            skipped[reason] += 1
        else:
            records.append(record)
    log_skips(f"A-OKVQA {path}", skipped, len(records))
    return records


def load_canonical(path):
    """Canonical records from a JSON list or a JSONL file (one record per line).

    Required per record: `question` (str), `steps` (list of str, may be empty), `answer` (str, or null when
    unlabeled). Optional: `id` (default: the record's position in the file, as a string), `image` (a path,
    relative paths resolved against the file's directory; null or absent for text-only), `choices`,
    `correct_choice_idx`, `direct_answers`, `difficult_direct_answer`. Unknown fields are an error.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            raw = []
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({error})") from error
        else:
            raw = json.load(f)
            if not isinstance(raw, list):
                raise ValueError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    records, seen = [], set()
    for position, item in enumerate(raw):
        record = _validate_canonical(item, position, path)
        if record["id"] in seen:
            raise ValueError(f"{path}: duplicate record id {record['id']!r}")
        seen.add(record["id"])
        records.append(record)
    logger.info("%s: %d canonical records", path, len(records))
    return records


def _validate_canonical(item, position, path):
    where = f"{path} record {position}"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    unknown = set(item) - set(CANONICAL_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; allowed: {list(CANONICAL_FIELDS)}")
    if "id" in item and (isinstance(item["id"], bool) or not isinstance(item["id"], (str, int)) or item["id"] == ""):
        raise ValueError(f"{where}: 'id' must be a non-empty string or an integer, got {shorten(item['id'])} (leave "
                         "it out to number the records by position)")
    record = dict.fromkeys(CANONICAL_FIELDS)
    record.update(item)
    record["id"] = str(item.get("id", position))
    where = f"{path} record {record['id']!r}"
    check_text_fields(record, where)
    _check_multiple_choice(record, where)
    if record["image"] is not None:
        if not isinstance(record["image"], str):
            raise ValueError(f"{where}: 'image' must be a path string or null")
        record["image"] = os.path.normpath(os.path.join(path.parent, record["image"]))
    return record


def _check_multiple_choice(record, where):
    """The multiple-choice fields agree with each other and with what evaluation scores.

    Exactly four choices, as the A-OKVQA loaders require (which skip such questions; a canonical file is the
    user's own, so here it is an error). The answer line must parse, with the evaluation's own parser, to
    `choices[correct_choice_idx]`: otherwise the model would be trained on one answer and scored on another.
    """
    choices, idx, answer = record["choices"], record["correct_choice_idx"], record["answer"]
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(choice, str) for choice in choices):
            raise ValueError(f"{where}: 'choices' must be a list of strings, got {choices!r}")
        if len(choices) != len(CHOICE_LETTERS):
            raise ValueError(f"{where}: 'choices' must hold exactly {len(CHOICE_LETTERS)} choices, got {len(choices)}")
    if idx is not None:
        if choices is None:
            raise ValueError(f"{where}: 'correct_choice_idx' is given but 'choices' is not")
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(choices):
            raise ValueError(f"{where}: 'correct_choice_idx' must be an integer in 0..{len(choices) - 1}, got {idx!r}")
        if answer is not None:
            parsed = parse_answer(answer_text(answer), choices)
            if parsed.index != idx:
                said = parsed.reason or f"choice {parsed.letter} ({parsed.choice_text!r})"
                raise ValueError(
                    f"{where}: 'answer' {answer!r} does not name choices[correct_choice_idx] = "
                    f"{CHOICE_LETTERS[idx]}. {choices[idx]!r} (it reads as {said}); write it as "
                    f"'{CHOICE_LETTERS[idx]}. {choices[idx]}'"
                )
    direct = record["direct_answers"]
    if direct is not None and (not isinstance(direct, list) or not all(isinstance(a, str) for a in direct)):
        raise ValueError(f"{where}: 'direct_answers' must be a list of strings, got {direct!r}")
    difficult = record["difficult_direct_answer"]
    if difficult is not None and not isinstance(difficult, bool):
        raise ValueError(f"{where}: 'difficult_direct_answer' must be true or false, got {difficult!r}")




def load_records(source, split, *, dataset_id=HF_AOKVQA_ID, aokvqa_dir=None, coco_dir=None, path=None,
                 steps_from="rationales", require_rationales=None, limit=None):
    """Canonical records from one of `RECORD_SOURCES`, cut to the first `limit` — the one dispatcher that
    training and evaluation share.

    `aokvqa_hf` reads `dataset_id` (Hub id or `save_to_disk` folder); `aokvqa_official` needs `aokvqa_dir`
    and `coco_dir`; `canonical` reads the JSON/JSONL file `path` (`split` is then unused).
    """
    if source == "aokvqa_hf":
        records = load_hf_aokvqa(split, dataset_id, steps_from=steps_from, require_rationales=require_rationales)
    elif source == "aokvqa_official":
        if not (aokvqa_dir and coco_dir):
            raise ValueError("the aokvqa_official source needs both aokvqa_dir and coco_dir")
        records = load_official_aokvqa(aokvqa_dir, coco_dir, split, steps_from=steps_from,
                                       require_rationales=require_rationales)
    elif source == "canonical":
        if path is None:
            raise ValueError("the canonical source needs a JSON/JSONL file path")
        records = load_canonical(path)
    else:
        raise ValueError(f"unknown data source {source!r}; expected one of {RECORD_SOURCES}")
    if limit is not None and limit < len(records):
        records = records.select(range(limit)) if hasattr(records, "select") else records[:limit]
    return records


__all__ = [
    "load_records",
    "CANONICAL_FIELDS",
    "split_sentences",
    "render_choices",
    "aokvqa_to_canonical",
    "log_skips",
    "load_hf_aokvqa",
    "load_official_aokvqa",
    "load_canonical",
]
