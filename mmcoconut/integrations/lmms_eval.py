"""The lmms-eval plug-in: model id `mmcoconut`, so that any lmms-eval generation task scores an MMCoconut checkpoint.

    pip install -e ".[lmms-eval]"
    python -m lmms_eval --model mmcoconut --model_args pretrained=outputs/demo,num_latents=3 \\
        --tasks aokvqa_mc --include_path lmms_eval_tasks --batch_size 4 --output_path outputs/lmms
    accelerate launch -m lmms_eval --model mmcoconut ...     # the requests are split across processes

The checkpoint loads through the one loader (`mmcoconut.inference.loading.load`: merged or LoRA, `quantization`,
`dtype`, `device`, `max_tiles` as predict.py takes them); each request is prompted through the checkpoint's chat
template, thinks as the checkpoint does (its latent count, or adaptively for a checkpoint trained to stop thinking)
unless `num_latents=`, `thinking=`, `max_thoughts=`, `end_latent_threshold=` say otherwise, and is answered in
batches of `--batch_size` (`mmcoconut.inference.completion.complete`). lmms-eval registers the class through the
`lmms_eval.models` entry point (setup.cfg) and splits the requests across processes itself (`rank`, `world_size`).

Only `generate_until` requests are answered: a loglikelihood task or a multi-round one is refused with an error
naming it. docs/evaluation.md#evaluate-with-lmms-eval has the commands and what is refused.
"""

import logging

from accelerate import Accelerator
from lmms_eval import utils as lmms_utils
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from mmcoconut.constants import DTYPE_NAMES, QUANTIZATIONS, THINKING_MODES
from mmcoconut.errors import UserValueError
from mmcoconut.inference.completion import complete, template_latents
from mmcoconut.inference.loading import load

logger = logging.getLogger(__name__)

MODEL_ID = "mmcoconut"
# lmms-eval's `gen_kwargs` this plug-in honours; any other key is refused (ignoring it would change the results).
GEN_KWARGS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams")


def decoding_options(gen_kwargs, task):
    """`complete`'s decoding options and the `until` strings for a request's `gen_kwargs`.

    lmms-eval's convention: `temperature: 0` is greedy, a positive temperature samples unless `do_sample: false`
    says otherwise. Options a task does not set stay None, so the checkpoint's generation_config decides them.
    """
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise UserValueError(
            f"task {task!r}: the mmcoconut model does not support the generation options {unknown} "
            f"(it honours {', '.join(GEN_KWARGS)}); remove them from the task's generation_kwargs / --gen_kwargs"
        )
    if gen_kwargs.get("num_beams", 1) != 1:
        raise UserValueError(f"task {task!r}: num_beams={gen_kwargs['num_beams']}; the mmcoconut model decodes "
                             "greedily or by sampling, not with beam search (set num_beams: 1)")
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(stop, str) for stop in until):
        raise UserValueError(f"task {task!r}: until must be a string or a list of strings, got {until!r}")
    temperature = gen_kwargs.get("temperature")
    do_sample = gen_kwargs.get("do_sample")
    if do_sample is None and temperature is not None:
        do_sample = float(temperature) > 0
    options = {"max_new_tokens": gen_kwargs.get("max_new_tokens"), "do_sample": do_sample}
    if do_sample:  # greedy decoding ignores temperature and top_p; they are passed only when sampling
        if temperature is not None and float(temperature) <= 0:
            raise UserValueError(f"task {task!r}: do_sample with temperature {temperature}; sampling needs a "
                                 "temperature > 0 (or set do_sample: false for greedy decoding)")
        options.update(temperature=None if temperature is None else float(temperature), top_p=gen_kwargs.get("top_p"))
    return options, [stop for stop in until if stop]


