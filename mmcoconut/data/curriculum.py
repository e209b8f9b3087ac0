"""Curriculum features: canonical records are tokenized once, then laid out per stage and mode on access.

Sequence of one sample (InternVL3 chat format, image optional):

    <|im_start|>user\\n <img><IMG_CONTEXT>×(tokens_per_tile·tiles)</img> \\n {question}<|im_end|>\\n<|im_start|>assistant\\n
    <|start-latent|> <|latent|>×n <|end-latent|>      (coconut, pause, no_thoughts)
    {step}\\n  for each step not replaced                (cot, coconut, pause, no_thoughts)
    Answer: {answer}<|im_end|>

Labels are -100 up to and including `<|end-latent|>` (image, question, thoughts) and the token ids elsewhere. With
`supervise_end_latent` the predictions made from `<|start-latent|>` and from each thought are supervised too: every
one but the last predicts `<|latent|>` (go on thinking), the last predicts `<|end-latent|>` (stop).
With `thought_supervision` the features also carry `thought_labels` `[n_latents, longest step]`: row k holds the
token ids of the written step latent k replaced (its `c_thought` latents share that step; -100 padding; latents
beyond the sample's steps get an all -100 row), the targets the model decodes each thought into.
Images are opened and tiled in `__getitem__`, i.e. in DataLoader workers; no float tiles are stored.
"""

import logging
import random
from collections import Counter, defaultdict
from pathlib import Path

import datasets
import torch

from configuration_mmcoconut import END_LATENT_TOKEN, LATENT_TOKEN, START_LATENT_TOKEN
from mmcoconut.data.records import check_text_fields
from mmcoconut.data.images import decoded_size, image_size, load_image
from mmcoconut.errors import UserValueError
from mmcoconut.modes import LATENT_MODES, MODE_TABLE, MODES
from mmcoconut.text.prompt import answer_text, step_text, user_prompt

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_MAX_LOGGED_BAD_IMAGES = 10
_MAX_LISTED_IDS = 5  # skipped record ids named per reason in the summary line
def _check_record(record, index):
    """The record's id, after checking the fields the layout needs."""
    record_id = record.get("id") if isinstance(record, dict) else None
    if record_id is None:
        raise ValueError(f"record at position {index} has no 'id' (canonical records need id, question, steps, answer)")
    check_text_fields(record, f"record {record_id!r}")
    return record_id


def _iter_undecoded(records):
    # A `datasets.Image` column would decode every image on iteration; read the raw bytes/path instead.
    if isinstance(records, datasets.Dataset) and isinstance(records.features.get("image"), datasets.Image):
        return iter(records.cast_column("image", datasets.Image(decode=False)))
    return iter(records)


