"""The Coconut curriculum on top of transformers' Trainer.

The stage is a pure function of the epoch (`stage_for_epoch`). `CurriculumCallback` pushes it into
the training dataset at the start of every epoch and, at the first step of a new stage, clears the
optimizer state. The learning-rate schedule restarts at every stage boundary by construction: the
scheduler's multiplier is a function of the global step's position inside its stage, so it needs no
rebuilding and resumes from a checkpoint like any other scheduler.
"""

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import unwrap_peft_model

from mmcoconut.modes import mode as mode_named
from mmcoconut.processing import prepare_for_inference

logger = logging.getLogger(__name__)

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class CurriculumTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments` plus `overwrite_output_dir` (which transformers 5 dropped): a new run refuses
    an `output_dir` that holds a previous run, whose checkpoints the new one would rotate away. Defined here, in an
    installed module, so that the `training_args.bin` a checkpoint pickles can be read back anywhere."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that holds a previous run (checkpoints or a final model): its "
                          "checkpoint-* folders are removed and its final model is overwritten."},
    )


def stage_for_epoch(epoch, epochs_per_stage, max_latent_stage, first_stage=0, first_stage_epochs=None):
    """Curriculum stage of (0-based) `epoch`: `first_stage + epoch // epochs_per_stage`.

    As in Coconut, the stage after `max_latent_stage` is the final one: every remaining language step
    is removed, with `max_latent_stage * c_thought` latents; later epochs stay there. Where no sample
    has more than `max_latent_stage` steps it lays out the data as `max_latent_stage` does.

    `first_stage_epochs` (default `epochs_per_stage`) is the length of the run's first stage: a run that starts
    from scratch can give CoT (stage 0) the longer budget that Coconut gives it as a separate run.
    """
    if epochs_per_stage < 1:
        raise ValueError(f"epochs_per_stage must be >= 1, got {epochs_per_stage}")
    if first_stage_epochs is None:
        first_stage_epochs = epochs_per_stage
    if first_stage_epochs < 1:
        raise ValueError(f"first_stage_epochs must be >= 1, got {first_stage_epochs}")
    epoch = int(epoch)
    if epoch < first_stage_epochs:
        return min(first_stage, max_latent_stage + 1)
    return min(first_stage + 1 + (epoch - first_stage_epochs) // epochs_per_stage, max_latent_stage + 1)


@dataclass(frozen=True)
class CurriculumSchedule:
    """When stages start and end, in epochs. `mode="cot"` / `"no_cot"` stay at stage 0."""

    epochs_per_stage: int = 1
    max_latent_stage: int = 0
    first_stage: int = 0
    reset_optimizer: bool = True
    mode: str = "coconut"
    first_stage_epochs: int | None = None

    def stage(self, epoch):
        if not mode_named(self.mode).advances_stages:
            return 0
        return stage_for_epoch(
            epoch, self.epochs_per_stage, self.max_latent_stage, self.first_stage, self.first_stage_epochs
        )

    def starts_stage(self, epoch):
        """Whether `epoch` is the first epoch of its stage (after the first stage of the run)."""
        return epoch > 0 and self.stage(epoch) != self.stage(epoch - 1)

    def stage_segments(self, num_epochs):
        """`[(first_epoch, end_epoch), ...]`, one per stage of a run of `num_epochs` epochs."""
        starts = [0] + [e for e in range(1, num_epochs) if self.starts_stage(e)]
        return list(zip(starts, starts[1:] + [num_epochs]))


def _schedule_multiplier(kind, step, num_steps, warmup_steps):
    if step < warmup_steps and kind != "constant":
        return (step + 1) / (warmup_steps + 1)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
    progress = min(progress, 1.0)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def stagewise_lr_lambda(schedule, kind, num_epochs, steps_per_epoch, warmup=0):
    """A LambdaLR multiplier that runs `kind` afresh inside each stage.

    `warmup` is as `TrainingArguments.warmup_steps`: >= 1 a number of steps, below 1 a ratio — here
    of each stage's steps, since every stage starts from a fresh optimizer.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type {kind!r} is not supported by the curriculum; use one of {SCHEDULES}")
    segments = [(a * steps_per_epoch, b * steps_per_epoch) for a, b in schedule.stage_segments(num_epochs)]

    def multiplier(global_step):
        for start, end in segments:
            if global_step < end:
                break
        length = end - start
        warmup_steps = int(warmup) if warmup >= 1 else math.ceil(warmup * length)
        return _schedule_multiplier(kind, global_step - start, length, warmup_steps)

    return multiplier