def cut_at(text, until):
    """`text` up to the first occurrence of any `until` string (lmms-eval's stop sequences)."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


class MMCoconutLMM(lmms):
    """An MMCoconut checkpoint as an lmms-eval model (`--model mmcoconut --model_args pretrained=PATH,...`).

    Args:
        pretrained: checkpoint directory, Hub id or LoRA adapter directory.
        quantization: one of `QUANTIZATIONS` (`none`, `torchao-int8`, `bnb-8bit`, `bnb-4bit`).
        dtype: one of `DTYPE_NAMES` (`auto`: the checkpoint's).
        device: where the model runs (default: cuda if available; under `accelerate launch`, each process's device).
        max_tiles: InternVL tiles per image, at most (default: the tiling saved with the checkpoint).
        num_latents: latents in every prompt (a closed span, `thinking=fixed`); default: the checkpoint's.
        thinking: `fixed` or `adaptive` (default: the checkpoint's: adaptive for one trained to stop thinking).
        max_thoughts, end_latent_threshold: adaptive thinking's bounds (default: the checkpoint's).
        batch_size: prompts per `generate` call, per process (lmms-eval's `--batch_size`).
    """

    is_simple = True

    def __init__(self, pretrained, quantization="none", dtype="auto", device=None, max_tiles=None, num_latents=None,
                 thinking=None, max_thoughts=None, end_latent_threshold=None, batch_size=1, max_batch_size=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise UserValueError(
                f"--model_args {', '.join(sorted(unknown))}: not an mmcoconut model argument (it takes pretrained, "
                "quantization, dtype, device, max_tiles, num_latents, thinking, max_thoughts, end_latent_threshold)"
            )
        if quantization not in QUANTIZATIONS:
            raise UserValueError(f"--model_args quantization={quantization}: must be one of {', '.join(QUANTIZATIONS)}")
        if dtype not in DTYPE_NAMES:
            raise UserValueError(f"--model_args dtype={dtype}: must be one of {', '.join(DTYPE_NAMES)}")
        if thinking is not None and thinking not in THINKING_MODES:
            raise UserValueError(f"--model_args thinking={thinking}: must be one of {', '.join(THINKING_MODES)}")
        if str(batch_size).isdigit() and int(batch_size) >= 1:
            self.batch_size_per_process = int(batch_size)
        else:
            raise UserValueError(f"--batch_size {batch_size}: the mmcoconut model takes a number >= 1 (not auto)")
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device  # one process per device; lmms-eval hands each its share of requests
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        self.model, self.processor = load(pretrained, quantization=quantization, dtype=dtype, device=device,
                                          max_tiles=max_tiles)
        fixed = num_latents is not None or thinking == "fixed" or (
            thinking is None and self.model.config.default_thinking == "fixed")
        if fixed and (max_thoughts is not None or end_latent_threshold is not None):
            raise UserValueError("--model_args max_thoughts and end_latent_threshold apply to adaptive thinking; this "
                                 "checkpoint thinks a fixed number of thoughts here (pass thinking=adaptive)")
        template_latents(self.model.config, num_latents, thinking)  # refuses num_latents with thinking=adaptive
        self.thinking = {"num_latents": num_latents, "thinking": thinking, "max_thoughts": max_thoughts,
                         "end_latent_threshold": end_latent_threshold}
        logger.info("mmcoconut: %s on %s, thinking %s", pretrained, self.model.device,
                    {name: value for name, value in self.thinking.items() if value is not None} or "as trained")

    @property
    def batch_size(self):
        return self.batch_size_per_process

    @property
    def device(self):
        return self.model.device

    def _visual(self, request):
        """The request's one image, or None for a text-only question."""
        doc_to_visual, doc_id, task, split = request.args[2:6]
        visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) or [] if v is not None]
        if len(visuals) > 1:
            raise UserValueError(f"task {task!r}, document {doc_id}: {len(visuals)} images; the mmcoconut model "
                                 "answers questions about one image")
        if visuals and not isinstance(visuals[0], Image.Image):
            raise UserValueError(f"task {task!r}, document {doc_id}: a {type(visuals[0]).__name__} visual; the "
                                 "mmcoconut model takes images only (no video or audio)")
        return visuals[0] if visuals else None

    def generate_until(self, requests):
        """One completion per request: the answer after the thoughts, up to EOS or the first `until` string."""
        # lmms-eval's own batching: requests grouped by gen_kwargs (one decoding per batch), longest prompt first.
        order = lmms_utils.Collator([request.args for request in requests], lambda args: (-len(args[0]), args[0]),
                                    grouping=True)
        by_args = {id(request.args): request for request in requests}
        texts = []
        for chunk in order.get_batched(n=self.batch_size):
            chunk_requests = [by_args[id(args)] for args in chunk]
            task = chunk[0][4]
            options, until = decoding_options(dict(chunk[0][1]), task)
            prompts = [(self._visual(request), request.args[0]) for request in chunk_requests]
            completions = complete(self.model, self.processor, prompts, **self.thinking, **options)
            for args, completion in zip(chunk, completions):
                text = cut_at(completion.text, until)
                texts.append(text)
                self.cache_hook.add_partial("generate_until", args, text)
        return order.get_original(texts)

    def loglikelihood(self, requests):
        task = requests[0].task_name if requests else "?"
        raise UserValueError(
            f"task {task!r} scores answers by loglikelihood (output_type: multiple_choice or loglikelihood); the "
            "mmcoconut model answers generate_until tasks only (its answer follows its continuous thoughts, which "
            "generation runs): use a generate_until version of the task"
        )

    def generate_until_multi_round(self, requests):
        task = requests[0].task_name if requests else "?"
        raise UserValueError(f"task {task!r} is a multi-round task (generate_until_multi_round); the mmcoconut model "
                             "answers one-turn generate_until tasks only")


def manifest():
    """The `lmms_eval.models` entry point (setup.cfg): model id `mmcoconut`."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{MMCoconutLMM.__name__}")


__all__ = ["MODEL_ID", "GEN_KWARGS", "decoding_options", "cut_at", "MMCoconutLMM", "manifest"]
