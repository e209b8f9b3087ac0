"""The one checkpoint loader: trained MMCoconut checkpoints (merged or LoRA adapters, optionally quantized) and
InternVL base models (`-hf` or OpenGVLab's original `internvl_chat` format, converted at load time).

Every tool that loads a model (predict, app, evaluation, analysis, train.py's base model, the lmms-eval plug-in)
goes through here. `dtype` is a name (`"auto"`, `"float32"`, `"bfloat16"`, `"float16"`), which `from_pretrained`
takes as it is, or a `torch.dtype`.
"""

import json
import logging
import warnings
from pathlib import Path

import torch
from transformers import InternVLForConditionalGeneration

from configuration_mmcoconut import MMCoconutConfig
from mmcoconut.constants import QUANTIZATIONS
from mmcoconut.conversion import is_internvl_chat_checkpoint, load_internvl_chat, load_internvl_chat_tokenizer
from mmcoconut.errors import UserFileNotFoundError, UserValueError
from mmcoconut.preflight import check_model_size, read_config, require_quantization
from mmcoconut.processing import (
    build_internvl_processor,
    check_checkpoint_dir,
    load_internvl_processor,
    set_chat_template,
)
from modeling_mmcoconut import MMCoconutForConditionalGeneration

logger = logging.getLogger(__name__)


def quantization_config(name, tied_embeddings=True):
    """transformers' `quantization_config` for a `QUANTIZATIONS` choice (None for `none`).

    torchao also quantizes an untied LM head (at a 151k vocabulary it holds most of a small model's weights);
    a head tied to the input embedding stays as it is, since untying it would add a copy rather than save one.
    """
    if name not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {name!r}")
    if name == "none":
        return None
    if name == "torchao-int8":
        require_quantization(name)
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), include_input_output_embeddings=not tied_embeddings)
    if not torch.cuda.is_available():
        raise UserValueError(
            f"--quantization {name} uses bitsandbytes, which needs a CUDA GPU and there is none here; "
            "on CPU use --quantization torchao-int8"
        )
    require_quantization(name)
    from transformers import BitsAndBytesConfig

    if name == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _base_model_path(base, adapter_dir):
    """A local directory holding the LoRA base `base`: itself, or its snapshot in the Hugging Face cache (downloaded
    when the Hub can be reached). Fails at once, naming `base`, when it is nowhere to be had."""
    if Path(base).is_dir():
        return base
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE
    try:  # one attempt, not transformers' retrying from_pretrained: a missing base should fail in seconds
        return snapshot_download(base, local_files_only=offline)
    except (LocalEntryNotFoundError, HFValidationError, OSError) as error:
        where = "HF_HUB_OFFLINE is set, and it is not in the local Hugging Face cache" if offline else str(error)
        raise UserFileNotFoundError(
            f"{adapter_dir} holds LoRA adapters for the base model {base!r}, which is not a local directory and "
            f"could not be loaded ({where}). It needs the Hub (huggingface-cli download {base}) or a local copy: "
            f"point base_model_name_or_path in {Path(adapter_dir) / 'adapter_config.json'} to it."
        ) from error


def _load_lora(path, **load_kwargs):
    """The base named by `path/adapter_config.json`, with the run's config (`path/config.json`, written by train.py)
    and the adapters merged in."""
    from peft import PeftModel

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserValueError(
            f"{path} holds LoRA adapters whose adapter_config.json names no base model (a model built from a fresh "
            f"InternVL); use the merged model train.py writes to {path / 'merged'}"
        )
    base_path = _base_model_path(base, path)
    base_config = json.loads((Path(base_path) / "config.json").read_text())
    if base_config.get("model_type") != MMCoconutConfig.model_type:
        raise UserValueError(
            f"the LoRA base {base!r} is a {base_config.get('model_type')!r} model, not an MMCoconut checkpoint; "
            f"use the merged model train.py writes to {path / 'merged'}"
        )
    config = MMCoconutConfig.from_pretrained(path) if (path / "config.json").is_file() else None
    model = MMCoconutForConditionalGeneration.from_pretrained(base_path, config=config, **load_kwargs)
    logger.info("LoRA: base %s, adapters %s (merged)", base, path)
    with warnings.catch_warnings():
        # peft (0.21) reads `PreTrainedModel.is_gradient_checkpointing`, a deprecated alias since transformers 5.23.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return PeftModel.from_pretrained(model, path).merge_and_unload()


