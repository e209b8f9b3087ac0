"""Load OpenGVLab's original-format InternVL checkpoints into transformers' native InternVL, no remote code.

`OpenGVLab/InternVL3-*-Pretrained` (our default base) is published in OpenGVLab's remote-code format:
`config.json` with `model_type: internvl_chat`, an InternViT `vision_config` and an `llm_config`, and weights
named `vision_model.*`, `mlp1.*`, `language_model.model.*`, `language_model.lm_head.*`. This module maps that
config to `InternVLConfig` and renames/splits the weights into `InternVLForConditionalGeneration`'s layout,
following the mapping transformers used to publish the `-hf` checkpoints:

    vision_model.embeddings.class_embedding          -> model.vision_tower.embeddings.cls_token
    vision_model.embeddings.position_embedding       -> model.vision_tower.embeddings.position_embeddings
    vision_model.embeddings.patch_embedding.*        -> model.vision_tower.embeddings.patch_embeddings.projection.*
    vision_model.encoder.layers.N.attn.qkv.*         -> model.vision_tower.encoder.layer.N.attention.{q,k,v}_proj.*
    vision_model.encoder.layers.N.attn.proj.*        -> ....attention.projection_layer.*
    vision_model.encoder.layers.N.attn.{q,k}_norm.*  -> ....attention.{q,k}_norm.*      (InternViT-6B only)
    vision_model.encoder.layers.N.ls{1,2}            -> ....lambda_{1,2}
    vision_model.encoder.layers.N.norm{1,2}.*        -> ....layernorm_{before,after}.*
    vision_model.encoder.layers.N.mlp.fc{1,2}.*      -> ....mlp.fc{1,2}.*
    mlp1.{0,1,3}.*                                   -> model.multi_modal_projector.{layer_norm,linear_1,linear_2}.*
    language_model.model.*                           -> model.language_model.*
    language_model.lm_head.weight                    -> lm_head.weight

    model = load_internvl_chat("OpenGVLab/InternVL3-1B-Pretrained", dtype=torch.bfloat16)
    tokenizer = load_internvl_chat_tokenizer("OpenGVLab/InternVL3-1B-Pretrained")

or once, to disk: `mmcoconut-convert OpenGVLab/InternVL3-1B-Pretrained ./InternVL3-1B-Pretrained-hf`.
Only language models that transformers implements natively (Qwen2, Qwen3, Llama) are supported; InternLM2-based
checkpoints raise.
"""

import json
import logging
import os
import re
from pathlib import Path

# `<IMG_CONTEXT>` in InternVL's Qwen-based tokenizers; the original config does not store it (the remote code
# looks it up in the tokenizer at run time).
import torch
from safetensors.torch import load_file
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

from mmcoconut.constants import QWEN_IMAGE_CONTEXT_TOKEN_ID
from mmcoconut.processing import build_internvl_processor

logger = logging.getLogger(__name__)

INTERNVL_CHAT_MODEL_TYPE = "internvl_chat"
SINGLE_WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Config, index, weights and tokenizer files (vocab.json, merges.txt, tokenizer*.json); not the remote code.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt"]

# InternVisionConfig's own defaults (OpenGVLab's configuration_intern_vit.py). A config.json may omit keys equal
# to them, and several differ from InternVLVisionConfig's defaults (norm_type, qk_normalization, qkv_bias).
INTERN_VIT_DEFAULTS = {
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 48,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "dropout": 0.0,
    "drop_path_rate": 0.0,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 0.1,
}
# Keys of `llm_config` that describe OpenGVLab's training setup or remote code, not the language model.
LLM_CONFIG_DROPPED_KEYS = {
    "_name_or_path", "_attn_implementation_autoset", "architectures", "attn_implementation", "auto_map",
    "transformers_version", "use_bfloat16", "use_flash_attn", "bias", "moe_config", "use_moe", "num_experts",
    "num_routed_experts", "num_shared_experts", "moe_intermediate_size", "moe_coeff_ratio", "moe_output_scale",
    "shared_expert_intermediate_size", "capacity_factor", "eval_capacity_factor", "laux_allreduce",
    "noisy_gate_policy", "use_residual", "use_rts", "use_weighted_residual",
}  # fmt: skip
SUPPORTED_LLM_TYPES = ("qwen2", "qwen3", "llama")
INTERNVL_IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}

