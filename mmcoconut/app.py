"""A web demo (Gradio): ask a trained model about an image and see where each continuous thought looks.

    mmcoconut-app --model outputs/demo                      # serves http://127.0.0.1:7860
    mmcoconut-app --model outputs/demo --screenshot docs/app.png --example-image X --example-question Q

Upload an image, type a question and (optionally) one choice per line: the app shows the answer, the generated
text, each continuous thought's attention over the image drawn as a heat map on the tiles the model saw, and each
thought's top tokens through the LM head. Answers come from `mmcoconut.inference.prediction.predict` (the same prompt,
generation and parsing as `mmcoconut-predict`); thoughts from `mmcoconut.analysis.attention` (as `mmcoconut-analyze`).
Needs the `app` extra: `pip install -e ".[app]"` (gradio; `--screenshot` also needs a `chromium` binary).
"""

import logging
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from mmcoconut.analysis.attention import display_token
from mmcoconut.constants import APP_QUEUE_SIZE, APP_TIME_LIMIT_S, CHOICE_LETTERS, MAX_QUESTION_CHARS
from mmcoconut.errors import UserError, UserValueError
from mmcoconut.inference.prediction import open_request_image, predict
from mmcoconut.preflight import check_question, check_thought_count, chromium_binary, thought_limit
from mmcoconut.processing import IMAGENET_MEAN, IMAGENET_STD
from mmcoconut.text.prompt import default_latents

logger = logging.getLogger("app")

TABLE_HEADERS = ["thought", "image share", "top tokens (probability)"]


