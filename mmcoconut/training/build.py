"""What a run trains on and with: its records (generating the synthetic set once), its model and processor."""

import contextlib
import copy
import json
import logging
import warnings
from pathlib import Path

import torch
from transformers import InternVLForConditionalGeneration
from transformers.integrations import deepspeed as hf_deepspeed

from mmcoconut.constants import DATA_SOURCES, TOKENIZERS
from mmcoconut.data import aokvqa as data_aokvqa
from mmcoconut.data.synthetic import write_synthetic_aokvqa
from mmcoconut.inference.loading import load_base_internvl
from mmcoconut.processing import (
    INTERNVL3_VOCAB_SIZE,
    build_internvl_processor,
    build_internvl_tokenizer,
    build_task_tokenizer,
    load_internvl_processor,
    tiny_internvl_config,
)
from mmcoconut.text.prompt import tokenizer_texts
from modeling_mmcoconut import MMCoconutForConditionalGeneration

logger = logging.getLogger(__name__)


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


def build_tiny_model(overrides, text_tokenizer, max_tiles, attn_implementation="sdpa", dtype=None):
    """(model, processor): a randomly initialised tiny InternVL3-shaped MMCoconut model sized to `text_tokenizer`.

    `overrides` are `tiny_internvl_config` keyword arguments. InternVL3's own tokenizer keeps the config's
    default vocabulary (151,674 ids, `<video>` after it, as transformers' conversion has it); a task tokenizer
    sets the vocabulary and the `<IMG_CONTEXT>` id to its own.
    """
    if len(text_tokenizer) > INTERNVL3_VOCAB_SIZE:
        internvl_config = tiny_internvl_config(**overrides)
    else:
        internvl_config = tiny_internvl_config(
            vocab_size=len(text_tokenizer), image_token_id=text_tokenizer.context_image_token_id, **overrides
        )
    internvl_config._attn_implementation = attn_implementation
    processor = build_internvl_processor(internvl_config, text_tokenizer, max_tiles)
    with _outside_zero3_init():
        internvl = InternVLForConditionalGeneration(internvl_config)
    model = MMCoconutForConditionalGeneration.from_internvl(internvl, processor.tokenizer, dtype=dtype)
    return model, processor


@contextlib.contextmanager
def _outside_zero3_init():
    """Construct a model whole, as without DeepSpeed, even when the accelerate config is ZeRO-3.

    transformers builds sub-models (`AutoModel.from_config`) inside `deepspeed.zero.Init` with weight
    initialisation skipped while a ZeRO-3 config is registered, so a from-scratch model would start from other
    weights than under DDP. The tiny model fits on every rank; the DeepSpeed engine partitions it afterwards.
    """
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def build_text_tokenizer(model_args, train_records):
    """The tokenizer of a tiny model: InternVL3's, or one trained on `train_records` (`tokenizer: task`)."""
    if model_args.tokenizer == "internvl":
        return build_internvl_tokenizer()
    if model_args.tokenizer == "task":
        return build_task_tokenizer(tokenizer_texts(train_records), model_args.task_vocab_size)
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {model_args.tokenizer!r}")


def build_model_and_processor(model_args, data_args, curriculum_args, train_records=None):
    """The model to train and its processor. `train_records` feed the task tokenizer (`tokenizer: task`)."""
    dtype = getattr(torch, model_args.model_dtype)
    if model_args.tokenizer != "internvl" and model_args.tiny_internvl is None:
        raise ValueError(f"tokenizer: {model_args.tokenizer} builds a new vocabulary, so it needs tiny_internvl "
                         "(a model trained from scratch); a loaded model keeps its own tokenizer")
    if model_args.load_model_path:
        model = MMCoconutForConditionalGeneration.from_pretrained(
            model_args.load_model_path, dtype=dtype, attn_implementation=model_args.attn_implementation,
            use_kernels=False,
        )
        processor = load_internvl_processor(model_args.load_model_path, data_args.max_tiles)
    elif model_args.tiny_internvl is not None:
        overrides = model_args.tiny_internvl
        overrides = json.loads(overrides) if isinstance(overrides, str) else dict(overrides)
        model, processor = build_tiny_model(
            overrides, build_text_tokenizer(model_args, train_records), data_args.max_tiles,
            model_args.attn_implementation, dtype,
        )
    else:
        internvl, processor = load_base_internvl(
            model_args.model_name_or_path, dtype, model_args.attn_implementation, data_args.max_tiles
        )
        model = MMCoconutForConditionalGeneration.from_internvl(internvl, processor.tokenizer)
    model.config.c_thought = curriculum_args.c_thought
    model.config.training_mode = curriculum_args.mode
    model.config.supervise_end_latent = curriculum_args.supervise_end_latent
    step_supervised = curriculum_args.thought_supervision == "step"
    model.config.thought_supervision_weight = curriculum_args.thought_supervision_weight if step_supervised else 0.0
    if model_args.freeze_vision_tower:
        model.internvl.model.vision_tower.requires_grad_(False)
    if model_args.use_lora:
        model = apply_lora(model, model_args)
    return model, processor


def apply_lora(model, model_args):
    """Wrap `model` with LoRA adapters; the three latent-token embedding rows stay trainable too."""
    from peft import LoraConfig, get_peft_model  # seconds to import, and only LoRA runs need it

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


__all__ = [
    "load_records", "ensure_synthetic_data", "build_tiny_model", "build_text_tokenizer", "build_model_and_processor",
    "apply_lora", "export_merged",
]
