"""A-OKVQA evaluation: batched generation, answer parsing, official scoring, output files.

Used by `evaluate_aokvqa.py` (the CLI) and by validation during training. One evaluation is:

1. `build_eval_dataset`: canonical records → a `CurriculumDataset` laid out for an evaluation mode;
2. `generate_answers`: batched generation on left-padded prompts (decoding as the model's generation_config
   says, unless the caller sets `do_sample`, `temperature`, `top_p`), sharded across
   processes under `accelerate launch`, parsed into one dict per question (gathered on every rank);
3. `score`: the A-OKVQA `evaluate` metric (`metrics/aokvqa`) on those dicts;
4. `write_outputs`: `predictions_{split}.json`, `samples_{split}.jsonl` and `metrics_{split}.json`, never over
   an earlier run's files unless asked (`check_outputs_free`).

`evaluate_model` runs 2 and 3 and adds throughput numbers.

Modes and the prompt they give the model (the assistant turn is left open):

    vanilla   <|im_start|>user\\n<img>…</img>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n
    cot       the same prompt; a CoT-trained model writes its steps, then `Answer: ...`
    coconut   the same prompt + <|start-latent|> <|latent|>×n <|end-latent|>

`vanilla` and `cot` prompts are identical (they are the `no_cot` and `cot` layouts of the data); what differs is
how the model was trained to continue, and the default generation budget.

Unparseable answers: the per-sample log and the metric get `None`; the official predictions file, whose format
needs strings, gets `""` for both fields. `""` is never a choice nor a human answer, so the question scores 0 in
both settings, as it does here; the official script in strict mode rejects it (`assert pred in choices`) rather
than letting it pass as a choice. No answer is ever replaced by a default choice.
"""

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from data_collator import MMCoconutCollator
from mmcoconut.constants import EVAL_MODES
from mmcoconut.data.curriculum import CurriculumDataset
from mmcoconut.errors import UserFileExistsError
from mmcoconut.evaluation.metric import aokvqa_accuracy
from mmcoconut.inference.decoding import after_thinking, eos_ids, until_eos
from mmcoconut.text.answers import direct_answer_from, parse_answer

logger = logging.getLogger(__name__)

# Evaluation mode → the `CurriculumDataset` layout whose prompt it uses.
DATASET_MODES = {"vanilla": "no_cot", "cot": "cot", "coconut": "coconut"}
# Written in the official predictions file for an unparseable answer (see the module docstring).
UNPARSEABLE_PREDICTION = ""


@dataclass
class EvaluationResult:
    """What `evaluate_model` returns.

    Attributes:
        samples: one dict per question, in dataset order (see `generate_answers`).
        metrics: `mc_accuracy`, `da_accuracy` (None for unlabeled splits), `num_unparseable`, `num_samples`,
            `num_da_samples`, `num_without_eos`, `mean_generated_tokens`, `samples_per_second`, `seconds`.
    """

    samples: list
    metrics: dict


def default_num_latents(config):
    """Latents a checkpoint is prompted with (`MMCoconutConfig.num_inference_latents`)."""
    return config.num_inference_latents


