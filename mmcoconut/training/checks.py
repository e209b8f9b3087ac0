"""Checks before anything heavy is loaded: the whole configuration, the output directory, the Hub, the launch."""

import difflib
import inspect
import json
import logging
import os
import shutil
from pathlib import Path

from transformers import Qwen2Config
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from mmcoconut.constants import DATA_SOURCES, THOUGHT_SUPERVISION
from mmcoconut.conversion import is_internvl_chat_checkpoint
from mmcoconut.data import aokvqa as data_aokvqa
from mmcoconut.errors import UserFileExistsError, UserFileNotFoundError, UserValueError, shorten
from mmcoconut.modes import MODE_TABLE, MODES
from mmcoconut.preflight import (  # require_hub's home: preflight
    HUB_PROBE_TIMEOUT_S,
    check_model_size,
    require_extra,
    require_hub,
)
from mmcoconut.processing import CHECKPOINT_PARTS, check_checkpoint_dir, tiny_internvl_config
from trainer_curriculum import SCHEDULES

logger = logging.getLogger(__name__)


def check_args(model_args, data_args, curriculum_args, eval_args, training_args):
    """Validate the whole configuration before any model or data is loaded (minutes, for InternVL3-1B).

    Raises one ValueError listing every problem; an incomplete checkpoint directory is a FileNotFoundError
    naming the missing files (both user errors, `mmcoconut.errors`: the command prints them without a traceback).
    """
    problems = []

    def need(condition, message):
        if not condition:
            problems.append(message)

    c = curriculum_args
    need(c.mode in MODES, f"mode must be one of {MODES}, got {shorten(c.mode)}")
    need(c.c_thought >= 1, f"c_thought must be >= 1, got {c.c_thought}")
    need(c.max_latent_stage >= 0, f"max_latent_stage must be >= 0, got {c.max_latent_stage}")
    need(c.epochs_per_stage >= 1, f"epochs_per_stage must be >= 1, got {c.epochs_per_stage}")
    # Stage max_latent_stage + 1 is the final one (every step replaced); later stages do not exist.
    need(0 <= c.first_stage <= c.max_latent_stage + 1,
         f"first_stage must be in 0..max_latent_stage + 1 = {c.max_latent_stage + 1}, got {c.first_stage}")
    need(0.0 <= c.uniform_prob <= 1.0, f"uniform_prob must be in [0, 1], got {c.uniform_prob}")
    need(c.thought_supervision in THOUGHT_SUPERVISION,
         f"thought_supervision must be one of {THOUGHT_SUPERVISION}, got {shorten(c.thought_supervision)}")
    if c.thought_supervision == "step":
        need(c.mode in MODE_TABLE and MODE_TABLE[c.mode].fills_thoughts,
             f"thought_supervision: step decodes continuous thoughts, which mode {c.mode!r} has none of; use mode coconut")
        need(c.thought_supervision_weight > 0,
             f"thought_supervision_weight must be > 0 with thought_supervision: step, got {c.thought_supervision_weight}")

    d = data_args
    need(d.data_source in DATA_SOURCES, f"data_source must be one of {DATA_SOURCES}, got {shorten(d.data_source)}")
    need(d.steps_from in data_aokvqa.STEPS_FROM,
         f"steps_from must be one of {data_aokvqa.STEPS_FROM}, got {shorten(d.steps_from)}")
    need(d.max_length is None or d.max_length >= 1, f"max_length must be >= 1, got {d.max_length}")
    need(d.max_tiles >= 1, f"max_tiles must be >= 1, got {d.max_tiles}")
    for name in ("max_train_samples", "max_eval_samples"):
        need(getattr(d, name) is None or getattr(d, name) >= 1, f"{name} must be >= 1, got {getattr(d, name)}")
    evaluate = training_args.eval_strategy != "no" or training_args.do_eval
    if d.data_source == "canonical":
        for name, needed in (("train_file", True), ("eval_file", evaluate)):
            path = getattr(d, name)
            need(not needed or path is not None, f"data_source canonical needs {name}")
            need(path is None or Path(path).is_file(), f"{name} {path} does not exist")
    if d.data_source == "aokvqa_official":
        need(d.aokvqa_dir is not None and d.coco_dir is not None,
             "data_source aokvqa_official needs aokvqa_dir and coco_dir")
    if d.data_source == "synthetic":
        need(d.synthetic_train >= 1 and d.synthetic_val >= 1,
             f"synthetic_train and synthetic_val must be >= 1, got {d.synthetic_train}, {d.synthetic_val}")

    m = model_args
    need(m.model_dtype in ("float32", "bfloat16", "float16"),
         f"model_dtype must be float32, bfloat16 or float16, got {shorten(m.model_dtype)}")
    need(not m.use_lora or m.lora_r >= 1, f"lora_r must be >= 1, got {m.lora_r}")
    if m.use_lora:
        need(m.lora_alpha > 0, f"lora_alpha must be > 0, got {m.lora_alpha}")
        need(0.0 <= m.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {m.lora_dropout}")
        need(len(m.lora_target_modules) >= 1 and all(name.strip() for name in m.lora_target_modules),
             f"lora_target_modules must name at least one layer, got {shorten(m.lora_target_modules)}")
    tiny_overrides = None
    if isinstance(m.tiny_internvl, str):
        try:
            tiny_overrides = json.loads(m.tiny_internvl)
            if not isinstance(tiny_overrides, dict):
                problems.append(f"tiny_internvl must be a JSON object, got {shorten(m.tiny_internvl)}")
                tiny_overrides = None
        except json.JSONDecodeError as error:
            problems.append(f"tiny_internvl is not valid JSON ({error}): {shorten(m.tiny_internvl)}")
    elif isinstance(m.tiny_internvl, dict):
        tiny_overrides = m.tiny_internvl
    if tiny_overrides is not None:
        problems += tiny_internvl_problems(tiny_overrides)
    need(eval_args.eval_max_new_tokens >= 1, f"eval_max_new_tokens must be >= 1, got {eval_args.eval_max_new_tokens}")

    t = training_args
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        need(getattr(t, name) >= 1, f"{name} must be >= 1, got {getattr(t, name)}")
    scheduler = getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)
    need(scheduler in SCHEDULES,
         f"lr_scheduler_type must be one of {SCHEDULES} (restarted per stage), got {shorten(scheduler)}")
    # max_steps > 0 overrides the epochs; otherwise no epoch would save an untrained model and exit 0.
    need(t.max_steps > 0 or t.num_train_epochs > 0, f"num_train_epochs must be > 0, got {t.num_train_epochs}")
    if problems:
        raise UserValueError("invalid configuration:\n  - " + "\n  - ".join(problems))
    if "wandb" in (t.report_to or []):
        require_extra("wandb", "report_to wandb")
    if tiny_overrides is not None:
        try:
            config = tiny_internvl_config(**tiny_overrides)
        except (TypeError, ValueError) as error:
            raise UserValueError(f"invalid configuration: tiny_internvl: {error}") from None
        check_model_size(config.to_dict(), "tiny_internvl", m.model_dtype)

    if m.load_model_path:
        check_checkpoint_dir(m.load_model_path)
    elif m.tiny_internvl is None and Path(m.model_name_or_path).is_dir():
        base = Path(m.model_name_or_path)
        # Original-format checkpoints need no processor files: their processor is built from the config.
        original = (base / "config.json").is_file() and is_internvl_chat_checkpoint(base)
        check_checkpoint_dir(base, ("config", "weights", "tokenizer") if original else CHECKPOINT_PARTS)


