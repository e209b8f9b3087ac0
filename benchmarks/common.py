"""Shared pieces of the benchmarks: the model shape, synthetic A-OKVQA-shaped batches, timing, memory, output.

The model is InternVL-shaped but small (a Qwen2 LM and an InternViT tower with few layers), with the
real vocabulary (151,674 ids + the three latent tokens) and the real 256 image tokens per 448-px tile:
the LM head and the image prefix are where the cost of a Coconut step is.
"""

import ctypes
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import InternVLForConditionalGeneration

import modeling_mmcoconut
from benchmarks.cli import add_common_args  # noqa: F401  (re-exported: the benchmarks' shared flags)
from configuration_mmcoconut import MMCoconutConfig
from mmcoconut.processing import INTERNVL3_VOCAB_SIZE, tiny_internvl_config, tokens_per_tile
from modeling_mmcoconut import MMCoconutForConditionalGeneration, position_ids_from_attention_mask

# Ids of the real InternVL3 vocabulary; the latent tokens follow it, as `from_internvl` appends them.
PAD_ID = 151643  # <|endoftext|>
IMG_START_ID, IMG_END_ID, IMAGE_TOKEN_ID = 151665, 151666, 151667  # <img>, </img>, <IMG_CONTEXT>
START_LATENT_ID, END_LATENT_ID, LATENT_ID = INTERNVL3_VOCAB_SIZE, INTERNVL3_VOCAB_SIZE + 1, INTERNVL3_VOCAB_SIZE + 2
VOCAB_SIZE = INTERNVL3_VOCAB_SIZE + 3
TEXT_VOCAB = PAD_ID  # ordinary BPE ids are 0..151642
LENGTH_JITTER = 8  # text lengths vary by up to ± this across the batch


@dataclass
class Setup:
    """What a benchmark runs on: the model (its `.internvl` is the floor and the baseline's base model)."""

    model: MMCoconutForConditionalGeneration
    device: torch.device
    dtype: torch.dtype

    @property
    def internvl(self) -> InternVLForConditionalGeneration:
        return self.model.internvl


def resolve_device(name: str) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 when present (or asked for), else CPU in fp32."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def build_setup(args) -> Setup:
    """A randomly initialised MMCoconut model of the requested shape, SDPA attention, on the device."""
    device, dtype = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = tiny_internvl_config(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        vision_hidden_size=args.vision_hidden_size,
        vision_layers=args.vision_layers,
        image_size=args.image_size,
        patch_size=14,
    )
    mm_config = MMCoconutConfig(
        config, latent_token_id=LATENT_ID, start_latent_id=START_LATENT_ID, end_latent_id=END_LATENT_ID
    )
    torch.manual_seed(args.seed)
    model = MMCoconutForConditionalGeneration(mm_config).to(device=device, dtype=dtype)
    model.set_attn_implementation("sdpa")
    # Every side must generate exactly the requested number of tokens: no EOS.
    for generation_config in (model.generation_config, model.internvl.generation_config):
        generation_config.eos_token_id = None
        generation_config.pad_token_id = PAD_ID
    return Setup(model=model, device=device, dtype=dtype)


@dataclass
class Sample:
    """`prefix` (image + question + <|start-latent|>), then `latents` × <|latent|>, <|end-latent|>, `answer`."""

    prefix: list[int]
    num_latents: int
    answer: list[int]
    pixel_values: torch.Tensor | None  # (tiles, 3, image_size, image_size)

    @property
    def prompt(self) -> list[int]:
        return self.prefix + [LATENT_ID] * self.num_latents + [END_LATENT_ID]


def make_samples(args, setup: Setup, seed: int | None = None) -> list[Sample]:
    """A-OKVQA-shaped samples with random ids: `<img> IMG×256·tiles </img> question <start> latents <end> answer`.

    Question and answer lengths vary by up to ±8 tokens across the batch, so padding is exercised.
    """
    g = torch.Generator().manual_seed(args.seed if seed is None else seed)
    per_tile = tokens_per_tile(setup.internvl.config)
    jitter = min(LENGTH_JITTER, args.question_tokens - 1, max(args.answer_tokens - 1, 0))

    def text(mean):
        n = mean + int(torch.randint(-jitter, jitter + 1, (1,), generator=g)) if jitter > 0 else mean
        return torch.randint(0, TEXT_VOCAB, (n,), generator=g).tolist()

    samples = []
    for _ in range(args.batch_size):
        image = [IMG_START_ID] + [IMAGE_TOKEN_ID] * (per_tile * args.tiles) + [IMG_END_ID] if args.tiles else []
        size = args.image_size
        pixels = torch.randn(args.tiles, 3, size, size, generator=g) if args.tiles else None
        samples.append(Sample(image + text(args.question_tokens) + [START_LATENT_ID], args.latents,
                              text(args.answer_tokens), pixels))
    return samples


def _pixels(samples, setup):
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
    if not tiles:
        return None, torch.zeros(len(samples), dtype=torch.long, device=setup.device)
    num_tiles = torch.tensor([0 if s.pixel_values is None else s.pixel_values.shape[0] for s in samples])
    return torch.cat(tiles).to(setup.device, setup.dtype), num_tiles.to(setup.device)