def build_eval_dataset(records, processor, mode, config, max_tiles=None, skip_bad_samples=False, thinking=None):
    """A `CurriculumDataset` whose `prompt_dataset` gives the prompts of evaluation `mode`.

    Args:
        records: canonical records (a list or a `datasets.Dataset`), e.g. from `data_aokvqa`.
        processor: the checkpoint's `InternVLProcessor` (its tokenizer holds the latent tokens).
        mode: one of `EVAL_MODES`.
        config: the model's `MMCoconutConfig` (for `c_thought` and `latent_stage`).
        max_tiles: cap on InternVL tiles per image; None keeps the processor's own.
        skip_bad_samples: skip (count, log) records with unreadable images instead of raising.
        thinking: `fixed` or `adaptive` (mode coconut; None: `config.default_thinking`). Adaptive prompts end at
            `<|start-latent|>`, and the model decides how many thoughts follow.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
    adaptive = mode == "coconut" and (thinking or config.default_thinking) == "adaptive"
    return CurriculumDataset(
        records,
        processor,
        mode=DATASET_MODES[mode],
        c_thought=config.c_thought,
        max_latent_stage=config.latent_stage,
        max_tiles=max_tiles,
        skip_bad_samples=skip_bad_samples,
        supervise_end_latent=adaptive,  # the open span `<|start-latent|>` as each prompt's end
    )


def decoding_settings(generation_config, do_sample=None, temperature=None, top_p=None):
    """The decoding `generate` runs with, to record beside the results: each option given (not None), else
    `generation_config`'s (a checkpoint's saved settings), else transformers' default. `temperature`, `top_p` and
    `top_k` (the generation config's; evaluation sets none) are None under greedy decoding, which ignores them."""
    defaults = GenerationConfig._get_default_generation_params()  # what generate fills in for options still unset
    settings = {}
    for name, value in {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "top_k": None}.items():
        if value is None:
            value = getattr(generation_config, name)
        settings[name] = defaults[name] if value is None else value
    if not settings["do_sample"]:
        settings.update(temperature=None, top_p=None, top_k=None)
    return settings


def _shard(num_samples, state):
    """This process's positions of `range(num_samples)`: (positions, number of real ones at the front).

    accelerate's `split_between_processes(apply_padding=True)` gives every process a contiguous slice, lower ranks
    first, all of the same length `ceil(num_samples / num_processes)`: a short slice is padded with copies of the last
    position. Equal lengths mean equal numbers of `generate` calls per rank, which sharded models need (generate runs
    with `synced_gpus`: a rank that stopped calling it would leave the others waiting forever). The padded copies are
    generated and dropped. accelerate does not say which entries are padding, and a copy of the last position cannot
    be told from the real one by value (padded copies on earlier ranks even come before it in the gathered order), so
    the same split without padding gives the number of real positions: accelerate pads by appending to that slice.

    Args:
        num_samples: the number of questions.
        state: an `Accelerator` or `PartialState` (anything with `split_between_processes`); None: this process
            alone takes every position.
    """
    positions = list(range(num_samples))
    if state is None:
        return positions, num_samples
    with state.split_between_processes(positions) as real:
        num_real = len(real)
    with state.split_between_processes(positions, apply_padding=True) as padded:
        return list(padded), num_real


def _prompt_text(tokenizer, ids, image_token_id, image_token):
    """The prompt as text, each run of image-context tokens written once as `<IMG_CONTEXT>×N`."""
    runs, compact = [], []
    for token in ids:
        if token == image_token_id and compact and compact[-1] == image_token_id:
            runs[-1] += 1
            continue
        if token == image_token_id:
            runs.append(1)
        compact.append(token)
    text = tokenizer.decode(compact, skip_special_tokens=False)
    counts = iter(runs)
    return re.sub(re.escape(image_token), lambda _: f"{image_token}×{next(counts)}", text)


def _sample_record(dataset, position, prompt_ids, new_ids, eos, latent_token_id, thoughts):
    """One question's result dict (see `generate_answers`)."""
    reference = dataset.reference(position)
    tokenizer = dataset.tokenizer
    new_ids = after_thinking(prompt_ids, new_ids, dataset.start_latent_id, dataset.end_latent_id)
    answer_ids, num_generated, stopped = until_eos(new_ids, eos)
    generated_text = tokenizer.decode(answer_ids, skip_special_tokens=False)
    parsed = parse_answer(generated_text, reference["choices"])
    correct_idx = reference.get("correct_choice_idx")
    return {
        "question_id": reference["id"],
        "prompt": _prompt_text(tokenizer, prompt_ids, dataset.image_token_id, dataset.processor.image_token),
        "generated_text": generated_text,
        "parsed_letter": parsed.letter,
        "parse_error": parsed.reason,
        "prediction": {"multiple_choice": parsed.choice_text, "direct_answer": direct_answer_from(parsed)},
        # None on unlabeled splits (A-OKVQA test); an unparseable answer is False.
        "correct": None if correct_idx is None else parsed.index == correct_idx,
        "num_generated_tokens": num_generated,
        "stopped_at_eos": stopped,
        "num_latents": prompt_ids.count(latent_token_id),
        "thoughts": thoughts,
    }


def generate_answers(
    model,
    dataset,
    *,
    num_latents=None,
    thinking=None,
    max_thoughts=None,
    end_latent_threshold=None,
    batch_size=8,
    max_new_tokens=256,
    do_sample=None,
    temperature=None,
    top_p=None,
    accelerator=None,
    num_workers=0,
    show_progress=True,
):
    """Generate, decode and parse an answer for every question of `dataset`.

    Args:
        model: an (unwrapped) `MMCoconutForConditionalGeneration`, or anything with its `generate`, `config`
            (`latent_token_id`) and `generation_config` (`eos_token_id`).
        dataset: a `CurriculumDataset` (see `build_eval_dataset`); its processor's tokenizer decodes.
        num_latents: latents in every prompt of a latent mode; None lays each sample out at the dataset's current
            stage (as in training). Must be None or 0 for `cot` / `no_cot` datasets.
        batch_size: prompts per `generate` call (per process).
        thinking, max_thoughts, end_latent_threshold: `model.generate`'s thinking options (None: the model's
            defaults, i.e. adaptive thinking for checkpoints trained with `supervise_end_latent`).
        max_new_tokens: passed to `model.generate`.
        do_sample, temperature, top_p: passed to `model.generate` when given; None keeps the model's
            `generation_config` (a checkpoint's saved settings; see `decoding_settings`).
        accelerator: an `accelerate.Accelerator` to shard the questions across its processes; every rank gets the
            same number of batches (short ranks repeat a question, dropped afterwards), and the results are
            gathered on every rank. None runs everything in this process.
        num_workers: DataLoader workers (images are tiled in them).
        show_progress: a tqdm bar over batches (main process only).

    Returns:
        One dict per question, in dataset order, with `question_id`, `prompt` (image tokens collapsed to
        `<IMG_CONTEXT>×N`), `generated_text` (up to, without, the first EOS), `parsed_letter` (None when
        unparseable), `parse_error`, `prediction` (`multiple_choice` and `direct_answer`, None when unparseable),
        `correct` (None when the record has no answer), `num_generated_tokens` (up to and including the first
        EOS; padding after it is not counted; thoughts not included), `stopped_at_eos`, `num_latents` (in the
        prompt) and `thoughts` (the continuous thoughts the answer followed: the prompt's latents, or the number
        adaptive thinking chose).
    """
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty; nothing to generate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Checked before generating: finding it after the first batch wastes the whole generation.
    without_choices = [dataset.reference(i)["id"] for i in range(len(dataset)) if not dataset.reference(i)["choices"]]
    if without_choices:
        raise ValueError(
            f"{len(without_choices)} record(s) have no 'choices' (first: {without_choices[0]!r}); A-OKVQA evaluation "
            "scores multiple-choice answers. Ask free-form questions with predict.py."
        )
    latent_token_id = model.config.latent_token_id
    if dataset.latent_token_id != latent_token_id:
        raise ValueError(
            f"the tokenizer's <|latent|> is id {dataset.latent_token_id} but the model's config says "
            f"{latent_token_id}; load the processor saved with this checkpoint"
        )
    eos = eos_ids(model)
    positions, num_real = _shard(len(dataset), accelerator)

    parameter = next(model.parameters())
    device = accelerator.device if accelerator is not None else parameter.device
    dtype = getattr(model, "dtype", parameter.dtype)
    collator = MMCoconutCollator(
        pad_token_id=dataset.tokenizer.pad_token_id, latent_token_id=latent_token_id, pad_to="end"
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset.prompt_dataset(num_latents), positions),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collator,
        num_workers=num_workers,
    )
    options = {
        "thinking": thinking, "max_thoughts": max_thoughts, "end_latent_threshold": end_latent_threshold,
        "do_sample": do_sample, "temperature": temperature, "top_p": top_p,
    }
    # Options left None are not passed, so the model's generation_config decides them, as in `generate`.
    given_options = {name: value for name, value in options.items() if value is not None}
    is_main = accelerator is None or accelerator.is_main_process
    was_training = model.training
    model.eval()
    local, seen = [], 0
    try:
        for batch in tqdm(loader, desc="A-OKVQA generate", unit="batch", disable=not (show_progress and is_main)):
            batch.pop("ids")
            batch.pop("position_ids")  # generate derives positions from the attention mask
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            pixel_values = batch.get("pixel_values")
            if pixel_values is not None:
                pixel_values = pixel_values.to(device=device, dtype=dtype)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                num_tiles=batch["num_tiles"].to(device),
                max_new_tokens=max_new_tokens,
                return_dict_in_generate=True,
                **given_options,
            )
            new_tokens = output.sequences[:, input_ids.shape[1] :].tolist()
            thoughts = output.num_thoughts.tolist()
            prompt_width = input_ids.shape[1]
            for row in range(input_ids.shape[0]):
                if seen < num_real:
                    prompt_ids = input_ids[row, prompt_width - int(attention_mask[row].sum()) :].tolist()
                    record = _sample_record(
                        dataset, positions[seen], prompt_ids, new_tokens[row], eos, latent_token_id, thoughts[row]
                    )
                    local.append((positions[seen], record))
                seen += 1
    finally:
        model.train(was_training)

    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        local = gather_object(local)  # every rank's real results, rank after rank: contiguous slices in order
    scored = [position for position, _ in local]
    if scored != list(range(len(dataset))):  # the split's promise, checked: each question once, in dataset order
        wrong = next(i for i, position in enumerate(scored + [None]) if position != i)
        raise RuntimeError(
            f"the processes returned {len(scored)} results for {len(dataset)} questions, the first out of place at "
            f"index {wrong}; each question must be scored exactly once, in dataset order"
        )
    return [record for _, record in local]


