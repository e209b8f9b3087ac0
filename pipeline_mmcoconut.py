"""The image-text-to-text pipeline of MMCoconut checkpoints: transformers' own, refusing a plain-text prompt.

A checkpoint answers the prompt it was trained on: the chat template adds the image placeholder and the latent span
(`<|start-latent|>` + thoughts + `<|end-latent|>`). transformers' pipeline passes a plain string to the processor
as it is, which fails with "Found total 0 <IMG_CONTEXT> tokens" or, without an image, answers a prompt the model never
saw. This pipeline refuses such a string up front with the chat form to use instead; a chat, or a prompt already made
by `processor.apply_chat_template`, runs unchanged. `config.custom_pipelines` points `pipeline("image-text-to-text",
..., trust_remote_code=True)` here.

Like `modeling_mmcoconut.py`, this file is saved beside the weights as remote code: it imports only transformers.
"""

from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

CHAT_FORM = (
    'pipe(text=[{"role": "user", "content": [{"type": "image", "image": image}, '
    '{"type": "text", "text": question}]}], return_full_text=False)'
)


def _plain_prompts(text):
    """The prompts of `text` when it is a string or a list of strings (not a chat), else None."""
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
        return list(text)
    return None


class MMCoconutImageTextToTextPipeline(ImageTextToTextPipeline):
    """`ImageTextToTextPipeline` that raises on a plain prompt without the image placeholder (see the module)."""

    def __call__(self, images=None, text=None, **kwargs):
        prompts = _plain_prompts(text)
        placeholders = {"<image>", getattr(self.processor, "image_token", None) or "<IMG_CONTEXT>"}
        if prompts is not None and not all(any(p in prompt for p in placeholders) for prompt in prompts):
            raise ValueError(
                "this MMCoconut checkpoint answers the chat form (its template adds the image and the continuous "
                f"thoughts), not a plain prompt: {CHAT_FORM}; or pass a prompt made by processor.apply_chat_template"
            )
        return super().__call__(images=images, text=text, **kwargs)


__all__ = ["MMCoconutImageTextToTextPipeline"]
