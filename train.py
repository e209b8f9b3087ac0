"""Train MMCoconut: `accelerate launch train.py recipes/coconut.yaml` (or `python train.py recipes/demo.yaml`).

A recipe is YAML over `ModelArguments`, `DataArguments`, `CurriculumArguments`,
`GenerationEvalArguments` and transformers' `TrainingArguments`, parsed by `HfArgumentParser`. A recipe may name a `base` recipe
(a path relative to itself) whose keys it overrides. Command-line flags override the recipe:
`python train.py recipes/cot.yaml --learning_rate 1e-5 --output_dir outputs/try`.
"""

import copy
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
import yaml
from transformers import HfArgumentParser, InternVLForConditionalGeneration, TrainingArguments, set_seed

import data_aokvqa
from data_collator import MMCoconutCollator
from data_curriculum import MODES, CurriculumDataset
from modeling_mmcoconut import MMCoconutForConditionalGeneration
from processing_mmcoconut import (
    build_internvl_processor,
    build_internvl_tokenizer,
    load_internvl_processor,
    tiny_internvl_config,
)
from trainer_curriculum import CurriculumSchedule, CurriculumTrainer

logger = logging.getLogger("train")

DATA_SOURCES = (*data_aokvqa.SOURCES, "synthetic")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="OpenGVLab/InternVL3-1B-Pretrained",
        metadata={"help": "InternVL checkpoint to start from: a Hub id or path, `-hf` or original (internvl_chat) format."},
    )
    load_model_path: str | None = field(
        default=None,
        metadata={"help": "An MMCoconut checkpoint of ours to continue from (e.g. the CoT run's output); "
                          "overrides model_name_or_path."},
    )
    tiny_internvl: dict | str | None = field(
        default=None,
        metadata={"help": "Build a tiny randomly initialised InternVL3-shaped model from config instead of "
                          "loading one (demo and tests): a dict of `tiny_internvl_config` overrides ({} for defaults)."},
    )
    model_dtype: str = field(
        default="bfloat16", metadata={"help": "Dtype of the loaded weights: float32, bfloat16 or float16."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2."})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Train only the projector and LM."})
    use_lora: bool = field(default=False, metadata={"help": "Train PEFT LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layer names adapted in the language model."},
    )
    lora_vision: bool = field(
        default=False, metadata={"help": "Also adapt the vision tower's attention and MLP (q/k/v_proj, fc1, fc2)."}
    )


@dataclass
class DataArguments:
    data_source: str = field(default="aokvqa_hf", metadata={"help": f"One of {DATA_SOURCES}."})
    hf_dataset_id: str = field(
        default="HuggingFaceM4/A-OKVQA", metadata={"help": "Hub id or save_to_disk path (data_source=aokvqa_hf)."}
    )
    aokvqa_dir: str | None = field(default=None, metadata={"help": "Official annotations dir (aokvqa_official)."})
    coco_dir: str | None = field(default=None, metadata={"help": "COCO 2017 images dir (aokvqa_official)."})
    train_file: str | None = field(default=None, metadata={"help": "Canonical JSON/JSONL training file (canonical)."})
    eval_file: str | None = field(default=None, metadata={"help": "Canonical JSON/JSONL validation file (canonical)."})
    train_split: str = field(default="train", metadata={"help": "A-OKVQA training split."})
    eval_split: str = field(default="val", metadata={"help": "A-OKVQA validation split."})
    synthetic_dir: str = field(
        default="data/generated/synthetic",
        metadata={"help": "Where the synthetic set is generated when missing (data_source=synthetic)."},
    )
    synthetic_task: str = field(default="shape_grid", metadata={"help": "Task of synthetic_data.py."})
    synthetic_train: int = field(default=64, metadata={"help": "Synthetic training questions."})
    synthetic_val: int = field(default=16, metadata={"help": "Synthetic validation questions."})
    steps_from: str = field(
        default="rationales",
        metadata={"help": "A-OKVQA steps: `rationales` (each rationale a step) or `first_rationale_sentences`."},
    )
    max_length: int = field(
        default=3072, metadata={"help": "Longer samples are skipped and counted, never truncated."}
    )
    max_tiles: int = field(default=8, metadata={"help": "InternVL dynamic tiling cap (tiles per image, + thumbnail)."})
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Skip (count, log) records with missing/unreadable images instead of failing."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation records."})