def check_hub_model_size(repo_id, dtype=None):
    """`preflight.check_model_size` for a Hub checkpoint: only its `config.json` is downloaded (a local directory's
    is checked by `check_checkpoint_dir`)."""
    from huggingface_hub import hf_hub_download

    config_file = Path(hf_hub_download(repo_id, "config.json"))
    check_model_size(read_config(config_file.parent), f"{repo_id}/config.json", dtype)


def load_model(model_path, quantization="none", dtype="auto", device=None, attn_implementation=None):
    """The model of a checkpoint or LoRA adapter directory, in eval mode on `device` (default: cuda if available).

    `quantization` is one of `QUANTIZATIONS`; `attn_implementation="eager"` is needed to show thoughts.
    """
    path = Path(model_path)
    if not (path / "adapter_config.json").is_file():
        check_checkpoint_dir(model_path, parts=("config", "weights"))
    if not path.exists():  # a Hub id: its config comes down first and is checked before any weights
        check_hub_model_size(model_path, dtype)
    tied = quantization != "none" and MMCoconutConfig.from_pretrained(model_path).tie_word_embeddings
    quantization_cfg = quantization_config(quantization, tied_embeddings=tied)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # transformers 5.25 swaps in Hub kernels by default; these are not the layers the model was checked against.
    load_kwargs = {"dtype": dtype, "use_kernels": False}
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    if (path / "adapter_config.json").is_file():
        if quantization_cfg is not None:
            raise UserValueError(f"{path} holds LoRA adapters; quantize the merged model ({path / 'merged'}) instead")
        model = _load_lora(path, **load_kwargs).to(device)
    elif quantization_cfg is not None:
        device_map = {"": 0} if quantization.startswith("bnb") else device
        model = MMCoconutForConditionalGeneration.from_pretrained(
            model_path, quantization_config=quantization_cfg, device_map=device_map, **load_kwargs
        )
    else:
        model = MMCoconutForConditionalGeneration.from_pretrained(model_path, **load_kwargs).to(device)
    return model.eval()


def load(model_path, quantization="none", dtype="auto", device=None, attn_implementation=None, max_tiles=None):
    """(model in eval mode, processor) of a checkpoint or LoRA adapter directory, ready for `predict`.

    The processor keeps the tiling saved with the checkpoint unless `max_tiles` caps it; a checkpoint saved without a
    chat template (before train.py wrote one) gets the one its config implies. See `load_model` for the arguments.
    """
    model = load_model(model_path, quantization, dtype, device, attn_implementation)
    processor = load_internvl_processor(model_path, max_tiles=max_tiles)
    if processor.chat_template is None:
        logger.info("%s has no chat template; using the one its config implies", model_path)
        set_chat_template(processor, model.config)
    return model, processor


def load_base_internvl(name_or_path, dtype=None, attn_implementation=None, max_tiles=None):
    """(InternVL model, processor) of a base checkpoint: `-hf` loads directly, original format is converted."""
    if is_internvl_chat_checkpoint(name_or_path):
        internvl = load_internvl_chat(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = load_internvl_chat_tokenizer(name_or_path)
        return internvl, build_internvl_processor(internvl.config, tokenizer, max_tiles)
    internvl = InternVLForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementation, use_kernels=False
    )
    return internvl, load_internvl_processor(name_or_path, max_tiles)


__all__ = ["quantization_config", "load_model", "load", "load_base_internvl"]