def collate_train(samples: list[Sample], setup: Setup) -> dict:
    """Coconut's training padding: left-pad so the first latents share a column, right-pad the rest.

    ```
    xxxxxxxxxx<latent><latent>xxxxx--
    -----xxxxx<latent><latent>xxxxxxx
    ```
    Labels are the answer tokens; per-sample position ids so padding does not shift a sample.
    """
    lefts = [max(len(s.prefix) for s in samples) - len(s.prefix) for s in samples]
    width = max(left + len(s.prompt) + len(s.answer) for left, s in zip(lefts, samples))
    input_ids, labels, mask = [], [], []
    for left, s in zip(lefts, samples):
        ids = s.prompt + s.answer
        right = width - left - len(ids)
        input_ids.append([PAD_ID] * left + ids + [PAD_ID] * right)
        labels.append([-100] * (left + len(s.prompt)) + s.answer + [-100] * right)
        mask.append([0] * left + [1] * len(ids) + [0] * right)
    input_ids, labels, mask = (torch.tensor(x, device=setup.device) for x in (input_ids, labels, mask))
    pixel_values, num_tiles = _pixels(samples, setup)
    return dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask), labels=labels,
                pixel_values=pixel_values, num_tiles=num_tiles)


def collate_prompts(samples: list[Sample], setup: Setup) -> dict:
    """Left-padded generation prompts `... <start> latents <end>` (equal latent counts share columns)."""
    width = max(len(s.prompt) for s in samples)
    input_ids = torch.tensor([[PAD_ID] * (width - len(s.prompt)) + s.prompt for s in samples], device=setup.device)
    mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in samples], device=setup.device)
    pixel_values, num_tiles = _pixels(samples, setup)
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, num_tiles=num_tiles)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn, repeats: int, warmup: int, device: torch.device, before=None) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed ones (`before` runs untimed)."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() minus the allocation before the step",
    "cpu": "peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the step, in an untimed "
           "run after all timed ones, with glibc's mmap threshold at 64 KiB so freed tensors leave the process",
}
_M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>
_MMAP_THRESHOLD = 64 * 1024


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_memory_bytes(fn, device: torch.device) -> int:
    """Peak bytes `fn()` allocates above what was allocated before it (see `MEMORY_METHOD`).

    CPU: tracemalloc sees only Python's allocator, not tensor storage, so the process's peak RSS is
    used. glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in its arenas,
    which would hide when tensors are freed; the threshold is pinned at 64 KiB first, so every tensor
    above that size is its own mapping, returned on free. That slows allocation: call this only after
    the timed runs.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        raise RuntimeError("CPU peak memory is measured from Linux's /proc/self (VmHWM); run on Linux or CUDA")
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    libc.malloc_trim(0)
    clear_refs.write_text("5")  # resets VmHWM to the current RSS
    base = _proc_status_bytes("VmRSS")
    fn()
    return _proc_status_bytes("VmHWM") - base


def shape_summary(args, setup: Setup) -> dict:
    """The model and batch shape, for the table header and the JSON."""
    config = setup.internvl.config
    text, vision = config.text_config, config.vision_config
    params = sum(p.numel() for p in setup.model.parameters())
    return dict(
        device=str(setup.device),
        device_name=torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else platform.processor()
        or platform.machine(),
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        load_average_1min=os.getloadavg()[0],
        dtype=str(setup.dtype).removeprefix("torch."),
        attn_implementation=text._attn_implementation,
        vocab_size=text.vocab_size,
        lm_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        intermediate_size=text.intermediate_size,
        vision_layers=vision.num_hidden_layers,
        vision_hidden_size=vision.hidden_size,
        image_size=vision.image_size[0],
        tokens_per_tile=tokens_per_tile(config),
        parameters=params,
        tiles=args.tiles,
        question_tokens=args.question_tokens,
        answer_tokens=args.answer_tokens,
        latents=args.latents,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        baseline_repeats=args.baseline_repeats,
        torch=torch.__version__,
        # The model file is edited as the project goes on: say which version was measured.
        modeling_sha1=hashlib.sha1(Path(modeling_mmcoconut.__file__).read_bytes()).hexdigest()[:12],
    )


def describe(shape: dict) -> str:
    """One line for the table's header: device, model shape, batch shape, repeats."""
    return (
        f"{shape['device']} ({shape['device_name']}, {shape['threads']} threads), {shape['dtype']}, "
        f"{shape['attn_implementation']}; LM {shape['lm_layers']} layers × {shape['hidden_size']} "
        f"({shape['heads']} heads, {shape['kv_heads']} KV), vocab {shape['vocab_size']:,}; vision "
        f"{shape['vision_layers']} layers × {shape['vision_hidden_size']} at {shape['image_size']} px "
        f"({shape['tokens_per_tile']} tokens/tile); {shape['parameters'] / 1e6:.0f}M params. Batch "
        f"{shape['batch_size']} × ({shape['tiles']} tile, ~{shape['question_tokens']} question tokens, "
        f"{shape['latents']} latents, ~{shape['answer_tokens']} answer tokens); median of "
        f"{shape['repeats']} after {shape['warmup']} warm-up (original: {shape['baseline_repeats']} run). "
        f"Load average at start {shape['load_average_1min']:.1f} on {shape['cpu_count']} CPUs (other work on the "
        "machine slows small ops most)"
    )


def format_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (pastes into the README as is)."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")


__all__ = [
    "LATENT_ID",
    "START_LATENT_ID",
    "END_LATENT_ID",
    "IMAGE_TOKEN_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "MEMORY_METHOD",
    "Sample",
    "Setup",
    "add_common_args",
    "build_setup",
    "collate_prompts",
    "collate_train",
    "describe",
    "format_table",
    "make_samples",
    "median",
    "peak_memory_bytes",
    "resolve_device",
    "shape_summary",
    "synchronize",
    "time_runs",
    "write_json",
]