@dataclass
class CurriculumArguments:
    mode: str = field(default="coconut", metadata={"help": f"One of {MODES}."})
    c_thought: int = field(default=2, metadata={"help": "Continuous thoughts per replaced reasoning step."})
    epochs_per_stage: int = field(default=3, metadata={"help": "Epochs each curriculum stage lasts."})
    max_latent_stage: int = field(default=3, metadata={"help": "Last stage; later epochs stay at it."})
    first_stage: int = field(
        default=0, metadata={"help": "Stage of the first epoch (1 when continuing from a stage-0 CoT checkpoint)."}
    )
    pad_latent_to_max: bool = field(
        default=True, metadata={"help": "Give every sample stage·c_thought latents even with fewer steps."}
    )
    uniform_prob: float = field(default=0.0, metadata={"help": "Probability of a sample at a random stage."})
    supervise_end_latent: bool = field(
        default=False,
        metadata={"help": "Teach when to stop thinking: each thought predicts <|latent|> (go on) or <|end-latent|> "
                          "(stop); needs mode coconut and pad_latent_to_max false. The checkpoint then generates "
                          "with thinking='adaptive' by default."},
    )
    reset_optimizer: bool = field(default=True, metadata={"help": "Clear optimizer state at each new stage."})


@dataclass
class GenerationEvalArguments:
    eval_accuracy: bool = field(
        default=False,
        metadata={"help": "At each evaluation also generate answers and report eval_mc_accuracy, eval_da_accuracy, "
                          "eval_num_unparseable and eval_mean_generated_tokens (use with metric_for_best_model)."},
    )
    eval_max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per answer in evaluation."})


def read_recipe(path):
    """The recipe at `path` merged over its `base` chain (later keys win)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping, got {type(recipe).__name__}")
    base = recipe.pop("base", None)
    if base is None:
        return recipe
    return {**read_recipe(path.parent / base), **recipe}


def parse_args(argv):
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, CurriculumArguments, GenerationEvalArguments, TrainingArguments)
    )
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        raise SystemExit("usage: train.py RECIPE.yaml [--flag value ...]")
    recipe = read_recipe(argv[0])
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"{argv[0]}: unknown recipe keys {unknown}")
    # The recipe becomes the defaults, so flags given after it override it.
    for action in parser._actions:
        if action.dest in recipe:
            action.required = False
    parser.set_defaults(**recipe)
    return parser.parse_args_into_dataclasses(args=argv[1:])


def check_distributed_setup(trainer):
    """Refuse the launches that accelerate/transformers would silently run as something else.

    On a machine without GPUs, an FSDP or DeepSpeed accelerate config quietly becomes DDP or independent
    single-process runs that overwrite each other's output.
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
        raise RuntimeError("the accelerate config asks for FSDP but the Trainer would not use it (FSDP needs GPUs)")
    if wants_deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError(
            "the accelerate config asks for DeepSpeed but the Trainer would not use it (DeepSpeed needs GPUs)"
        )


def load_records(data_args, split_name):
    """Canonical records of the training (`split_name="train"`) or validation split."""
    train = split_name == "train"
    limit = data_args.max_train_samples if train else data_args.max_eval_samples
    if data_args.data_source == "synthetic":
        canonical_dir = ensure_synthetic_data(data_args)
        return data_aokvqa.load_records(
            "canonical", split_name, path=canonical_dir / ("train.jsonl" if train else "val.jsonl"), limit=limit
        )
    if data_args.data_source not in DATA_SOURCES:
        raise ValueError(f"data_source must be one of {DATA_SOURCES}, got {data_args.data_source!r}")
    return data_aokvqa.load_records(
        data_args.data_source,
        data_args.train_split if train else data_args.eval_split,
        dataset_id=data_args.hf_dataset_id,
        aokvqa_dir=data_args.aokvqa_dir,
        coco_dir=data_args.coco_dir,
        path=data_args.train_file if train else data_args.eval_file,
        steps_from=data_args.steps_from,
        limit=limit,
    )