_VISION_LAYER = r"vision_model\.encoder\.layers\.(\d+)\."
_NATIVE_VISION_LAYER = r"model.vision_tower.encoder.layer.\1."
# (original name, native name); a name must match one pattern in full, anything else is an unknown key.
_RENAMES = [
    (r"vision_model\.embeddings\.class_embedding", "model.vision_tower.embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
     r"model.vision_tower.embeddings.patch_embeddings.projection.\1"),
    (_VISION_LAYER + r"attn\.proj\.(weight|bias)", _NATIVE_VISION_LAYER + r"attention.projection_layer.\2"),
    (_VISION_LAYER + r"attn\.(q_norm|k_norm)\.weight", _NATIVE_VISION_LAYER + r"attention.\2.weight"),
    (_VISION_LAYER + r"ls([12])", _NATIVE_VISION_LAYER + r"lambda_\2"),
    (_VISION_LAYER + r"norm1\.(weight|bias)", _NATIVE_VISION_LAYER + r"layernorm_before.\2"),
    (_VISION_LAYER + r"norm2\.(weight|bias)", _NATIVE_VISION_LAYER + r"layernorm_after.\2"),
    (_VISION_LAYER + r"mlp\.(fc[12])\.(weight|bias)", _NATIVE_VISION_LAYER + r"mlp.\2.\3"),
    # mlp1 is nn.Sequential(LayerNorm, Linear, GELU, Linear): index 2 has no weights.
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
]  # fmt: skip
_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in _RENAMES]
# InternViT's fused attn.qkv: output rows are [q; k; v], each `hidden_size` rows laid out head by head, which is
# exactly the row layout of the native separate q/k/v projections.
_FUSED_QKV = re.compile(_VISION_LAYER + r"attn\.qkv\.(weight|bias)")


def _is_local(path) -> bool:
    if Path(path).exists():
        return True
    # Anything else is taken for a Hub id, whose validation error would not say that a directory is missing.
    if os.path.isabs(path) or str(path).startswith("."):
        raise FileNotFoundError(f"no such checkpoint directory: {path}")
    return False


def _checkpoint_dir(path) -> Path:
    """A local directory holding the checkpoint; a Hub id is downloaded (config, weights, tokenizer files)."""
    if _is_local(path):
        if not Path(path).is_dir():
            raise NotADirectoryError(f"{path} is a file; expected a checkpoint directory")
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(path), allow_patterns=HUB_ALLOW_PATTERNS))


def _read_json(path, filename) -> dict:
    if _is_local(path):
        file = Path(path) / filename
        if not file.is_file():
            raise FileNotFoundError(f"no {filename} in {path}")
    else:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(repo_id=str(path), filename=filename)
    return json.loads(Path(file).read_text())


def _read_config(path) -> dict:
    return _read_json(path, "config.json")


def is_internvl_chat_checkpoint(path) -> bool:
    """Whether `path` (a local directory or a Hub id) holds an original-format (`internvl_chat`) checkpoint."""
    return _read_config(path).get("model_type") == INTERNVL_CHAT_MODEL_TYPE


