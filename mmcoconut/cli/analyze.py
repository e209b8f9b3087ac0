"""Look inside continuous thoughts: what each one decodes to, and where it attends.

    mmcoconut-analyze --model outputs/demo --data-file outputs/demo/data/canonical/val.jsonl \
        --limit 8 --top-k 5 --output-dir outputs/demo/latent_analysis

Writes `latents.json`, `attention_share.png` and `top_k_decodings.png` to `--output-dir` and prints a summary; the
method (decoding, attention categories) is described in `mmcoconut.analysis.attention`.
"""

import json
import logging
from pathlib import Path

from mmcoconut.cli.help import Parser, command
from mmcoconut.constants import DTYPE_NAMES
from mmcoconut.preflight import require_file, require_model


def build_parser():
    """The CLI's arguments (torch-free: `--help` answers at once)."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="checkpoint directory, Hub id (owner/name) or LoRA adapter directory (model + processor)")
    parser.add_argument("--data-file", required=True, help="canonical records, JSON or JSONL")
    parser.add_argument("--limit", type=int, default=8, help="analyze the first N records (a larger N: more of them)")
    parser.add_argument("--num-latents", type=int, default=None,
                        help="latents per prompt (default: the checkpoint's latent_stage × c_thought)")
    parser.add_argument("--top-k", type=int, default=5, help="decoded tokens kept per thought")
    parser.add_argument("--output-dir", required=True, help="where latents.json and the two plots are written")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per forward pass")
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="InternVL tiles per image, at most (default: the checkpoint's saved tiling)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES[1:], default="float32", help="dtype of the loaded weights")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    parser.add_argument("--plot-samples", type=int, default=8, help="samples shown in the top-k table")
    return parser


def main(argv=None):
    """Run the CLI; returns the results dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("limit", "top_k", "batch_size", "max_tiles", "plot_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    require_model(args.model)  # torch-free: a missing or incomplete checkpoint, an unreachable Hub, in one line
    require_file(args.data_file, "--data-file")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    import torch

    from mmcoconut.analysis.attention import analyze, format_summary, plot_attention, plot_top_k
    from mmcoconut.data.aokvqa import load_canonical
    from mmcoconut.inference.loading import load_model
    from mmcoconut.processing import load_internvl_processor

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_model(args.model, dtype=args.dtype, device=device, attn_implementation="eager")
    processor = load_internvl_processor(args.model, max_tiles=args.max_tiles)
    records = load_canonical(args.data_file)[: args.limit]
    results = analyze(
        model, processor, records, num_latents=args.num_latents, top_k=args.top_k,
        batch_size=args.batch_size, max_tiles=args.max_tiles,
    )
    results = {"model": str(args.model), "data_file": str(args.data_file), **results}

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latents.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    plot_attention(results, out / "attention_share.png")
    plot_top_k(results, out / "top_k_decodings.png", max_samples=args.plot_samples)
    print(format_summary(results))
    print(f"wrote {out / 'latents.json'}, {out / 'attention_share.png'}, {out / 'top_k_decodings.png'}")
    return results


run = command(main)


if __name__ == "__main__":
    run()
