"""Shared test fixtures. Append new fixtures; don't rewrite others'."""

import pytest

from mmcoconut.processing import build_internvl_tokenizer


@pytest.fixture(scope="session")
def base_tokenizer_dir(tmp_path_factory):
    """The offline InternVL3 tokenizer, built once per session (~12 s) and saved for cheap reloads."""
    path = tmp_path_factory.mktemp("internvl3_tokenizer")
    build_internvl_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def internvl_tokenizer(base_tokenizer_dir):
    """A fresh copy of the InternVL3 tokenizer (tests may add tokens to it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_tokenizer_dir)


# ---- data fixtures (issue 3) ----


@pytest.fixture(scope="session")
def latent_processor(base_tokenizer_dir):
    """`InternVLProcessor` for `tiny_internvl_config()` (28-px tiles, 4 image tokens per tile, at most 8 tiles)
    whose tokenizer has the three latent tokens. Session-wide: don't mutate it."""
    from transformers import AutoTokenizer

    from configuration_mmcoconut import LATENT_TOKENS
    from mmcoconut.processing import build_internvl_processor, tiny_internvl_config

    tokenizer = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": list(LATENT_TOKENS)}, replace_extra_special_tokens=False)
    return build_internvl_processor(tiny_internvl_config(), tokenizer, max_tiles=8)


@pytest.fixture(scope="session")
def synthetic_aokvqa(tmp_path_factory):
    """The generated A-OKVQA-shaped set (6 train, 3 val, seed 0), with its Hub-layout copy saved at `hf_dir`.
    A dict of paths: aokvqa_dir, coco_dir, canonical_dir, hf_dir. Read-only."""
    from mmcoconut.data.synthetic import official_to_hf, write_synthetic_aokvqa

    out = tmp_path_factory.mktemp("synthetic_aokvqa")
    paths = write_synthetic_aokvqa(out, n_train=6, n_val=3, seed=0)
    paths["hf_dir"] = out / "hf"
    official_to_hf(paths["aokvqa_dir"], paths["coco_dir"]).save_to_disk(paths["hf_dir"])
    return paths


@pytest.fixture(scope="session")
def tiny_checkpoint(base_tokenizer_dir, tmp_path_factory):
    """A random tiny InternVL3 with the real vocabulary, wrapped (c_thought 2, trained-at stage 1) and
    saved with its processor, as training does. Read-only."""
    import torch
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from mmcoconut.processing import build_internvl_processor, tiny_internvl_config
    from modeling_mmcoconut import MMCoconutForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    internvl = InternVLForConditionalGeneration(tiny_internvl_config())
    model = MMCoconutForConditionalGeneration.from_internvl(internvl, tokenizer, c_thought=2)
    model.config.latent_stage = 1
    path = tmp_path_factory.mktemp("tiny_checkpoint")
    model.save_pretrained(path)
    build_internvl_processor(tiny_internvl_config(), tokenizer, max_tiles=4).save_pretrained(path)
    return path


# ---- transformers deprecations (issue 12) ----


@pytest.fixture(autouse=True)
def no_logged_transformers_deprecation(caplog):
    """Fail a test in which transformers logs a deprecation. Some renames are announced only by logging
    (5.24's `past_key_values` -> `cache`), not by the warnings that setup.cfg's filterwarnings turns into errors."""
    yield
    messages = [
        record.getMessage()
        for record in caplog.get_records("call")
        if record.name.startswith("transformers") and "deprecated" in record.getMessage()
    ]
    if messages:
        pytest.fail(f"transformers logged a deprecation: {messages}")


# ---- inference (issue 14) ----


@pytest.fixture(scope="session")
def inference_checkpoint(tiny_checkpoint, tmp_path_factory):
    """`tiny_checkpoint` (coconut, stage 1, c_thought 2: 2 latents; 4 tiles at most) with what `train.py` adds for
    inference: the chat template and a generation budget (`prepare_for_inference`). Read-only."""
    import shutil

    from mmcoconut.processing import load_internvl_processor, prepare_for_inference
    from modeling_mmcoconut import MMCoconutForConditionalGeneration

    path = tmp_path_factory.mktemp("inference_checkpoint") / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    model = MMCoconutForConditionalGeneration.from_pretrained(path)
    processor = load_internvl_processor(path)
    prepare_for_inference(model.config, model.generation_config, processor, max_new_tokens=8)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def question_image(tmp_path_factory):
    """A 56×28 RGB test image saved as PNG (2 tiles + thumbnail at 28 px); returns its path."""
    from PIL import Image

    path = tmp_path_factory.mktemp("question_image") / "board.png"
    image = Image.new("RGB", (56, 28), (255, 255, 255))
    image.paste((200, 30, 30), (0, 0, 28, 28))
    image.paste((30, 30, 200), (28, 0, 56, 28))
    image.save(path)
    return path


# ---- checks before loading (issue 16) ----


@pytest.fixture
def no_loading(monkeypatch):
    """Make every model or data load fail, so a test shows that its check came first."""
    from mmcoconut.cli import evaluate as evaluate_aokvqa
    from mmcoconut.data import aokvqa as data_aokvqa
    from mmcoconut.training import build as training_build
    from modeling_mmcoconut import MMCoconutForConditionalGeneration

    def refuse(*args, **kwargs):
        raise AssertionError("a model or data was loaded before the check")

    monkeypatch.setattr(training_build, "build_model_and_processor", refuse)  # the train command imports them
    monkeypatch.setattr(training_build, "load_records", refuse)               # from here when it runs
    monkeypatch.setattr(MMCoconutForConditionalGeneration, "from_pretrained", refuse)
    monkeypatch.setattr(evaluate_aokvqa, "load_records", refuse)
    monkeypatch.setattr(data_aokvqa, "load_canonical", refuse)  # the analysis CLI imports it when it runs