def reset_optimizer_state(optimizer):
    """Forget Adam moments (and any other per-parameter state) through accelerate/DeepSpeed wrappers."""
    cleared = False
    while optimizer is not None:
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.state.clear()
            cleared = True
        optimizer = getattr(optimizer, "optimizer", None)
    if not cleared:
        raise TypeError("found no torch optimizer to reset inside the trainer's optimizer")


class CurriculumCallback(TrainerCallback):
    """Sets the training data's stage each epoch; clears optimizer state when a new stage begins."""

    def __init__(self, trainer, schedule: CurriculumSchedule):
        self.trainer = trainer
        self.schedule = schedule

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = self._epoch(state)
        stage = self.schedule.stage(epoch)
        if self.trainer.train_dataset.stage != stage:
            logger.info("Epoch %d: curriculum stage %d", epoch, stage)
        self.trainer.set_curriculum_stage(stage, epoch)
        # Only at the very start of the stage's first epoch: a run resumed mid-epoch restores the
        # optimizer state of the current stage from its checkpoint and keeps it.
        at_epoch_start = state.global_step == epoch * self.trainer.curriculum_steps_per_epoch
        if self.schedule.reset_optimizer and self.schedule.starts_stage(epoch) and at_epoch_start:
            reset_optimizer_state(self.trainer.optimizer)
            logger.info("Stage %d begins: optimizer state reset", stage)

    def on_epoch_end(self, args, state, control, **kwargs):
        # The last epoch of a stage ends with a training log, so that no log averages its loss and
        # latents_per_sample over two stages.
        if self.schedule.starts_stage(self._epoch(state)):
            control.should_log = True

    def _epoch(self, state):
        # `state.epoch` is a float that trails by rounding; the global step is exact.
        return state.global_step // self.trainer.curriculum_steps_per_epoch