def ensure_synthetic_data(data_args):
    """Generate the synthetic set once (deterministic), recorded by a manifest of its arguments."""
    from synthetic_data import write_synthetic_aokvqa

    out = Path(data_args.synthetic_dir)
    manifest = {"task": data_args.synthetic_task, "n_train": data_args.synthetic_train, "n_val": data_args.synthetic_val}
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return out / "canonical"
    if manifest_path.is_file():
        raise ValueError(
            f"{out} holds a synthetic set generated with {manifest_path.read_text().strip()}; the recipe asks for "
            f"{manifest}. Point synthetic_dir elsewhere or delete {out}."
        )
    write_synthetic_aokvqa(out, data_args.synthetic_train, data_args.synthetic_val, seed=0, task=data_args.synthetic_task)
    manifest_path.write_text(json.dumps(manifest))
    return out / "canonical"


def build_model_and_processor(model_args, data_args, curriculum_args):
    dtype = getattr(torch, model_args.model_dtype)
    if model_args.load_model_path:
        model = MMCoconutForConditionalGeneration.from_pretrained(
            model_args.load_model_path, dtype=dtype, attn_implementation=model_args.attn_implementation
        )
        processor = load_internvl_processor(model_args.load_model_path, data_args.max_tiles)
    elif model_args.tiny_internvl is not None:
        overrides = model_args.tiny_internvl
        overrides = json.loads(overrides) if isinstance(overrides, str) else dict(overrides)
        internvl_config = tiny_internvl_config(**overrides)
        internvl_config._attn_implementation = model_args.attn_implementation
        processor = build_internvl_processor(internvl_config, build_internvl_tokenizer(), data_args.max_tiles)
        internvl = InternVLForConditionalGeneration(internvl_config)
        model = MMCoconutForConditionalGeneration.from_internvl(internvl, processor.tokenizer, dtype=dtype)
    else:
        internvl, processor = load_base_internvl(
            model_args.model_name_or_path, dtype, model_args.attn_implementation, data_args.max_tiles
        )
        model = MMCoconutForConditionalGeneration.from_internvl(internvl, processor.tokenizer)
    model.config.c_thought = curriculum_args.c_thought
    model.config.training_mode = curriculum_args.mode
    model.config.pause_as_thought = curriculum_args.mode == "pause"
    model.config.supervise_end_latent = curriculum_args.supervise_end_latent
    if model_args.freeze_vision_tower:
        model.internvl.model.vision_tower.requires_grad_(False)
    if model_args.use_lora:
        model = apply_lora(model, model_args)
    return model, processor


def apply_lora(model, model_args):
    """Wrap `model` with LoRA adapters; the three latent-token embedding rows stay trainable too."""
    from peft import LoraConfig, get_peft_model

    names = "|".join(model_args.lora_target_modules)
    towers = "language_model|vision_tower" if model_args.lora_vision else "language_model"
    vision_names = "|q_proj|k_proj|v_proj|projection_layer|fc1|fc2" if model_args.lora_vision else ""
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=rf".*\.({towers})\..*\.({names}{vision_names})$",
        # The latent markers are new tokens: their embeddings must learn even though the rest is frozen;
        # with tied embeddings the lm_head rows must follow them.
        trainable_token_indices={"embed_tokens": list(model.config.latent_ids)},
        ensure_weight_tying=bool(model.config.internvl_config.tie_word_embeddings),
    )
    with warnings.catch_warnings():
        # peft (0.21) reads `PreTrainedModel.is_gradient_checkpointing`, a deprecated alias since transformers 5.23.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    return peft_model


