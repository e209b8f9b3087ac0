"""Causal tests of continuous thoughts: accuracy when thought k is kept, zeroed, replaced by noise or swapped.

    mmcoconut-intervene --model outputs/adaptive/runs/fixed_4 \
        --data-file outputs/adaptive/data/canonical/val.jsonl --output-dir outputs/adaptive/causal_fixed_4

Writes `causal.json` (every question's answers and the table) and `causal.png` (accuracy per thought position, one
panel per hop count) and prints the table; the interventions are described in `mmcoconut.analysis.interventions`.
"""

import json
import logging
import time
from pathlib import Path

from mmcoconut.cli.help import Parser, command, latent_count
from mmcoconut.preflight import require_file, require_model


def build_parser():
    """The CLI's arguments (torch-free: `--help` answers at once)."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="checkpoint directory, Hub id (owner/name) or LoRA adapter directory (model + processor)")
    parser.add_argument("--data-file", required=True, help="canonical multiple-choice records, JSON or JSONL")
    parser.add_argument("--output-dir", required=True, help="where causal.json and causal.png are written")
    parser.add_argument("--limit", type=int, default=None, help="the first N records (default: all)")
    parser.add_argument(
        "--num-latents", type=latent_count, default=None,
        help="thoughts per prompt: N, or `steps` (each record's step count × c_thought, the thoughts a checkpoint "
             "trained with supervise_end_latent thinks for it). Default: `steps` for such checkpoints, else the "
             "checkpoint's latent_stage × c_thought",
    )
    parser.add_argument("--batch-size", type=int, default=50, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation budget per answer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise replacing thoughts")
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="InternVL tiles per image, at most (default: the checkpoint's saved processor)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    require_model(args.model)  # torch-free: a missing or incomplete checkpoint, an unreachable Hub, in one line
    require_file(args.data_file, "--data-file")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from mmcoconut.analysis.attention import analysis_num_latents
    from mmcoconut.analysis.interventions import causal_table, format_causal_table, intervene, plot_causal
    from mmcoconut.data.aokvqa import load_canonical
    from mmcoconut.inference.loading import load_model
    from mmcoconut.processing import load_internvl_processor

    records = load_canonical(args.data_file)[: args.limit]
    unanswerable = [record["id"] for record in records if record.get("correct_choice_idx") is None]
    if unanswerable:
        parser.error(f"--data-file: record {unanswerable[0]!r} has no correct_choice_idx (multiple-choice records "
                     "are needed to score answers)")
    model = load_model(args.model, dtype="float32", device="cpu")
    processor = load_internvl_processor(args.model, max_tiles=args.max_tiles)  # None keeps the saved tiling
    num_latents = analysis_num_latents(args.num_latents, model.config)
    if num_latents != "steps" and num_latents < 1:
        parser.error(f"the checkpoint prompts with {num_latents} thoughts; pass --num-latents >= 1")
    started = time.perf_counter()
    results = intervene(model, processor, records, num_latents, args.batch_size, args.max_new_tokens, args.seed,
                        args.max_tiles)
    table = causal_table(results)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": str(args.model), "data_file": str(args.data_file), "num_records": len(records),
        "num_latents": num_latents, "seed": args.seed, "seconds": time.perf_counter() - started, "table": table,
        "questions": results,
    }
    (out / "causal.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    plot_causal(table, out / "causal.png", f"{Path(args.model).name}: edited thoughts, {len(records)} questions")
    print(format_causal_table(table))
    print(f"wrote {out / 'causal.json'}, {out / 'causal.png'}")
    return summary


run = command(main)


if __name__ == "__main__":
    run()