def _metric_reference(reference):
    if reference.get("correct_choice_idx") is None:
        raise ValueError(f"record {reference['id']!r} has no correct_choice_idx; an unlabeled split cannot be scored")
    difficult = bool(reference.get("difficult_direct_answer"))  # not marked difficult = scored for DA
    if not difficult and not reference.get("direct_answers"):
        raise ValueError(
            f"record {reference['id']!r} has no direct_answers; DA accuracy needs them "
            "(or mark the record difficult_direct_answer)"
        )
    return {
        "choices": list(reference["choices"]),
        "correct_choice_idx": int(reference["correct_choice_idx"]),
        "direct_answers": list(reference.get("direct_answers") or []),
        "difficult_direct_answer": difficult,
    }


def score(samples, references):
    """A-OKVQA MC and DA accuracy of `generate_answers` output with the repo's `evaluate` metric.

    Args:
        samples: dicts from `generate_answers` (their `prediction` is read; None = unparseable).
        references: `CurriculumDataset.reference(i)` dicts in the same order.

    Returns:
        The metric's dict: `mc_accuracy`, `da_accuracy` (None instead of NaN when every question is marked
        difficult), `num_unparseable`, `num_samples`, `num_da_samples`.
    """
    if len(samples) != len(references):
        raise ValueError(f"{len(samples)} samples but {len(references)} references")
    for sample, reference in zip(samples, references):
        if sample["question_id"] != reference["id"]:
            raise ValueError(f"sample {sample['question_id']!r} is paired with reference {reference['id']!r}")
    metrics = aokvqa_accuracy(
        [sample["prediction"] for sample in samples],
        [_metric_reference(reference) for reference in references],
    )
    if math.isnan(metrics["da_accuracy"]):
        metrics["da_accuracy"] = None  # JSON has no NaN; the metric has logged why
    return metrics