class CurriculumTrainer(Trainer):
    """`Trainer` for the Coconut curriculum.

    Needs a training dataset with a `stage` attribute and `set_stage(stage)` (the curriculum data
    of `data_curriculum.py`) whose length does not depend on the stage. Logs the stage, latents per
    sample and tokens/s with the loss. Every save, `checkpoint-N` included, is ready for inference (see
    `save_model`); `inference_max_new_tokens` is the generation budget it records unless the model has one.

    Example:

    ```python
    >>> trainer = CurriculumTrainer(model=model, args=training_args, train_dataset=train_data,
    ...                             data_collator=MMCoconutCollator(pad_token_id=tokenizer.pad_token_id),
    ...                             schedule=CurriculumSchedule(epochs_per_stage=3, max_latent_stage=4))
    >>> trainer.train()
    ```
    """

    def __init__(
        self,
        *args,
        schedule: CurriculumSchedule,
        generation_eval_kwargs: dict | None = None,
        model_card_info: dict | None = None,
        inference_max_new_tokens: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.args.label_names is None:
            # transformers takes every forward argument with "label" in its name as a label; `thought_labels` comes
            # only with step supervision, and a label missing from a batch would drop its eval loss silently.
            self.label_names = ["labels"]
        self.generation_eval_kwargs = generation_eval_kwargs
        self.inference_max_new_tokens = inference_max_new_tokens
        self.model_card_info = model_card_info or {}
        if self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0:
            raise ValueError(
                "dataloader_persistent_workers keeps each worker's copy of the dataset, so the curriculum "
                "stage set at an epoch start would never reach it; turn it off"
            )
        self.schedule = schedule
        self.add_callback(CurriculumCallback(self, schedule))
        self._latent_token_id = self.model.config.latent_token_id if hasattr(self.model, "config") else None
        self._log_tokens = 0
        self._log_latents = 0
        self._log_samples = 0
        self._log_start = time.perf_counter()

    def _issue_warnings_after_load(self, load_result):
        # The Trainer only warns when a resumed checkpoint does not match the model; training on
        # from freshly initialised weights would silently lose the checkpoint.
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        missing = [key for key in load_result.missing_keys if key not in tied]
        if missing or load_result.unexpected_keys:
            raise ValueError(
                f"Checkpoint does not match the model: missing {missing[:8]}, unexpected "
                f"{load_result.unexpected_keys[:8]} ({len(missing)} and {len(load_result.unexpected_keys)} in all)"
            )
        super()._issue_warnings_after_load(load_result)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        # Stage boundaries in optimizer steps need the epoch length the Trainer itself uses.
        self.curriculum_steps_per_epoch = values[1]
        return values

    @property
    def curriculum_stage(self):
        return self.train_dataset.stage

    def set_curriculum_stage(self, stage, epoch):
        """Lay out training (and validation) data at `stage`; the model's config records it for evaluation.

        `epoch` reseeds the data's `uniform_prob` draw, so mixed-in random stages differ between epochs.
        """
        self.train_dataset.set_stage(stage, epoch=epoch)
        if hasattr(self.eval_dataset, "set_stage"):
            self.eval_dataset.set_stage(stage, epoch=epoch)
        # Evaluation prompts get latent_stage * c_thought latents, which stop growing after max_latent_stage.
        self.model.config.latent_stage = min(stage, self.schedule.max_latent_stage)

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            steps_per_epoch = self.curriculum_steps_per_epoch
            num_epochs = math.ceil(num_training_steps / steps_per_epoch)
            kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
            multiplier = stagewise_lr_lambda(self.schedule, kind, num_epochs, steps_per_epoch, self.args.warmup_steps)
            self.lr_scheduler = LambdaLR(optimizer, multiplier)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation batches go through here too; they are not training throughput
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        attention_mask = inputs.get("attention_mask")
        self._log_tokens += int(attention_mask.sum()) if attention_mask is not None else inputs["input_ids"].numel()
        if self._latent_token_id is not None:
            self._log_latents += int((inputs["input_ids"] == self._latent_token_id).sum())
        self._log_samples += inputs["input_ids"].shape[0]
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log
            elapsed = time.perf_counter() - self._log_start
            logs["stage"] = self.curriculum_stage
            logs["latents_per_sample"] = round(self._log_latents / max(self._log_samples, 1), 2)
            logs["train_tokens_per_second"] = round(self._log_tokens / max(elapsed, 1e-9), 2)
            self._log_tokens = self._log_latents = self._log_samples = 0
            self._log_start = time.perf_counter()
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The Trainer's loss evaluation, plus answer accuracy from generation when `generation_eval_kwargs` is set.

        The generated answers follow the validation data's current stage (its latents), so
        `metric_for_best_model: eval_mc_accuracy` picks checkpoints by what evaluation will measure.
        """
        started = time.perf_counter()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if dataloader.dataset is not self.eval_dataset:
            return output
        try:
            output = self._add_eval_metrics(output, metric_key_prefix)
        finally:
            # An evaluation between two training logs is not training time: leave it out of tokens/s.
            self._log_start += time.perf_counter() - started
        return output

    def _add_eval_metrics(self, output, metric_key_prefix):
        # The stage the evaluated data was laid out at, so results group by stage (`format_stage_table`).
        output.metrics[f"{metric_key_prefix}_stage"] = getattr(self.eval_dataset, "stage", None)
        skipped = getattr(self.eval_dataset, "skipped", None)
        if skipped is not None:  # records the validation set dropped (too long, bad image): not in these numbers
            output.metrics[f"{metric_key_prefix}_num_skipped"] = sum(skipped.values())
        if self.generation_eval_kwargs is None:
            return output
        from mmcoconut.evaluation.aokvqa import evaluate_model

        result = evaluate_model(
            self.accelerator.unwrap_model(self.model),
            self.eval_dataset,
            batch_size=self.args.per_device_eval_batch_size,
            accelerator=self.accelerator,
            num_workers=self.args.dataloader_num_workers,
            show_progress=False,
            # Greedy unless the kwargs say otherwise: checkpoint selection must not follow sampling noise, nor a
            # sampling generation_config the starting weights brought.
            **{"do_sample": False, **self.generation_eval_kwargs},
        )
        for key, value in result.metrics.items():
            if isinstance(value, (int, float)):
                output.metrics[f"{metric_key_prefix}_{key}"] = value
        if result.samples:
            latents = [sample["num_latents"] for sample in result.samples]
            output.metrics[f"{metric_key_prefix}_mean_latents"] = sum(latents) / len(latents)
        return output

    def save_model(self, output_dir=None, _internal_call=False):
        """`Trainer.save_model` (also what writes each `checkpoint-N`), ready for inference as the final directory:
        the processor gets the chat template of the current stage and the generation config a budget
        (`prepare_for_inference`); with LoRA the run's config goes beside the adapters, which alone do not record
        the stage, c_thought or mode."""
        wrapped = self.accelerator.unwrap_model(self.model)
        model = unwrap_peft_model(wrapped)
        if self.processing_class is not None:
            prepare_for_inference(
                model.config, model.generation_config, self.processing_class, self.inference_max_new_tokens
            )
        super().save_model(output_dir, _internal_call=_internal_call)
        if model is not wrapped and self.args.should_save:
            model.config.save_pretrained(output_dir or self.args.output_dir)

    def create_model_card(self, model_name=None, **kwargs):
        """Write `README.md` in the output directory: base model, curriculum, final stage, metrics, recipe."""
        if not self.is_world_process_zero():
            return
        path = Path(self.args.output_dir) / "README.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_model_card(self, model_name or Path(self.args.output_dir).name))


def stage_results(log_history):
    """{stage: the last evaluation at that stage}, from a Trainer's `log_history` (entries with `eval_stage`)."""
    results = {}
    for entry in log_history:
        if entry.get("eval_stage") is not None:
            results[entry["eval_stage"]] = entry
    return dict(sorted(results.items()))


def format_stage_table(log_history, chance=None):
    """A Markdown table: per curriculum stage, its last evaluation's MC accuracy and mean generated tokens.

    `chance` is the accuracy of guessing (1 / choices). Empty when no evaluation generated answers.
    """
    rows = [(stage, entry) for stage, entry in stage_results(log_history).items() if "eval_mc_accuracy" in entry]
    if not rows:
        return ""
    lines = ["| stage | latents | epoch | MC accuracy | chance | mean generated tokens | unparseable |",
             "|---|---|---|---|---|---|---|"]
    chance_text = f"{100 * chance:.0f}%" if chance is not None else "-"
    for stage, entry in rows:
        latents = entry.get("eval_mean_latents")
        lines.append(
            f"| {stage} | {'-' if latents is None else f'{latents:g}'} | {entry.get('epoch', 0):.0f} "
            f"| {100 * entry['eval_mc_accuracy']:.1f}% | {chance_text} | {entry['eval_mean_generated_tokens']:.1f} "
            f"| {entry.get('eval_num_unparseable', '-')} |"
        )
    return "\n".join(lines)


def _thinking_usage(config, load_path):
    """The card's "continuous thoughts at inference" cell and its usage snippet + text, for a checkpoint that thinks
    the prompt's fixed latents or (trained with `supervise_end_latent`) decides itself when to stop."""
    num_latents = config.num_inference_latents
    load = f"""from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("{load_path}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{load_path}")"""
    if config.default_thinking != "adaptive":
        return num_latents, f"""```python
{load}
```
Prompts end with `<|start-latent|>` + {num_latents} x `<|latent|>` + `<|end-latent|>`; `model.generate`
fills the thoughts and decodes the remaining steps and the `Answer:` line."""
    return f"adaptive, at most {num_latents}", f"""```python
{load}
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": question}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, num_latents=0)
prompt = prompt.removesuffix("<|end-latent|>")  # open the latent span: the model decides how long to think
inputs = processor(images=[image], text=prompt, return_tensors="pt")
out = model.generate(**inputs, return_dict_in_generate=True)
out.num_thoughts  # the continuous thoughts each answer followed
```
The model thinks adaptively (trained with `supervise_end_latent`): prompts end with `<|start-latent|>`,
and `model.generate` feeds continuous thoughts back one at a time until the model predicts `<|end-latent|>`,
up to `max_thoughts` (default {num_latents}: latent_stage {config.latent_stage} x c_thought {config.c_thought}),
then decodes the remaining steps and the `Answer:` line. To force a count, prompt with `num_latents=N` (the
span `<|start-latent|>` + N x `<|latent|>` + `<|end-latent|>`) and pass `thinking="fixed"` to `generate`."""


# The card's body, a Jinja template that `ModelCard.from_template` renders under the YAML header that `ModelCardData`
# writes ({{ card_data }}). The body stays hand-written Markdown: the metadata has no fields for the curriculum, the
# per-stage table or the usage snippet, and the Hub shows the body as written.
MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

An InternVL model trained with [mmcoconut](https://arxiv.org/abs/2412.06769)'s curriculum to reason in
continuous latent space (Coconut, "Chain of Continuous Thought").

| | |
|---|---|
| base model | {{ base_description }} |
| mode | `{{ mode }}` |
| final curriculum stage | {{ stage }} |
| c_thought | {{ c_thought }} |
| continuous thoughts at inference | {{ thoughts }} |
| epochs | {{ epochs }} |

## Metrics

| metric | value |
|---|---|
{% for name, value in metric_rows %}| {{ name }} | {{ value }} |
{% else %}| (no evaluation was run) | |
{% endfor %}{% if stage_table %}
Per curriculum stage (its last evaluation):

{{ stage_table }}
{% endif %}
## Use
{% if lora %}
Trained with LoRA: `{{ output_dir }}` holds the PEFT adapters (they need `peft` and the base model); `{{ load_path }}`
is the standalone model with the adapters merged in, which is what loads below and what evaluation takes.
{% endif %}
{{ usage }}

## Training recipe

```yaml
{{ recipe }}
```
"""

# The final evaluation's metrics that the card's model-index reports: {log key: (metric type, metric name)}.
EVAL_RESULT_METRICS = {
    "eval_mc_accuracy": ("accuracy", "MC accuracy"),
    "eval_da_accuracy": ("accuracy", "DA accuracy"),
    "eval_loss": ("loss", "loss"),
}


def _eval_results(metrics, dataset):
    """`EvalResult`s of the final evaluation on `dataset` ({type, name, split}, from `model_card_info`)."""
    if not dataset:
        return []
    return [
        EvalResult(
            task_type="visual-question-answering", task_name="Visual Question Answering",
            dataset_type=dataset["type"], dataset_name=dataset["name"], dataset_split=dataset.get("split"),
            metric_type=metric_type, metric_name=metric_name, metric_value=metrics[key],
        )
        for key, (metric_type, metric_name) in EVAL_RESULT_METRICS.items()
        if isinstance(metrics.get(key), (int, float))
    ]


def render_model_card(trainer, model_name):
    """The README.md of a trained checkpoint: `ModelCardData`'s YAML header + `MODEL_CARD_TEMPLATE`."""
    config = trainer.model.config
    info = trainer.model_card_info
    base_model = info.get("base_model")
    evals = [entry for entry in trainer.state.log_history if any(k.startswith("eval_") for k in entry)]
    metrics = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")}
    # The path a reader can load: the Hub repo when pushed, else the directory itself (the merged export for LoRA).
    load_path = info.get("hub_model_id") or info.get("load_path") or str(Path(trainer.args.output_dir))
    thoughts, usage = _thinking_usage(config, load_path)
    eval_results = _eval_results(metrics, info.get("eval_dataset"))
    card_data = ModelCardData(
        # A local directory is no Hub model to link to.
        base_model=base_model if base_model and not Path(base_model).exists() else None,
        license=info.get("license"),
        datasets=info.get("datasets"),
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["mmcoconut", "coconut", "continuous-thought", "internvl", "a-okvqa"],
        # model_name names the model-index; without results it would be a stray key in the header.
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=MODEL_CARD_TEMPLATE,
        model_name=model_name,
        base_description=info.get("base_description") or f"`{base_model}`",
        mode=info.get("mode", "coconut"),
        stage=config.latent_stage,
        c_thought=config.c_thought,
        thoughts=thoughts,
        epochs=f"{round(trainer.state.epoch or 0, 2):g}",
        metric_rows=[(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()],
        stage_table=format_stage_table(trainer.state.log_history),
        lora=info.get("lora"),
        output_dir=trainer.args.output_dir,
        load_path=load_path,
        usage=usage,
        recipe=info.get("recipe", "").strip(),
    )
    return f"{card}\n"  # Jinja drops the template's final newline


__all__ = [
    "CurriculumTrainer",
    "CurriculumTrainingArguments",
    "CurriculumCallback",
    "CurriculumSchedule",
    "stage_for_epoch",
    "stagewise_lr_lambda",
    "reset_optimizer_state",
    "render_model_card",
    "stage_results",
    "format_stage_table",
]
