"""The prompt layout, in one place: training, evaluation, the saved chat template, `predict.py` and `app.py`.

    <|im_start|>user\\n <IMG_CONTEXT>\\n {question}<|im_end|>\\n<|im_start|>assistant\\n  [<|start-latent|> <|latent|>×n <|end-latent|>]

(the processor expands `<IMG_CONTEXT>` into `<img>` + `<IMG_CONTEXT>`×(tokens per tile · tiles) + `</img>`; a
checkpoint that thinks adaptively is prompted with the open span, `<|start-latent|>` alone, and decides how many
thoughts follow).
`CurriculumDataset` builds its prompts with `user_prompt`; `chat_template` writes the same strings into a Jinja
template, so `processor.apply_chat_template` gives the training-time token ids (tests compare them).
"""

import json

from configuration_mmcoconut import END_LATENT_TOKEN, LATENT_TOKEN, START_LATENT_TOKEN
from mmcoconut.constants import CHOICE_LETTERS
from mmcoconut.modes import LATENT_MODES

USER_HEADER = "<|im_start|>user\n"
END_OF_TURN = "<|im_end|>\n"
ASSISTANT_HEADER = "<|im_start|>assistant\n"


def step_text(step):
    """A reasoning step as the sequence holds it: one line."""
    return f"{step}\n"


def answer_text(answer):
    """The answer line as the sequence holds it (`<|im_end|>` follows it)."""
    return f"Answer: {answer}"


def tokenizer_texts(records):
    """What a task tokenizer (`processing_mmcoconut.build_task_tokenizer`) is trained on: the chat roles and each
    record's question, steps and answer line, as the sequences hold them."""
    return ["user\n", "assistant\n"] + [
        text
        for record in records
        for text in (record["question"], *map(step_text, record["steps"]), answer_text(record["answer"]))
    ]


def render_choices(question, choices):
    """`question` followed by one line per choice: `A. ..` to `D. ..`."""
    lines = [f"{letter}. {choice}" for letter, choice in zip(CHOICE_LETTERS, choices)]
    return "\n".join([question.strip(), *lines])


def user_prompt(question, image_token=None):
    """The prompt text up to the open assistant turn; `image_token` (the processor's placeholder) puts an image
    before the question."""
    image = f"{image_token}\n" if image_token else ""
    return f"{USER_HEADER}{image}{question}{END_OF_TURN}{ASSISTANT_HEADER}"


def latent_span(num_latents):
    """`<|start-latent|>` + `num_latents` × `<|latent|>` + `<|end-latent|>` as text."""
    if num_latents < 0:
        raise ValueError(f"num_latents must be >= 0, got {num_latents}")
    return START_LATENT_TOKEN + LATENT_TOKEN * num_latents + END_LATENT_TOKEN


def default_latents(config):
    """Latents a checkpoint is prompted with by default: `config.num_inference_latents` for latent modes
    (coconut, pause, no_thoughts), None (no latent span at all) for cot / no_cot checkpoints."""
    if config.training_mode not in LATENT_MODES:
        return None
    return config.num_inference_latents


def chat_template(image_token, num_latents=None, open_span=False):
    """A Jinja chat template that renders `user_prompt` (+ `latent_span` on the generation prompt).

    `num_latents` is the default baked into the template (None: no latent span); a caller overrides it with
    `processor.apply_chat_template(..., num_latents=N)`. With `open_span` (a checkpoint that thinks adaptively) the
    default generation prompt ends with `<|start-latent|>` alone, for the model to decide how many thoughts follow;
    `num_latents=N` still gives the closed span of N latents (generate it with `thinking="fixed"`). User content is
    a string or a list of `{"type": "image"}` and `{"type": "text", "text": ...}` items, rendered in order; earlier
    assistant turns are their text.
    """
    literal = json.dumps  # a JSON string is a valid Jinja string literal, escapes included
    default = "'open'" if open_span else "none" if num_latents is None else str(int(num_latents))
    return (
        "{%- set n = num_latents if num_latents is defined and num_latents is not none else " + default + " -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ " + literal(USER_HEADER) + " }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ " + literal(f"{image_token}\n") + " }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- else -%}{{ raise_exception('unsupported content type: ' + item['type']) }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}{{ " + literal(END_OF_TURN) + " }}"
        "{%- elif message['role'] == 'assistant' -%}{{ " + literal(ASSISTANT_HEADER) + " }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}{{ item['text'] }}{%- endfor -%}{%- endif -%}"
        "{{ " + literal(END_OF_TURN) + " }}"
        "{%- else -%}{{ raise_exception('this model was trained with user and assistant turns only, not '"
        " + message['role']) }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + literal(ASSISTANT_HEADER) + " }}"
        "{%- if n is not none -%}{{ " + literal(START_LATENT_TOKEN) + " }}"
        "{%- if n != 'open' -%}{%- for _ in range(n) -%}{{ " + literal(LATENT_TOKEN) + " }}{%- endfor -%}"
        "{{ " + literal(END_LATENT_TOKEN) + " }}{%- endif -%}{%- endif -%}{%- endif -%}"
    )


def messages_for(question, image=None):
    """A one-turn conversation for `apply_chat_template` / `pipeline`: the image (if any), then the question."""
    content = [] if image is None else [{"type": "image", "image": image}]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


__all__ = [
    "USER_HEADER", "END_OF_TURN", "ASSISTANT_HEADER", "step_text", "answer_text", "tokenizer_texts",
    "render_choices", "user_prompt", "latent_span", "default_latents", "chat_template", "messages_for",
]