def evaluate_model(model, dataset, **generation_kwargs):
    """Generate on every question of `dataset` and score it: the entry point for validation during training.

    `generation_kwargs` are those of `generate_answers` (`num_latents`, `batch_size`, `max_new_tokens`,
    `accelerator`, ...). A split without answers (A-OKVQA test) is generated and parsed but not scored: its
    accuracies are None. Returns an `EvaluationResult`; every rank gets the same one.
    """
    start = time.perf_counter()
    samples = generate_answers(model, dataset, **generation_kwargs)
    seconds = time.perf_counter() - start
    references = [dataset.reference(i) for i in range(len(dataset))]
    labeled = [reference.get("correct_choice_idx") is not None for reference in references]
    if all(labeled):
        metrics = score(samples, references)
    elif not any(labeled):
        logger.warning("no record has an answer (e.g. the A-OKVQA test split): predictions only, no accuracy")
        metrics = {
            "mc_accuracy": None,
            "da_accuracy": None,
            "num_unparseable": sum(sample["parsed_letter"] is None for sample in samples),
            "num_samples": len(samples),
            "num_da_samples": 0,
        }
    else:
        unlabeled = [reference["id"] for reference, has in zip(references, labeled) if not has]
        raise ValueError(
            f"{len(unlabeled)} of {len(references)} records have no correct_choice_idx (first: {unlabeled[:3]}); "
            "score a split that is fully labeled or fully unlabeled"
        )
    metrics.update(
        num_without_eos=sum(not sample["stopped_at_eos"] for sample in samples),
        mean_generated_tokens=sum(sample["num_generated_tokens"] for sample in samples) / len(samples),
        mean_thoughts=sum(sample["thoughts"] for sample in samples) / len(samples),
        samples_per_second=len(samples) / seconds,
        seconds=seconds,
    )
    return EvaluationResult(samples=samples, metrics=metrics)


def official_predictions(samples):
    """`{question_id: {"multiple_choice": str, "direct_answer": str}}`, the official A-OKVQA format;
    unparseable answers are written as `UNPARSEABLE_PREDICTION` (see the module docstring)."""
    predictions = {}
    for sample in samples:
        if sample["question_id"] in predictions:
            raise ValueError(f"question id {sample['question_id']!r} occurs twice")
        predictions[sample["question_id"]] = {
            field: UNPARSEABLE_PREDICTION if value is None else value for field, value in sample["prediction"].items()
        }
    return predictions