def tiny_internvl_keys():
    """The keys `tiny_internvl` may set: `tiny_internvl_config`'s arguments and the Qwen2 language model's config
    fields (its `**text_overrides`); `rope_theta` is the older name transformers still takes for the RoPE base."""
    own = {name for name, p in inspect.signature(tiny_internvl_config).parameters.items() if p.kind is p.KEYWORD_ONLY
           or p.kind is p.POSITIONAL_OR_KEYWORD}
    qwen2 = {name for name in inspect.signature(Qwen2Config.__init__).parameters if name != "self"}
    return own | qwen2 | set(Qwen2Config().to_dict()) | {"rope_theta"}


def tiny_internvl_problems(overrides):
    """What is wrong with `tiny_internvl`'s keys and sizes: a misspelt key (`num_hiden_layers`) would otherwise be
    stored in config.json and ignored, and the model built with the default."""
    known = tiny_internvl_keys()
    problems = []
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"tiny_internvl: unknown key {shorten(key, 40)}{hint}; it takes tiny_internvl_config's "
                            "arguments and Qwen2Config's fields")
        elif (key.endswith(("_size", "_layers", "_heads")) or key == "vocab_size") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            problems.append(f"tiny_internvl: {key} must be an integer >= 1, got {shorten(value)}")
    return problems


_PREVIOUS_RUN_FILES = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json",
    "adapter_model.safetensors", "training_args.bin",
)