def tile_images(pixel_values):
    """`(tiles, 3, H, W)` normalised tiles → `(tiles, H, W, 3)` floats in [0, 1], as the model saw them."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixel_values.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def attention_figure(prediction):
    """A PIL image: one row per thought, one column per tile (the last is the thumbnail), each tile overlaid with
    that thought's attention on its image tokens (colour scale per thought, from 0 to its largest token)."""
    tiles = tile_images(prediction.pixel_values)
    maps = prediction.image_attention  # (K, tiles, side, side)
    num_thoughts, num_tiles = maps.shape[:2]
    fig = Figure(figsize=(max(1.6 * num_tiles + 1.2, 3.4), 1.7 * num_thoughts + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(num_thoughts, num_tiles, squeeze=False))
    for k in range(num_thoughts):
        peak = float(maps[k].max()) or 1.0
        for t in range(num_tiles):
            ax = axes[k, t]
            height, width = tiles[t].shape[:2]
            ax.imshow(tiles[t])
            ax.imshow(maps[k, t].numpy() / peak, cmap="inferno", alpha=0.6, vmin=0, vmax=1,
                      extent=(0, width, height, 0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_title("thumbnail" if t == num_tiles - 1 and num_tiles > 1 else f"tile {t + 1}", fontsize=8)
        share = prediction.thoughts[k]["attention"]["mean"]["image"]
        axes[k, 0].set_ylabel(f"thought {k + 1}\nimage {share:.2f}", fontsize=8)
    fig.suptitle("each thought's attention on the image\n(mean over heads and layers; bright = more)", fontsize=8)
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def thought_rows(prediction):
    """Rows for the top-token table: thought, image share, top tokens with probabilities."""
    return [
        [
            thought["index"] + 1,
            round(thought["attention"]["mean"]["image"], 3),
            ", ".join(f"{display_token(d['token'])} {d['prob']:.3f}" for d in thought["top_k"]),
        ]
        for thought in prediction.thoughts or []
    ]


def thinking_text(config):
    """How the checkpoint thinks, for the app's header: `3 continuous thought(s)`, `no ...`, or adaptively."""
    default = default_latents(config)
    if default is not None and config.default_thinking == "adaptive":
        return f"as many continuous thoughts as it decides, at most {default},"
    return f"{default if default is not None else 'no'} continuous thought(s)"


def answer_question(model, processor, image, question, choices_text="", num_latents=None, top_k=5, max_thoughts=None,
                    time_limit_s=None):
    """(answer, generated text, heat map image or None, table rows) for the app's inputs; `choices_text` holds
    one choice per line; `num_latents` None (or empty) keeps the checkpoint's latent span.

    Every input error is a `UserValueError` with the message to show, raised before the model runs: an empty or
    too long question, more thoughts than `max_thoughts` (default: `mmcoconut.preflight.thought_limit`), an image
    that is not one or is over `MAX_IMAGE_PIXELS` (read from its header; decoded once, here). `time_limit_s` stops
    the answer's generation there, an error too rather than a cut-off answer."""
    check_question(question)
    choices = [line.strip() for line in (choices_text or "").splitlines() if line.strip()] or None
    if choices and len(choices) > len(CHOICE_LETTERS):
        raise UserValueError(f"at most {len(CHOICE_LETTERS)} choices, one per line; got {len(choices)}")
    num_latents = None if num_latents in (None, "") else int(num_latents)
    if num_latents is not None and num_latents < 0:
        raise UserValueError(f"continuous thoughts must be >= 0, got {num_latents}")
    check_thought_count(num_latents, model.config, "continuous thoughts", limit=max_thoughts)
    if image is not None:
        image = open_request_image(image)
    span = default_latents(model.config) if num_latents is None else num_latents
    started = time.monotonic()
    prediction = predict(
        model, processor, image, question.strip(), choices=choices, num_latents=num_latents,
        show_thoughts=bool(span), top_k=top_k, max_time=time_limit_s,
    )
    if time_limit_s is not None and time.monotonic() - started >= time_limit_s:
        raise UserValueError(f"the answer took longer than the {time_limit_s:g} s this app allows for one; ask with "
                             "fewer continuous thoughts, a smaller image or a shorter question")
    answer = prediction.answer if prediction.answer is not None else f"(unparseable: {prediction.parse_error})"
    heat_map = attention_figure(prediction) if prediction.image_attention is not None else None
    return answer, prediction.generated_text, heat_map, thought_rows(prediction)


def build_demo(model, processor, model_name, example=None, trained_on=None, max_thoughts=None,
               time_limit_s=APP_TIME_LIMIT_S, queue_size=APP_QUEUE_SIZE):
    """The Gradio Blocks app; `example` (image path, question, choices text) pre-fills the inputs and shows its
    answer (used for the screenshot); `trained_on` says in words what the model was trained on (None: unknown).

    Requests are queued (`queue_size` waiting at most, one running); an input error reaches the user as a
    `gr.Error` with its message, at once, while the queue goes on answering; `max_thoughts` (default: 4 x the
    checkpoint's) and `time_limit_s` bound what one request may take (`answer_question`)."""
    import gradio as gr

    # Empty: the checkpoint's own count, or for a checkpoint that thinks adaptively, the model decides.
    default = None if model.config.default_thinking == "adaptive" else default_latents(model.config)
    limit = thought_limit(model.config) if max_thoughts is None else max_thoughts

    def run(image, question, choices, latents):
        try:
            return answer_question(model, processor, image, question, choices, latents, max_thoughts=limit,
                                   time_limit_s=time_limit_s)
        except UserError as error:
            raise gr.Error(str(error)) from None

    shown = run(*example, default) if example is not None else (None, None, None, None)
    with gr.Blocks(title="mmcoconut: continuous thoughts") as demo:
        gr.Markdown(
            f"## mmcoconut · `{model_name}`\n"
            f"Coconut on InternVL: the model thinks in {thinking_text(model.config)} (`<|latent|>`) before it "
            "writes. Heat maps show where each thought attends in the image.\n\n"
            f"Trained on: {trained_on or 'not stated (the checkpoint has no mmcoconut model card)'}. "
            "It answers questions like those; others get answers of the same form, not of the same worth."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="image", value=example[0] if example else None)
                question = gr.Textbox(label="question", value=example[1] if example else "",
                                      max_length=MAX_QUESTION_CHARS)
                choices = gr.Textbox(label="choices (optional, one per line)", lines=4,
                                     value=example[2] if example else "")
                latents = gr.Number(label="continuous thoughts (empty: the checkpoint's, or its own choice)",
                                    value=default, precision=0, minimum=0, maximum=limit)
                button = gr.Button("Answer", variant="primary")
            with gr.Column():
                answer = gr.Textbox(label="answer", value=shown[0])
                generated = gr.Textbox(label="generated text", value=shown[1])
                heat_map = gr.Image(label="where each thought looks", type="pil", value=shown[2])
                table = gr.Dataframe(headers=TABLE_HEADERS, label="what each thought decodes to", value=shown[3])
        button.click(run, [image, question, choices, latents], [answer, generated, heat_map, table],
                     api_name="answer", concurrency_limit=1)
    return demo.queue(max_size=queue_size, default_concurrency_limit=1)


def free_port(host="127.0.0.1"):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def take_screenshot(url, path, width=1400, height=1000):
    """A PNG of `url` from headless Chromium (Debian's `chromium` package)."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("--screenshot needs Chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        command = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={width},{height}",
            "--virtual-time-budget=15000", f"--screenshot={Path(path).resolve()}", url,
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=180)
    logger.info("wrote %s", path)


