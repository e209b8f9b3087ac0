"""Batched completions of chat prompts (`mmcoconut.inference.completion`, what the lmms-eval plug-in calls): each
completion is what `predict` answers for its prompt alone, whatever else shares the batch."""

import pytest

from mmcoconut.inference.completion import OPEN_SPAN, complete, template_latents
from mmcoconut.inference.loading import load
from mmcoconut.inference.prediction import predict

QUESTIONS = ["What is on the left?", "Which colour is the right square, and why do you think so?"]


@pytest.fixture(scope="module")
def loaded(inference_checkpoint):
    return load(inference_checkpoint)


@pytest.mark.parametrize("num_latents", [None, 0, 3])
def test_a_batch_answers_each_prompt_as_predict_does(loaded, question_image, num_latents):
    model, processor = loaded
    prompts = [(question_image, QUESTIONS[0]), (None, QUESTIONS[1]), (question_image, QUESTIONS[1])]
    completions = complete(model, processor, prompts, num_latents=num_latents)
    alone = [predict(model, processor, image, text, num_latents=num_latents) for image, text in prompts]
    assert [c.text for c in completions] == [p.generated_text for p in alone]
    assert [c.num_thoughts for c in completions] == [2 if num_latents is None else num_latents] * 3


def test_decoding_options_reach_generate(loaded, question_image):
    model, processor = loaded
    (completion,) = complete(model, processor, [(question_image, QUESTIONS[0])], max_new_tokens=2)
    assert len(processor.tokenizer(completion.text, add_special_tokens=False)["input_ids"]) <= 2


def test_thinking_choices_give_the_template_its_span(loaded):
    config = loaded[0].config  # coconut, latent_stage 1 × c_thought 2: 2 latents
    assert template_latents(config) is None  # the template's own default
    assert template_latents(config, thinking="fixed") == 2
    assert template_latents(config, num_latents=5) == 5
    assert template_latents(config, thinking="adaptive") == OPEN_SPAN
    with pytest.raises(ValueError, match="cannot be combined with thinking=adaptive"):
        template_latents(config, num_latents=1, thinking="adaptive")
    with pytest.raises(ValueError, match="thinking must be one of"):
        template_latents(config, thinking="sometimes")