def is_complete_checkpoint(directory):
    """Whether the Trainer finished writing `directory`: it writes `trainer_state.json` last (after the weights,
    optimizer, scheduler and RNG states), so a folder whose state file is missing or cut short was interrupted."""
    try:
        json.loads((Path(directory) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def latest_complete_checkpoint(output_dir):
    """The newest complete `checkpoint-*` in `output_dir` (None if there is none); newer incomplete ones (a save
    killed midway) are skipped with a log line naming them."""
    incomplete = []
    for checkpoint in reversed(sort_checkpoints(str(output_dir))):
        if is_complete_checkpoint(checkpoint):
            if incomplete:
                logger.warning("Skipping incomplete checkpoint(s) %s (no complete %s: the save was interrupted); "
                               "resuming from %s", incomplete, TRAINER_STATE_NAME, Path(checkpoint).name)
            return checkpoint
        incomplete.append(Path(checkpoint).name)
    if incomplete:
        logger.warning("No complete checkpoint in %s: %s were interrupted while saving", output_dir, incomplete)
    return None


def prepare_output_dir(training_args):
    """The checkpoint to resume from (None for a new run), after guarding the previous run in `output_dir`.

    `resume_from_checkpoint` `true`/`latest` means the newest `checkpoint-*` in `output_dir`; `false` none.
    A new run into an `output_dir` that holds checkpoints or a final model is refused unless
    `overwrite_output_dir`; then the old `checkpoint-*` folders are removed, since `save_total_limit` rotation
    sorts by step and would delete the new run's checkpoints before the old run's.
    """
    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("false", "none", ""):
        resume = None
    if isinstance(resume, str) and resume.lower() in ("true", "latest"):
        resume = latest_complete_checkpoint(output_dir) if output_dir.is_dir() else None
        if resume is None:
            raise UserFileNotFoundError(
                f"resume_from_checkpoint {training_args.resume_from_checkpoint}: no complete checkpoint-* folder "
                f"in {output_dir}"
            )
        logger.info("Resuming from the latest checkpoint, %s", resume)
    if resume is not None:
        if Path(resume).is_dir() and not is_complete_checkpoint(resume):
            raise UserValueError(f"resume_from_checkpoint {resume}: incomplete checkpoint (no complete "
                                 f"{TRAINER_STATE_NAME}: its save was interrupted); name an earlier one, or pass "
                                 "true for the newest complete one")
        return resume
    checkpoints = sort_checkpoints(str(output_dir)) if output_dir.is_dir() else []
    final = [name for name in _PREVIOUS_RUN_FILES if (output_dir / name).is_file()]
    if not training_args.overwrite_output_dir:
        if checkpoints or final:
            found = [Path(c).name for c in checkpoints] + final
            raise UserFileExistsError(
                f"output_dir {output_dir} holds a previous run ({', '.join(found)}); resume it with "
                "--resume_from_checkpoint true, replace it with --overwrite_output_dir true, "
                "or choose another output_dir"
            )
        return None
    # Every rank enters (it has a barrier); the saving process removes.
    with training_args.main_process_first(desc="removing the previous run's checkpoints"):
        if training_args.should_save and checkpoints:
            logger.warning("overwrite_output_dir: removing the previous run's %s", [Path(c).name for c in checkpoints])
            for checkpoint in checkpoints:
                shutil.rmtree(checkpoint)
    return None


def require_hub_access(model_args, data_args):
    """`require_hub` for every Hub id the run will load (model first, then data), before anything is loaded."""
    if model_args.load_model_path:
        require_hub(model_args.load_model_path, "model", "load_model_path")
    elif model_args.tiny_internvl is None:
        require_hub(model_args.model_name_or_path, "model", "model_name_or_path")
    if data_args.data_source == "aokvqa_hf":
        require_hub(data_args.hf_dataset_id, "dataset", "hf_dataset_id")


def check_distributed_setup(trainer):
    """Refuse the launches that accelerate/transformers would silently run as something else.

    Processes that each run alone overwrite each other's output; accelerate applies FSDP only on accelerator
    devices (on CPU an FSDP config quietly becomes DDP); a DeepSpeed config launched with accelerate told to run on
    CPU quietly becomes plain processes. DeepSpeed itself runs on CPU (gloo): see docs/distributed.md.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and trainer.args.world_size == 1:
        raise RuntimeError(
            f"launched as {world_size} processes but the Trainer runs each alone (no distributed backend "
            "for this device); on CPU use ds_configs/accelerate_ddp.yaml with use_cpu: true"
        )
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if wants_fsdp and not trainer.is_fsdp_enabled:
        raise RuntimeError(
            "the accelerate config asks for FSDP but the Trainer would not use it: accelerate applies FSDP only on "
            "GPUs (or other accelerators), and on CPU would run plain DDP; on CPU use ds_configs/accelerate_ddp.yaml "
            "or a DeepSpeed config"
        )
    if wants_deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError(
            "the accelerate config asks for DeepSpeed but the Trainer would not use it: accelerate was told to run on "
            "CPU (`accelerate launch --cpu`, `use_cpu: true` in the accelerate config, or ACCELERATE_USE_CPU=true), "
            "which sets up plain CPU processes without DeepSpeed. DeepSpeed itself runs without GPUs (its CPU "
            "accelerator, gloo): launch with ds_configs/accelerate_zero2.yaml or accelerate_zero3.yaml as they are"
        )


__all__ = [
    "check_args", "tiny_internvl_keys", "tiny_internvl_problems", "is_complete_checkpoint",
    "latest_complete_checkpoint", "prepare_output_dir", "HUB_PROBE_TIMEOUT_S", "require_hub", "require_hub_access",
    "check_distributed_setup",
]