class CurriculumDataset(torch.utils.data.Dataset):
    r"""
    Stage-formatted features for Coconut training on canonical records (see `data_aokvqa`).

    Construction tokenizes every record once, checks its image header and length, and drops (counting and
    logging once) the records that cannot be used. `set_stage(k)` then changes the layout of every later
    `__getitem__`; the set of samples (and so `len`) never changes with the stage.

    Args:
        records: a list of canonical records or a `datasets.Dataset` with canonical columns.
        processor: an `InternVLProcessor` whose tokenizer has the three latent tokens
            (`tokenizer.add_special_tokens({"additional_special_tokens": list(LATENT_TOKENS)},
            replace_extra_special_tokens=False)`).
        mode: `cot` (all steps, no latents), `coconut`, `no_cot` (answer only), `no_thoughts` (steps removed per
            stage, empty latent span) or `pause` (laid out like `coconut`, latents to be used as pause tokens).
        c_thought: latents per replaced step.
        max_latent_stage: stage `k <= max_latent_stage` replaces the first `k` steps (all of them when there are
            fewer); a stage above it replaces *all* steps with `max_latent_stage` steps' worth of latents
            (Coconut's final stage, for samples with more steps than `max_latent_stage`).
        pad_latent_to_max: every sample gets `min(stage, max_latent_stage)·c_thought` latents even when it has
            fewer steps; otherwise a sample gets `min(stage, max_latent_stage, len(steps))·c_thought`.
        uniform_prob: probability that a sample is laid out at a stage drawn uniformly from `0..len(steps)`
            instead of the current one (Coconut's mixing); the draw is a function of `(seed, stage, epoch, index)`.
        max_length: records whose sequence would exceed it at any stage are skipped (never truncated).
        skip_bad_samples: skip (count, log with the record id) records whose image is missing or unreadable
            instead of raising. With it, every image is fully decoded at construction (about 6 ms for a 640x480
            JPEG), so truncated or corrupted files are found before training starts; without it only the header
            is read there, and a file that does not decode raises in `__getitem__` (in DataLoader workers too)
            naming the record and file. A file that breaks after construction raises either way (a map-style
            dataset cannot drop an index it has already announced).
        max_tiles: cap on InternVL tiles per image (the thumbnail comes on top); `None` keeps the processor's
            own `max_patches`.
        require_answers: every record is trained on (train.py's datasets): a record without an answer is an error
            here, at construction, not when the sampler reaches it; with `skip_bad_samples` it is skipped and
            counted (`no_answer`). Without it, unlabeled records are kept for prompting (evaluation).
        supervise_end_latent: teach the model when to stop thinking (`coconut` mode with `pad_latent_to_max=False`,
            so that a sample's thought count follows its steps). The prediction made from the last position of the
            latent span (`<|start-latent|>` when it has no latents) is labelled `<|end-latent|>`, and the ones
            made from the positions before it `<|latent|>`. Why both: with the stop label alone, predicting
            `<|end-latent|>` from every thought costs nothing in the loss, so the model would stop at once; the
            `<|latent|>` labels make the stop a learned contrast between the two. `prompt_features` then ends
            the prompt at `<|start-latent|>` unless given `num_latents` (for `generate(thinking="adaptive")`).
        thought_supervision: add `thought_labels` to the training features (step-level supervision of the thoughts,
            see the module docstring); needs `coconut` mode, whose latents are continuous thoughts.

    Example:

    ```python
    >>> dataset = CurriculumDataset(records, processor, mode="coconut", c_thought=2, max_latent_stage=3)
    >>> dataset.set_stage(2)
    >>> features = dataset[0]   # input_ids, labels, num_tiles, and pixel_values when the record has an image
    ```
    """

    def __init__(
        self,
        records,
        processor,
        mode="coconut",
        c_thought=1,
        max_latent_stage=4,
        pad_latent_to_max=False,
        uniform_prob=0.0,
        max_length=None,
        skip_bad_samples=False,
        max_tiles=None,
        seed=0,
        supervise_end_latent=False,
        thought_supervision=False,
        require_answers=False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if c_thought < 1 or max_latent_stage < 0:
            raise ValueError(f"need c_thought >= 1 and max_latent_stage >= 0, got {c_thought}, {max_latent_stage}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob}")
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
        if supervise_end_latent and (mode != "coconut" or pad_latent_to_max):
            raise ValueError(
                "supervise_end_latent teaches when to stop thinking, so it needs mode='coconut' (continuous "
                "thoughts) and pad_latent_to_max=False (each sample's thought count follows its steps); got "
                f"mode={mode!r}, pad_latent_to_max={pad_latent_to_max}"
            )
        if thought_supervision and not MODE_TABLE[mode].fills_thoughts:
            raise ValueError(
                f"thought_supervision decodes continuous thoughts into the steps they replaced; mode {mode!r} has "
                "none (use mode='coconut')"
            )
        self.records = records
        self.processor = processor
        self.mode = mode
        self.c_thought = c_thought
        self.max_latent_stage = max_latent_stage
        self.pad_latent_to_max = pad_latent_to_max
        self.uniform_prob = uniform_prob
        self.max_length = max_length
        self.skip_bad_samples = skip_bad_samples
        self.max_tiles = max_tiles
        self.seed = seed
        self.supervise_end_latent = supervise_end_latent
        self.thought_supervision = thought_supervision
        self.require_answers = require_answers
        self.stage = 0
        self.epoch = 0
        self._resolve_token_ids()
        self.skipped = Counter()
        self.skipped_ids = defaultdict(list)  # reason -> ids of the skipped records, in record order
        self._entries = self._build()

    # ---- construction -------------------------------------------------------------------------------------

    def _resolve_token_ids(self):
        tokenizer = self.processor.tokenizer
        self.tokenizer = tokenizer
        names = {
            "start_latent_id": START_LATENT_TOKEN,
            "end_latent_id": END_LATENT_TOKEN,
            "latent_token_id": LATENT_TOKEN,
            "image_token_id": self.processor.image_token,
            "start_image_id": self.processor.start_image_token,
            "end_image_id": self.processor.end_image_token,
            "im_end_id": "<|im_end|>",
        }
        for attribute, token in names.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer has no {token!r}; add the latent tokens with tokenizer.add_special_tokens("
                    "{'additional_special_tokens': list(LATENT_TOKENS)}, replace_extra_special_tokens=False)"
                )
            setattr(self, attribute, token_id)
        self.tokens_per_tile = self.processor.image_seq_length
        self._reserved_ids = {
            self.start_latent_id, self.end_latent_id, self.latent_token_id,
            self.image_token_id, self.start_image_id, self.end_image_id,
        }

    def _tokenize(self, texts):
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _num_tiles(self, width, height):
        images_kwargs = {} if self.max_tiles is None else {"max_patches": self.max_tiles}
        return self.processor.image_processor.get_number_of_image_patches(height, width, images_kwargs)

    def _skip(self, reason, record_id):
        self.skipped[reason] += 1
        self.skipped_ids[reason].append(record_id)

    def _build(self):
        kept = []  # (record index, record without image, num_tiles)
        bad_logged = 0
        # Skipping promises that training will not stop on a bad image, so then every image is decoded now.
        size_of = decoded_size if self.skip_bad_samples else image_size
        for index, record in enumerate(_iter_undecoded(self.records)):
            record_id = _check_record(record, index)
            if self.require_answers and record.get("answer") is None:
                if not self.skip_bad_samples:
                    raise UserValueError(f"record {record_id!r} has no answer, and training needs one for every "
                                         "record; add it, drop the record, or set skip_bad_samples to skip it")
                self._skip("no_answer", record_id)
                continue
            num_tiles = 0
            if record.get("image") is not None:
                try:
                    width, height = size_of(record["image"], record_id)
                except ValueError as error:
                    if not self.skip_bad_samples:
                        raise
                    self._skip("bad_image", record_id)
                    if bad_logged < _MAX_LOGGED_BAD_IMAGES:
                        logger.warning("skipping: %s", error)
                        bad_logged += 1
                    continue
                num_tiles = self._num_tiles(width, height)
            kept.append((index, {k: v for k, v in record.items() if k != "image"}, num_tiles))

        prompts, steps, answers = [], [], []
        for _, record, num_tiles in kept:
            prompts.append(user_prompt(record["question"], self.processor.image_token if num_tiles else None))
            steps.extend(step_text(step) for step in record["steps"])
            if record.get("answer") is not None:
                answers.append(answer_text(record["answer"]))
        prompt_ids, step_ids, answer_ids = self._tokenize(prompts), self._tokenize(steps), self._tokenize(answers)

        entries, step_pos, answer_pos, shortest_too_long = [], 0, 0, None
        for (index, record, num_tiles), prompt in zip(kept, prompt_ids):
            n_steps = len(record["steps"])
            record_steps = step_ids[step_pos : step_pos + n_steps]
            step_pos += n_steps
            answer = None
            if record.get("answer") is not None:
                answer = answer_ids[answer_pos] + [self.im_end_id]
                answer_pos += 1
            entry = {
                "index": index,
                "id": record["id"],
                "prompt": prompt,
                "steps": record_steps,
                "answer": answer,
                "num_tiles": num_tiles,
                "reference": {
                    key: record.get(key)
                    for key in ("id", "answer", "choices", "correct_choice_idx", "direct_answers",
                                "difficult_direct_answer")
                },
            }
            self._check_tokens(entry)
            longest = self._longest(entry)
            if self.max_length is not None and longest > self.max_length:
                self._skip("too_long", record["id"])
                shortest_too_long = longest if shortest_too_long is None else min(shortest_too_long, longest)
                continue
            entries.append(entry)

        total = len(kept) + self.skipped["bad_image"] + self.skipped["no_answer"]
        details = self.skip_summary()
        if not entries:
            if not total:
                raise ValueError(f"CurriculumDataset({self.mode}): got no records")
            needs = "" if shortest_too_long is None else (
                f"; the shortest one needs max_length >= {shortest_too_long} (max_length is {self.max_length})"
            )
            raise ValueError(f"CurriculumDataset({self.mode}): all {total} records were skipped ({details}){needs}")
        if self.skipped:
            logger.warning(
                "CurriculumDataset(%s): kept %d of %d records, skipped %s", self.mode, len(entries), total, details
            )
        else:
            logger.info("CurriculumDataset(%s): kept all %d records", self.mode, len(entries))
        return entries

    def skip_summary(self):
        """`"reason: count (first ids), ..."` of the records construction skipped; `"none"` when it kept all."""
        if not self.skipped:
            return "none"
        parts = []
        for reason, count in sorted(self.skipped.items()):
            ids = self.skipped_ids[reason]
            listed = ", ".join(map(repr, ids[:_MAX_LISTED_IDS])) + (", ..." if len(ids) > _MAX_LISTED_IDS else "")
            parts.append(f"{reason}: {count} ({listed})")
        return ", ".join(parts)

    def _check_tokens(self, entry):
        # Text that spells a special token would be parsed as that token and silently misalign images or latents.
        placeholders = entry["prompt"].count(self.image_token_id)
        expected = 1 if entry["num_tiles"] else 0
        text_ids = [t for t in entry["prompt"] if t != self.image_token_id]
        text_ids += [t for step in entry["steps"] for t in step] + (entry["answer"] or [])
        if placeholders != expected or self._reserved_ids.intersection(text_ids):
            raise ValueError(
                f"record {entry['id']!r}: question, steps or answer contain image or latent special tokens "
                f"({self.processor.image_token}, <img>, </img> or the latent markers); remove them from the text"
            )

    def _image_span_length(self, num_tiles):
        return num_tiles * self.tokens_per_tile + 2 if num_tiles else 0

    def _longest(self, entry):
        """Longest sequence this entry can take over all stages of the mode (prompt only when unlabeled)."""
        base = len(entry["prompt"]) - (1 if entry["num_tiles"] else 0) + self._image_span_length(entry["num_tiles"])
        n_steps = len(entry["steps"])
        stages = range(self.max_latent_stage + 2) if self.mode in LATENT_MODES else (0,)
        longest = 0
        for stage in stages:
            n_skip, n_latents, markers = self._plan(n_steps, stage)
            length = base + n_latents + (2 if markers else 0)
            if entry["answer"] is not None:
                length += sum(len(step) for step in entry["steps"][n_skip:]) + len(entry["answer"])
            longest = max(longest, length)
        return longest

    # ---- stage layout -------------------------------------------------------------------------------------

    def _plan(self, n_steps, stage):
        """(steps removed, latent tokens, latent markers present) for a sample with `n_steps` steps at `stage`."""
        if self.mode == "cot":
            return 0, 0, False
        if self.mode == "no_cot":
            return n_steps, 0, False
        capped = min(stage, self.max_latent_stage)
        n_skip = n_steps if stage > self.max_latent_stage else min(stage, n_steps)
        n_latents = capped if self.pad_latent_to_max else min(capped, n_steps)
        if self.mode == "no_thoughts":
            n_latents = 0
        return n_skip, n_latents * self.c_thought, True

    def set_stage(self, stage, epoch=0):
        """Lay out every later sample at curriculum `stage`; `epoch` only reseeds the `uniform_prob` draw.

        DataLoader workers hold a copy of the dataset: a loader with `persistent_workers` must be recreated (or
        its workers told) after a stage change.
        """
        if stage < 0:
            raise ValueError(f"stage must be >= 0, got {stage}")
        self.stage = stage
        self.epoch = epoch

    def _sample_stage(self, position, n_steps):
        if self.uniform_prob == 0.0 or self.mode not in LATENT_MODES:
            return self.stage
        rng = random.Random(f"{self.seed}:{self.stage}:{self.epoch}:{position}")
        if rng.random() < self.uniform_prob:
            return rng.randrange(n_steps + 1)
        return self.stage

    def _latent_span(self, n_latents, markers):
        if not markers:
            return []
        return [self.start_latent_id] + [self.latent_token_id] * n_latents + [self.end_latent_id]

    def _latent_span_labels(self, n_latents, markers):
        """Labels of `_latent_span`: -100, or with `supervise_end_latent` the shifted targets of the thinking
        positions (`<|start-latent|>` and every latent): `<|latent|>` for all but the last, then `<|end-latent|>`."""
        if not (markers and self.supervise_end_latent):
            return [IGNORE_INDEX] * len(self._latent_span(n_latents, markers))
        return [IGNORE_INDEX] + [self.latent_token_id] * n_latents + [self.end_latent_id]

    def _image(self, entry):
        """(image span ids, pixel_values [tiles, 3, H, W]) from the processor, which expands the placeholder."""
        record = self.records[entry["index"]]
        image = load_image(record["image"], entry["id"])
        kwargs = {} if self.max_tiles is None else {"max_patches": self.max_tiles}
        out = self.processor(images=[image], text=[self.processor.image_token], return_tensors="pt", **kwargs)
        span, pixel_values = out["input_ids"][0].tolist(), out["pixel_values"]
        n_context = span.count(self.image_token_id)
        if pixel_values.shape[0] != entry["num_tiles"] or n_context != entry["num_tiles"] * self.tokens_per_tile:
            raise ValueError(
                f"record {entry['id']!r}: expected {entry['num_tiles']} tiles and "
                f"{entry['num_tiles'] * self.tokens_per_tile} image tokens, the processor gave "
                f"{pixel_values.shape[0]} tiles and {n_context} image tokens"
            )
        return span, pixel_values

    def _prompt(self, entry):
        """(prompt ids with the image expanded, pixel_values or None)."""
        if not entry["num_tiles"]:
            return list(entry["prompt"]), None
        span, pixel_values = self._image(entry)
        at = entry["prompt"].index(self.image_token_id)
        return entry["prompt"][:at] + span + entry["prompt"][at + 1 :], pixel_values

    @staticmethod
    def _features(input_ids, pixel_values, labels=None):
        features = {"input_ids": torch.tensor(input_ids, dtype=torch.long)}
        if labels is not None:
            features["labels"] = torch.tensor(labels, dtype=torch.long)
        features["num_tiles"] = 0 if pixel_values is None else pixel_values.shape[0]
        if pixel_values is not None:
            features["pixel_values"] = pixel_values
        return features

    def __len__(self):
        return len(self._entries)

    def __getitem__(self, position):
        """Training features at the current stage: `input_ids` [L], `labels` [L], `num_tiles` (int) and, for
        records with an image, `pixel_values` [num_tiles, 3, H, W]."""
        entry = self._entries[position]
        if entry["answer"] is None:
            raise ValueError(f"record {entry['id']!r} has no answer; unlabeled records can only be prompted")
        stage = self._sample_stage(position, len(entry["steps"]))
        n_skip, n_latents, markers = self._plan(len(entry["steps"]), stage)
        prompt, pixel_values = self._prompt(entry)
        span = self._latent_span(n_latents, markers)
        target = [t for step in entry["steps"][n_skip:] for t in step] + entry["answer"]
        labels = [IGNORE_INDEX] * len(prompt) + self._latent_span_labels(n_latents, markers) + target
        features = self._features(prompt + span + target, pixel_values, labels)
        if self.thought_supervision:
            features["thought_labels"] = self._thought_labels(entry["steps"][:n_skip], n_latents)
        return features

    def _thought_labels(self, replaced_steps, n_latents):
        """`[n_latents, longest step]`: latent k's row holds step `k // c_thought` of the replaced ones (-100 pads)."""
        rows = [
            replaced_steps[k // self.c_thought] if k // self.c_thought < len(replaced_steps) else []
            for k in range(n_latents)
        ]
        labels = torch.full((n_latents, max((len(row) for row in rows), default=0)), IGNORE_INDEX, dtype=torch.long)
        for k, row in enumerate(rows):
            labels[k, : len(row)] = torch.tensor(row, dtype=torch.long)
        return labels

    def num_latents(self, position, stage=None):
        """Latent tokens sample `position` gets at `stage` (default: the current stage), without mixing."""
        entry = self._entries[position]
        return self._plan(len(entry["steps"]), self.stage if stage is None else stage)[1]

    def prompt_features(self, position, num_latents=None):
        """Generation input: the prompt and, in latent modes, the latent span with `num_latents` latents
        (default: `num_latents(position)`; with `supervise_end_latent` the default is the open span,
        `<|start-latent|>` alone, for the model to think until it stops); no steps, no answer. Keys: `input_ids`,
        `num_tiles`, `id` and `pixel_values` for records with an image."""
        entry = self._entries[position]
        markers = self.mode in LATENT_MODES
        open_span = num_latents is None and self.supervise_end_latent
        if num_latents is None:
            num_latents = self.num_latents(position)
        elif num_latents and not markers:
            raise ValueError(f"mode {self.mode!r} has no latent span; num_latents must be 0 or None")
        prompt, pixel_values = self._prompt(entry)
        span = [self.start_latent_id] if open_span else self._latent_span(num_latents, markers)
        features = self._features(prompt + span, pixel_values)
        features["id"] = entry["id"]
        return features

    def reference(self, position):
        """What evaluation compares against: `id`, `answer`, `choices`, `correct_choice_idx`, `direct_answers`,
        `difficult_direct_answer` (None where the record has none)."""
        return dict(self._entries[position]["reference"])

    def prompt_dataset(self, num_latents=None):
        """A map-style view of `prompt_features` for a DataLoader (batch with `MMCoconutCollator(pad_to="end")`)."""
        return PromptDataset(self, num_latents)


class PromptDataset(torch.utils.data.Dataset):
    """`dataset.prompt_features(i, num_latents)` for every sample of a `CurriculumDataset`."""

    def __init__(self, dataset, num_latents=None):
        self.dataset = dataset
        self.num_latents = num_latents

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, position):
        return self.dataset.prompt_features(position, self.num_latents)


__all__ = [
    "IGNORE_INDEX",
    "CurriculumDataset",
    "PromptDataset",
]