def _vision_config_to_hf(vision: dict, force_image_size) -> InternVLVisionConfig:
    if vision.get("use_moe"):
        raise ValueError("InternViT with use_moe=True has no native transformers counterpart")
    v = {**INTERN_VIT_DEFAULTS, **vision}
    if force_image_size is not None and force_image_size != v["image_size"]:
        # The position embeddings are sized for vision_config.image_size; the remote code interpolates them to
        # force_image_size on every forward, which the native config cannot express.
        raise ValueError(
            f"force_image_size={force_image_size} differs from vision_config.image_size={v['image_size']}; "
            "only checkpoints whose tiles match the vision tower's image size are supported"
        )
    if v["norm_type"] not in ("layer_norm", "rms_norm"):
        raise ValueError(f"unknown InternViT norm_type {v['norm_type']!r}; expected 'layer_norm' or 'rms_norm'")
    if v["qk_normalization"] and v["layer_norm_eps"] != 1e-6:
        # The native q_norm/k_norm always use eps=1e-6; InternViT's use layer_norm_eps.
        raise ValueError(f"qk_normalization with layer_norm_eps={v['layer_norm_eps']} is not supported (needs 1e-6)")
    if v["drop_path_rate"] > 0:
        logger.warning(
            "InternViT drop_path_rate=%s is dropped: transformers' InternVLVisionModel has no stochastic depth "
            "(this only matters when training the vision tower)",
            v["drop_path_rate"],
        )
    return InternVLVisionConfig(
        hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        hidden_act=v["hidden_act"],
        attention_bias=v["qkv_bias"],
        use_qk_norm=v["qk_normalization"],
        norm_type=v["norm_type"],
        layer_norm_eps=v["layer_norm_eps"],
        attention_dropout=v["attention_dropout"],
        projection_dropout=v["dropout"],
        initializer_range=v["initializer_range"],
        layer_scale_init_value=v["initializer_factor"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        num_channels=v["num_channels"],
        use_absolute_position_embeddings=True,
        use_mask_token=False,
        # InternViT has no final norm; with mean pooling the native tower's final `layernorm` is an Identity.
        use_mean_pooling=True,
    )


def _llm_config_to_hf(llm: dict):
    model_type = llm.get("model_type")
    if model_type not in SUPPORTED_LLM_TYPES:
        raise ValueError(
            f"llm_config.model_type={model_type!r} (architectures {llm.get('architectures')}) is not supported; "
            f"supported: {SUPPORTED_LLM_TYPES}"
        )
    kwargs = {key: value for key, value in llm.items() if key not in LLM_CONFIG_DROPPED_KEYS and key != "model_type"}
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    # Pretrained checkpoints save use_cache=False (a training setting); generation needs the cache.
    kwargs["use_cache"] = True
    return CONFIG_MAPPING[model_type](**kwargs)


def internvl_chat_config_to_hf(config_dict: dict, image_token_id: int = QWEN_IMAGE_CONTEXT_TOKEN_ID) -> InternVLConfig:
    """`InternVLConfig` equivalent to an original `internvl_chat` config.json (as a dict).

    `image_token_id` is the id of `<IMG_CONTEXT>`, which the original config does not record: 151667 for the
    Qwen-based InternVL3 models, 92546 for InternLM2/Llama-based InternVL2.5 models.
    """
    if config_dict.get("model_type") != INTERNVL_CHAT_MODEL_TYPE:
        raise ValueError(f"expected model_type {INTERNVL_CHAT_MODEL_TYPE!r}, got {config_dict.get('model_type')!r}")
    for key in ("vision_config", "llm_config"):
        if key not in config_dict:
            raise ValueError(f"internvl_chat config has no {key!r}")
    # InternVLChatConfig defaults ps_version to 'v1' when absent.
    ps_version = config_dict.get("ps_version", "v1")
    if ps_version != "v2":
        # v1 skips the final transpose of pixel shuffle; the native model implements v2 only.
        raise ValueError(f"ps_version={ps_version!r} is not supported; transformers' InternVL implements 'v2'")
    if config_dict.get("use_backbone_lora") or config_dict.get("use_llm_lora"):
        raise ValueError("checkpoints with unmerged LoRA (use_backbone_lora/use_llm_lora) are not supported")

    vision_config = _vision_config_to_hf(config_dict["vision_config"], config_dict.get("force_image_size"))
    text_config = _llm_config_to_hf(config_dict["llm_config"])
    if not 0 <= image_token_id < text_config.vocab_size:
        raise ValueError(
            f"image_token_id={image_token_id} is outside the vocabulary ({text_config.vocab_size}); pass the id of "
            "<IMG_CONTEXT> in this checkpoint's tokenizer"
        )
    downsample_ratio = config_dict.get("downsample_ratio", 0.5)
    patches = (vision_config.image_size[0] // vision_config.patch_size[0]) * (
        vision_config.image_size[1] // vision_config.patch_size[1]
    )
    # The remote code ties lm_head to the embeddings according to llm_config alone; natively the top-level flag
    # decides, so both are set from it.
    tie = text_config.tie_word_embeddings
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=int(patches * downsample_ratio**2),
        downsample_ratio=downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=config_dict.get("select_layer", -1),
        # The remote code always drops the CLS token before pixel shuffle.
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    dtype = config_dict.get("torch_dtype", config_dict.get("dtype"))
    if dtype is not None:
        config.dtype = dtype
    return config


def _convert_key(key: str, tensor: torch.Tensor) -> dict | None:
    qkv = _FUSED_QKV.fullmatch(key)
    if qkv is not None:
        prefix = f"model.vision_tower.encoder.layer.{qkv.group(1)}.attention."
        # Copies, so that the three native parameters do not share one storage.
        q, k, v = (part.clone() for part in tensor.chunk(3, dim=0))
        return {f"{prefix}{name}_proj.{qkv.group(2)}": part for name, part in zip("qkv", (q, k, v))}
    for pattern, replacement in _RENAMES:
        if pattern.fullmatch(key):
            return {pattern.sub(replacement, key): tensor}
    return None


def _expected_shapes(config: InternVLConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        reference = InternVLForConditionalGeneration(config)
    shapes = {name: tensor.shape for name, tensor in reference.state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def convert_internvl_chat_state_dict(state_dict: dict, config: InternVLConfig) -> dict:
    """Rename (and split `attn.qkv`) an original-format state dict into `InternVLForConditionalGeneration` names.

    Raises `ValueError` naming every key that has no native counterpart, every native weight the checkpoint lacks,
    and every shape mismatch. With tied embeddings a stored `lm_head.weight` must equal the embeddings and is dropped.
    """
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        renamed = _convert_key(key, tensor)
        if renamed is None:
            unknown.append(key)
        else:
            converted.update(renamed)
    if unknown:
        raise ValueError(f"{len(unknown)} checkpoint keys have no InternVL counterpart: {sorted(unknown)}")

    if config.tie_word_embeddings and "lm_head.weight" in converted:
        head = converted.pop("lm_head.weight")
        embeddings = converted.get("model.language_model.embed_tokens.weight")
        if embeddings is None or not torch.equal(head, embeddings):
            raise ValueError(
                "llm_config.tie_word_embeddings is true but language_model.lm_head.weight differs from the "
                "input embeddings; the checkpoint's config and weights disagree"
            )

    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(converted))
    unused = sorted(set(converted) - set(expected))
    mismatched = sorted(
        f"{name}: checkpoint {tuple(converted[name].shape)}, model {tuple(expected[name])}"
        for name in set(expected) & set(converted)
        if converted[name].shape != expected[name]
    )
    problems = [
        f"{len(items)} {what}: {items}"
        for what, items in (("missing", missing), ("unused", unused), ("with wrong shapes", mismatched))
        if items
    ]
    if problems:
        raise ValueError("checkpoint does not match its config; weights " + "; ".join(problems))
    return converted


def _read_safetensors(directory: Path) -> dict:
    index_file = directory / WEIGHTS_INDEX_NAME
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        absent = [shard for shard in shards if not (directory / shard).is_file()]
        if absent:
            raise FileNotFoundError(f"{index_file} names shards that are not in {directory}: {absent}")
        state_dict = {}
        for shard in shards:
            part = load_file(directory / shard)
            duplicated = sorted(set(part) & set(state_dict))
            if duplicated:
                raise ValueError(f"keys stored in more than one shard (again in {shard}): {duplicated}")
            state_dict.update(part)
        unlisted = sorted(set(state_dict) - set(weight_map))
        not_found = sorted(set(weight_map) - set(state_dict))
        if unlisted or not_found:
            raise ValueError(
                f"{index_file} disagrees with its shards: in shards but not in the index {unlisted}, "
                f"in the index but not in the shards {not_found}"
            )
        return state_dict
    if (directory / SINGLE_WEIGHTS_NAME).is_file():
        return load_file(directory / SINGLE_WEIGHTS_NAME)
    raise FileNotFoundError(
        f"no {SINGLE_WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory} (only safetensors weights are supported); "
        f"found {sorted(p.name for p in directory.iterdir())}"
    )


def load_internvl_chat(
    path, dtype=None, image_token_id: int = QWEN_IMAGE_CONTEXT_TOKEN_ID, **from_pretrained_kwargs
) -> InternVLForConditionalGeneration:
    """An original-format InternVL checkpoint (local directory or Hub id) as `InternVLForConditionalGeneration`.

    `dtype` and `from_pretrained_kwargs` (e.g. `attn_implementation`, `device_map`) go to `from_pretrained`, so the
    result is what `InternVLForConditionalGeneration.from_pretrained` would give for the converted `-hf` checkpoint.
    """
    directory = _checkpoint_dir(path)
    config = internvl_chat_config_to_hf(_read_config(directory), image_token_id=image_token_id)
    state_dict = convert_internvl_chat_state_dict(_read_safetensors(directory), config)
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    from_pretrained_kwargs.setdefault("use_kernels", False)
    model = InternVLForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state_dict, **from_pretrained_kwargs
    )
    model.config._name_or_path = str(path)
    return model


def load_internvl_chat_tokenizer(path):
    """The tokenizer of an original-format checkpoint, with the attributes transformers' InternVL processor needs.

    As transformers' conversion does for the `-hf` checkpoints: `<video>` is added after the vocabulary, and
    `start_image_token`/`end_image_token`/`context_image_token`/`video_token` name `<img>`, `</img>`,
    `<IMG_CONTEXT>` and `<video>`.
    """
    # The class named in tokenizer_config.json, not AutoTokenizer: that would read config.json, whose auto_map
    # points at OpenGVLab's remote code (and prompts for trust_remote_code).
    class_name = _read_json(path, "tokenizer_config.json").get("tokenizer_class")
    tokenizer_class = tokenizer_class_from_name(class_name) if class_name else None
    if tokenizer_class is None:
        raise ValueError(f"tokenizer_class {class_name!r} of {path} is not a transformers tokenizer")
    # Checked on a plain load first: with the named tokens below, transformers appends any that are missing.
    vocabulary = tokenizer_class.from_pretrained(str(path)).get_vocab()
    missing = [token for token in INTERNVL_IMAGE_TOKENS.values() if token not in vocabulary]
    if missing:
        raise ValueError(f"tokenizer at {path} lacks InternVL's image tokens {missing}")
    named_tokens = {**INTERNVL_IMAGE_TOKENS, "video_token": "<video>"}
    return tokenizer_class.from_pretrained(str(path), extra_special_tokens=named_tokens)


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file()


def convert_checkpoint(source, destination, dtype=None, image_token_id=None):
    """Write the original-format checkpoint `source` as a native InternVL checkpoint (and processor) to `destination`."""
    directory = _checkpoint_dir(source)
    tokenizer = load_internvl_chat_tokenizer(directory) if _has_tokenizer(directory) else None
    if tokenizer is not None:
        if image_token_id is not None and image_token_id != tokenizer.context_image_token_id:
            raise ValueError(
                f"image_token_id {image_token_id} differs from the tokenizer's <IMG_CONTEXT> id "
                f"{tokenizer.context_image_token_id}"
            )
        image_token_id = tokenizer.context_image_token_id
    elif image_token_id is None:
        image_token_id = QWEN_IMAGE_CONTEXT_TOKEN_ID

    model = load_internvl_chat(directory, dtype=dtype, image_token_id=image_token_id)
    model.config._name_or_path = source
    model.save_pretrained(destination)
    if tokenizer is not None:
        build_internvl_processor(model.config, tokenizer).save_pretrained(destination)
    else:
        logger.warning("no tokenizer_config.json in %s: wrote the model only", directory)
    logger.info("wrote native InternVL checkpoint to %s", os.path.abspath(destination))


__all__ = [
    "INTERNVL_CHAT_MODEL_TYPE",
    "QWEN_IMAGE_CONTEXT_TOKEN_ID",
    "is_internvl_chat_checkpoint",
    "internvl_chat_config_to_hf",
    "convert_internvl_chat_state_dict",
    "load_internvl_chat",
    "load_internvl_chat_tokenizer",
    "convert_checkpoint",
]
