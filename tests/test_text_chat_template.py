"""The saved chat template gives the training-time prompt; loading keeps the saved tiling; generate has a budget."""

import copy

import pytest
import torch
from PIL import Image

from mmcoconut.data.curriculum import CurriculumDataset
from mmcoconut.evaluation.aokvqa import build_eval_dataset
from mmcoconut.processing import load_internvl_processor, set_chat_template
from mmcoconut.text.prompt import messages_for
from modeling_mmcoconut import MMCoconutForConditionalGeneration


def _record(image):
    return {"id": "q", "image": image, "question": "What colour is the left square?\nA. red\nB. blue",
            "steps": ["The left square is red.", "Red is A."], "answer": "A. red"}


def _template_inputs(processor, image, question, **kwargs):
    return processor.apply_chat_template(
        messages_for(question, image), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt", **kwargs,
    )


def test_template_of_a_coconut_checkpoint_is_the_evaluation_prompt(inference_checkpoint, question_image):
    """Default: the checkpoint's latent_stage × c_thought latents (1 × 2) after the assistant header, exactly the
    ids (and tiles) `evaluate_aokvqa --mode coconut` feeds the model."""
    model = MMCoconutForConditionalGeneration.from_pretrained(inference_checkpoint)
    processor = load_internvl_processor(inference_checkpoint)
    record = _record(str(question_image))
    dataset = build_eval_dataset([record], processor, "coconut", model.config)
    expected = dataset.prompt_features(0, num_latents=model.config.num_inference_latents)
    inputs = _template_inputs(processor, Image.open(question_image), record["question"])
    assert inputs["input_ids"][0].tolist() == expected["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"], atol=0, rtol=0)
    tokenizer = processor.tokenizer
    assert tokenizer.decode(inputs["input_ids"][0][-4:]) == "<|start-latent|><|latent|><|latent|><|end-latent|>"


@pytest.mark.parametrize("num_latents", [0, 3, 6])
def test_num_latents_overrides_the_default(inference_checkpoint, question_image, num_latents):
    processor = load_internvl_processor(inference_checkpoint)
    model = MMCoconutForConditionalGeneration.from_pretrained(inference_checkpoint)
    record = _record(str(question_image))
    dataset = build_eval_dataset([record], processor, "coconut", model.config)
    inputs = _template_inputs(processor, Image.open(question_image), record["question"], num_latents=num_latents)
    assert inputs["input_ids"][0].tolist() == dataset.prompt_features(0, num_latents=num_latents)["input_ids"].tolist()


@pytest.mark.parametrize("mode", ["cot", "no_cot", "no_thoughts", "pause"])
@pytest.mark.parametrize("with_image", [True, False])
def test_template_follows_the_training_layout_of_every_mode(inference_checkpoint, question_image, mode, with_image):
    """cot / no_cot checkpoints get no latent span, no_thoughts an empty one, pause the coconut span: the prompt
    part (everything before the steps) of the sequences those modes train on, with and without an image."""
    config = copy.deepcopy(MMCoconutForConditionalGeneration.from_pretrained(inference_checkpoint).config)
    config.training_mode = mode
    processor = set_chat_template(load_internvl_processor(inference_checkpoint), config)
    record = _record(str(question_image) if with_image else None)
    dataset = CurriculumDataset([record], processor, mode=mode, c_thought=config.c_thought,
                                max_latent_stage=config.latent_stage)
    expected = dataset.prompt_features(0, num_latents=None if mode in ("cot", "no_cot") else
                                       config.num_inference_latents)
    # The training sequence at the checkpoint's stage starts with exactly this prompt.
    dataset.set_stage(config.latent_stage)
    assert dataset[0]["input_ids"][: len(expected["input_ids"])].tolist() == expected["input_ids"].tolist()
    image = Image.open(question_image) if with_image else None
    inputs = _template_inputs(processor, image, record["question"])
    assert inputs["input_ids"][0].tolist() == expected["input_ids"].tolist()
    assert ("pixel_values" in inputs) == with_image


def test_template_refuses_a_system_turn(inference_checkpoint):
    processor = load_internvl_processor(inference_checkpoint)
    messages = [{"role": "system", "content": "Be brief."}] + messages_for("Hi?")
    with pytest.raises(Exception, match="user and assistant turns only"):
        processor.apply_chat_template(messages, add_generation_prompt=True)


def test_loading_keeps_the_saved_tiling_unless_asked(inference_checkpoint):
    """The checkpoint was saved with at most 4 tiles; loading used to reset it to 8."""
    assert load_internvl_processor(inference_checkpoint).image_processor.max_patches == 4
    assert load_internvl_processor(inference_checkpoint, max_tiles=2).image_processor.max_patches == 2


def test_apply_chat_template_and_generate_answer_within_the_saved_budget(inference_checkpoint, question_image):
    model = MMCoconutForConditionalGeneration.from_pretrained(inference_checkpoint).eval()
    assert model.generation_config.max_new_tokens == 8
    processor = load_internvl_processor(inference_checkpoint)
    inputs = _template_inputs(processor, Image.open(question_image), "What colour is the left square?")
    with torch.no_grad():
        output = model.generate(**inputs)
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    stopped = model.generation_config.eos_token_id in output[0, inputs["input_ids"].shape[1] :].tolist()
    assert new_tokens == 8 or (stopped and new_tokens < 8)


def test_prepare_for_inference_sets_a_budget_only_where_there_is_none(inference_checkpoint):
    from transformers import GenerationConfig

    from mmcoconut.processing import prepare_for_inference

    model = MMCoconutForConditionalGeneration.from_pretrained(inference_checkpoint)
    processor = load_internvl_processor(inference_checkpoint)
    fresh, kept = GenerationConfig(), GenerationConfig(max_new_tokens=100)
    prepare_for_inference(model.config, fresh, processor, max_new_tokens=48)
    prepare_for_inference(model.config, kept, processor, max_new_tokens=48)
    assert (fresh.max_new_tokens, kept.max_new_tokens) == (48, 100)
