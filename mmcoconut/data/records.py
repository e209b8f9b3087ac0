"""The canonical record (`{"id", "image", "question", "steps", "answer", ...}`): the one check of its text fields.

Both ways records arrive use it: files read by `mmcoconut.data.aokvqa.load_canonical` and records handed straight to
`CurriculumDataset` (an HF dataset, a list built in a notebook).
"""


def check_text_fields(record, where):
    """`question` a string, `steps` a list of strings, `answer` a string or null; a ValueError naming `where`."""
    if not isinstance(record.get("question"), str):
        raise ValueError(f"{where}: 'question' must be a string")
    steps = record.get("steps")
    if not isinstance(steps, (list, tuple)) or not all(isinstance(step, str) for step in steps):
        raise ValueError(f"{where}: 'steps' must be a list of strings")
    if record.get("answer") is not None and not isinstance(record["answer"], str):
        raise ValueError(f"{where}: 'answer' must be a string or null")


def unlabeled_ids(records):
    """Ids of the records without an answer (a list of records or a `datasets.Dataset`), read from the text columns
    only: no image is decoded."""
    if hasattr(records, "column_names"):  # a datasets.Dataset: whole columns, without decoding an image
        return [rid for rid, answer in zip(records["id"], records["answer"]) if answer is None]
    return [record.get("id") for record in records if record.get("answer") is None]


__all__ = ["check_text_fields", "unlabeled_ids"]
