"""What a run reports: the final evaluation, the model card's facts, the closing summary."""

import shlex
from pathlib import Path

import yaml

from mmcoconut.modes import MODE_TABLE
from trainer_curriculum import format_stage_table


def final_eval_metrics(trainer):
    """The evaluation of the trained model: the one the last epoch already ran, else a new one (never twice).

    With `load_best_model_at_end` the model is the best checkpoint's, which the last evaluation did not measure.
    """
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    reloaded = trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None
    if last is not None and last.get("step") == trainer.state.global_step and not reloaded:
        return {k: v for k, v in last.items() if k.startswith("eval_") or k == "epoch"}
    return trainer.evaluate()


def model_card_info(model_args, data_args, curriculum_args, training_args):
    """What the model card says about the run: the real starting point and where the loadable model is."""
    if model_args.tiny_internvl is not None and not model_args.load_model_path:
        base_model, base_description = None, f"random init: tiny config ({model_args.tokenizer} tokenizer)"
    else:
        base_model = model_args.load_model_path or model_args.model_name_or_path
        base_description = f"`{base_model}`"
    output_dir = Path(training_args.output_dir)
    hub_dataset = data_args.data_source == "aokvqa_hf" and not Path(data_args.hf_dataset_id).exists()
    # The evaluation set as the card's model-index names it: a Hub dataset id where there is one.
    eval_dataset = {
        "aokvqa_hf": dict(type=data_args.hf_dataset_id if hub_dataset else "a-okvqa", name="A-OKVQA",
                          split=data_args.eval_split),
        "aokvqa_official": dict(type="a-okvqa", name="A-OKVQA", split=data_args.eval_split),
        "synthetic": dict(type="synthetic", name=f"mmcoconut synthetic ({data_args.synthetic_task})", split="val"),
        "canonical": dict(type="canonical", name=str(data_args.eval_file), split="val"),
    }.get(data_args.data_source)
    return dict(
        base_model=base_model,
        base_description=base_description,
        # mmcoconut's license (MIT) covers a model it built from scratch; a fine-tune's license is its base model's,
        # which the Hub shows through base_model and which the card does not restate.
        license="mit" if base_model is None else None,
        datasets=[data_args.hf_dataset_id] if hub_dataset else None,
        eval_dataset=eval_dataset,
        mode=curriculum_args.mode,
        recipe=yaml.safe_dump(recipe_as_trained(model_args, data_args, curriculum_args, training_args)),
        hub_model_id=training_args.hub_model_id if training_args.push_to_hub else None,
        load_path=str(output_dir / "merged" if model_args.use_lora else output_dir),
        lora=model_args.use_lora,
    )


def run_summary(trainer, eval_records, model_args, data_args, curriculum_args, eval_args, training_args):
    """The closing lines of a run: MC accuracy and answer length per stage (as evaluated), and what to run next."""
    out = Path(training_args.output_dir)
    loadable = out / "merged" if model_args.use_lora else out
    lines = []
    if eval_records:
        with_choices = [r for r in eval_records if r.get("choices")]
        chance = sum(1 / len(r["choices"]) for r in with_choices) / len(with_choices) if with_choices else None
        table = format_stage_table(trainer.state.log_history, chance)
        if table:
            lines += [f"Evaluated on {len(eval_records)} validation questions; the last evaluation of each stage:",
                      table, ""]
    lines.append(f"Model: {loadable} (from_pretrained loads it; model card: {out / 'README.md'})")
    if model_args.use_lora:
        lines.append(f"LoRA adapters (they need peft and the base model): {out}")
    lines.append("Try next:")
    example = next((r for r in eval_records or () if r.get("image") and r.get("choices")), None)
    if example is not None:
        question = example["question"].split("\n")[0]  # the choices follow on their own lines
        lines.append(f"  mmcoconut-predict --model {loadable} --image {example['image']} --question "
                     f"{_shell_quote(question)} --choices {' '.join(map(_shell_quote, example['choices']))}")
    eval_mode = MODE_TABLE[curriculum_args.mode].eval_mode
    data = {
        "synthetic": f"--data-file {Path(data_args.synthetic_dir) / 'canonical' / 'val.jsonl'}",
        "canonical": f"--data-file {data_args.eval_file}",
        "aokvqa_hf": f"--hf-dataset {data_args.hf_dataset_id}",
        "aokvqa_official": f"--aokvqa-dir {data_args.aokvqa_dir} --coco-dir {data_args.coco_dir}",
    }[data_args.data_source]
    lines.append(f"  python evaluate_aokvqa.py --model {loadable} {data} --split {data_args.eval_split} "
                 f"--mode {eval_mode} --max-tiles {data_args.max_tiles} "
                 f"--max-new-tokens {eval_args.eval_max_new_tokens} --output-dir {out / 'eval'}")
    return "\n".join(lines)


def _shell_quote(text):
    """`text` as one shell word, in double quotes when that reads better than shlex's quoting of a `'`."""
    if "'" in text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return shlex.quote(text)


def recipe_as_trained(model_args, data_args, curriculum_args, training_args):
    """The recipe values that differ from the defaults, for the model card."""
    values = {}
    for args in (model_args, data_args, curriculum_args):
        default = type(args)()
        values.update({k: v for k, v in vars(args).items() if getattr(default, k) != v})
    keys = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
            "lr_scheduler_type", "warmup_steps", "weight_decay", "bf16", "activation_checkpointing", "seed")
    values.update({k: getattr(training_args, k) for k in keys})
    return {k: (v.value if hasattr(v, "value") else v) for k, v in values.items()}


__all__ = ["final_eval_metrics", "model_card_info", "run_summary", "recipe_as_trained"]