def export_merged(peft_model, processor, directory):
    """A standalone checkpoint with the LoRA adapters merged into the weights (loads without peft).

    Merges a copy: `merge_and_unload` rewrites the model it is given, which would leave the trainer
    with no adapters to save or push.
    """
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(directory)
    processor.save_pretrained(directory)
    logger.info("Merged LoRA model written to %s", directory)
    return merged


def load_base_internvl(name_or_path, dtype, attn_implementation, max_tiles):
    """(InternVL model, processor) of a base checkpoint: `-hf` loads directly, original format is converted."""
    from convert_internvl_chat import is_internvl_chat_checkpoint, load_internvl_chat, load_internvl_chat_tokenizer

    if is_internvl_chat_checkpoint(name_or_path):
        internvl = load_internvl_chat(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = load_internvl_chat_tokenizer(name_or_path)
        return internvl, build_internvl_processor(internvl.config, tokenizer, max_tiles)
    internvl = InternVLForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementation
    )
    return internvl, load_internvl_processor(name_or_path, max_tiles)


def main(argv=None):
    model_args, data_args, curriculum_args, eval_args, training_args = parse_args(
        sys.argv[1:] if argv is None else argv
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    model, processor = build_model_and_processor(model_args, data_args, curriculum_args)
    dataset_kwargs = dict(
        processor=processor,
        mode=curriculum_args.mode,
        c_thought=curriculum_args.c_thought,
        max_latent_stage=curriculum_args.max_latent_stage,
        pad_latent_to_max=curriculum_args.pad_latent_to_max,
        supervise_end_latent=curriculum_args.supervise_end_latent,
        max_length=data_args.max_length,
        skip_bad_samples=data_args.skip_bad_samples,
        max_tiles=data_args.max_tiles,
        seed=training_args.seed,
    )
    with training_args.main_process_first(desc="loading data"):  # rank 0 generates/caches, the others read
        train_records = load_records(data_args, "train")
        evaluate = training_args.eval_strategy != "no" or training_args.do_eval
        eval_records = load_records(data_args, "eval") if evaluate else None
    train_dataset = CurriculumDataset(train_records, uniform_prob=curriculum_args.uniform_prob, **dataset_kwargs)
    eval_dataset = CurriculumDataset(eval_records, **dataset_kwargs) if evaluate else None

    schedule = CurriculumSchedule(
        epochs_per_stage=curriculum_args.epochs_per_stage,
        max_latent_stage=curriculum_args.max_latent_stage,
        first_stage=curriculum_args.first_stage,
        reset_optimizer=curriculum_args.reset_optimizer,
        mode=curriculum_args.mode,
    )
    trainer = CurriculumTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=MMCoconutCollator(
            pad_token_id=processor.tokenizer.pad_token_id, latent_token_id=model.config.latent_token_id
        ),
        processing_class=processor,
        schedule=schedule,
        generation_eval_kwargs={"max_new_tokens": eval_args.eval_max_new_tokens} if eval_args.eval_accuracy else None,
        model_card_info=dict(
            base_model=model_args.load_model_path or model_args.model_name_or_path,
            mode=curriculum_args.mode,
            recipe=yaml.safe_dump(recipe_as_trained(model_args, data_args, curriculum_args, training_args)),
            hub_model_id=training_args.hub_model_id,
        ),
    )
    check_distributed_setup(trainer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)  # with LoRA: the adapters
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"mmcoconut {curriculum_args.mode}, stage {model.config.latent_stage}")
    if model_args.use_lora and trainer.is_world_process_zero():
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            logger.warning("LoRA merge skipped: the weights are sharded; the adapters are in %s", training_args.output_dir)
        else:
            export_merged(trainer.model, processor, Path(training_args.output_dir) / "merged")
    return trainer


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


if __name__ == "__main__":
    main()