def output_paths(output_dir, split):
    """Where `write_outputs` puts the results of `split`: a dict with keys `predictions`, `samples`, `metrics`.

    Every file is named after its split, so runs on different splits can share a directory and never mix."""
    output_dir = Path(output_dir)
    return {
        "predictions": output_dir / f"predictions_{split}.json",
        "samples": output_dir / f"samples_{split}.jsonl",
        "metrics": output_dir / f"metrics_{split}.json",
    }


def check_outputs_free(output_dir, split, overwrite=False):
    """Refuse (`UserFileExistsError`, a FileExistsError) when `output_dir` already holds results of `split`, unless
    `overwrite`.

    Called before the model is loaded, so a clash costs nothing; `write_outputs` checks again."""
    existing = [str(path) for path in output_paths(output_dir, split).values() if path.exists()]
    if existing and not overwrite:
        raise UserFileExistsError(
            f"{output_dir} already holds results of split {split!r} ({', '.join(existing)}); "
            "pass --overwrite to replace them, or choose another --output-dir"
        )


def write_outputs(output_dir, split, samples, metrics, overwrite=False):
    """Write `predictions_{split}.json`, `samples_{split}.jsonl` and `metrics_{split}.json` under `output_dir`.

    Refuses to replace an earlier run's files of `split` unless `overwrite`. Returns the three paths as a dict with
    keys `predictions`, `samples`, `metrics`.
    """
    check_outputs_free(output_dir, split, overwrite)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    paths = output_paths(output_dir, split)
    with open(paths["predictions"], "w", encoding="utf-8") as f:
        json.dump(official_predictions(samples), f, indent=1, ensure_ascii=False)
    with open(paths["samples"], "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    with open(paths["metrics"], "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1, allow_nan=False)
    for kind, path in paths.items():
        logger.info("wrote %s: %s", kind, path)
    return paths


def _format_value(value):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _skipped_cell(metrics):
    """`num_skipped`, with the count per reason (`bad_image`, `too_long`) when there are any."""
    if "num_skipped" not in metrics:
        return None
    reasons = metrics.get("skipped") or {}
    details = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
    return f"{metrics['num_skipped']} ({details})" if details else metrics["num_skipped"]


def _decoding_cell(metrics):
    """`greedy`, or `sampled (temperature 0.7, top_p 0.9, top_k 50)` (see `decoding_settings`)."""
    if "do_sample" not in metrics:
        return None
    if not metrics["do_sample"]:
        return "greedy"
    return "sampled (" + ", ".join(f"{name} {metrics[name]}" for name in ("temperature", "top_p", "top_k")) + ")"


def format_summary(metrics, title="A-OKVQA evaluation"):
    """A two-column text table of the main numbers (accuracies in percent)."""
    rows = [
        ("MC accuracy (%)", None if metrics.get("mc_accuracy") is None else f"{100 * metrics['mc_accuracy']:.2f}"),
        ("DA accuracy (%)", None if metrics.get("da_accuracy") is None else f"{100 * metrics['da_accuracy']:.2f}"),
        ("questions", metrics.get("num_samples")),
        ("questions skipped", _skipped_cell(metrics)),
        ("questions scored for DA", metrics.get("num_da_samples")),
        ("unparseable answers", metrics.get("num_unparseable")),
        ("answers without EOS", metrics.get("num_without_eos")),
        ("mean generated tokens", metrics.get("mean_generated_tokens")),
        ("mean thoughts", metrics.get("mean_thoughts")),
        ("samples / s", metrics.get("samples_per_second")),
        ("decoding", _decoding_cell(metrics)),
        ("max new tokens", metrics.get("max_new_tokens")),
    ]
    for key in ("split", "mode", "thinking", "num_latents", "model"):
        if key in metrics:
            rows.insert(0, (key, metrics[key]))
    cells = [(name, _format_value(value)) for name, value in rows]
    left = max(len(name) for name, _ in cells)
    right = max(len(value) for _, value in cells)
    rule = f"+{'-' * (left + 2)}+{'-' * (right + 2)}+"
    lines = [title, rule] + [f"| {name:<{left}} | {value:>{right}} |" for name, value in cells] + [rule]
    return "\n".join(lines)


__all__ = [
    "DATASET_MODES",
    "UNPARSEABLE_PREDICTION",
    "EvaluationResult",
    "default_num_latents",
    "decoding_settings",
    "build_eval_dataset",
    "generate_answers",
    "score",
    "evaluate_model",
    "official_predictions",
    "output_paths",
    "check_outputs_free",
    "write_outputs",
    "format_summary",
]
