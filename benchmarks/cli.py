"""The benchmarks' shared flags, apart from `benchmarks.common` so that `--help` answers without importing torch."""

import argparse
from pathlib import Path


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by both benchmarks: model shape, batch shape, repeats, device and output."""
    model = parser.add_argument_group("model shape (the vocabulary is always the real one)")
    model.add_argument("--layers", type=int, default=4, help="language-model layers")
    model.add_argument("--hidden-size", type=int, default=256, help="language-model hidden size")
    model.add_argument("--heads", type=int, default=4, help="attention heads")
    model.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA, as Qwen2.5)")
    model.add_argument("--intermediate-size", type=int, default=1024, help="MLP width")
    model.add_argument("--vision-hidden-size", type=int, default=256, help="vision tower width")
    model.add_argument("--vision-layers", type=int, default=2, help="vision tower layers")
    model.add_argument("--image-size", type=int, default=448,
                       help="tile size in px, patch 14 (448: InternVL's 256 tokens/tile; smaller for smoke tests)")
    data = parser.add_argument_group("batch shape")
    data.add_argument("--tiles", type=int, default=1, help="tiles per sample (256 image tokens each at 448 px)")
    data.add_argument("--question-tokens", type=int, default=100, help="mean question tokens per sample")
    data.add_argument("--answer-tokens", type=int, default=50, help="mean supervised tokens after the latents")
    data.add_argument("--latents", type=int, default=6, help="<|latent|> tokens per sample")
    data.add_argument("--batch-size", type=int, default=4)
    run = parser.add_argument_group("run")
    run.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    run.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    run.add_argument("--baseline-repeats", type=int, default=1,
                     help="timed runs of the original algorithm (slow; no warm-up: the other sides warmed its kernels)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: torch's; 1 is steadier on a machine shared with other jobs)")
    run.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser


__all__ = ["add_common_args"]
