"""Linear probes: do the continuous thoughts hold the intermediate states of the chain they replace?

    mmcoconut-probe --model outputs/experiment/coconut_3 \
        --data-file outputs/experiment/data/canonical/val.jsonl --output-dir outputs/experiment/probe

Writes `probe.json` and `probe_accuracy.png` and prints the table; the probed states and the fit are described in
`mmcoconut.analysis.probes`.
"""

import json
import logging
from pathlib import Path

from mmcoconut.cli.help import Parser, command, latent_count
from mmcoconut.preflight import require_file, require_model


def build_parser():
    """The CLI's arguments (torch-free: `--help` answers at once)."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="checkpoint directory, Hub id (owner/name) or LoRA adapter directory (model + processor)")
    parser.add_argument("--data-file", required=True, help="canonical colour_chain records, JSON or JSONL")
    parser.add_argument("--output-dir", required=True, help="where probe.json and probe_accuracy.png are written")
    parser.add_argument("--limit", type=int, default=None, help="probe the first N records (default: all)")
    parser.add_argument(
        "--num-latents", type=latent_count, default=None,
        help="latents per prompt: N, or `steps` (each record's step count × c_thought, the thoughts a checkpoint "
             "trained with supervise_end_latent thinks for it). Default: `steps` for such checkpoints, else the "
             "checkpoint's latent_stage × c_thought",
    )
    parser.add_argument("--test-fraction", type=float, default=0.5, help="held-out share of the questions")
    parser.add_argument("--l2", type=float, default=1e-2, help="L2 penalty on the probe's weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train / held-out split")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="InternVL tiles per image, at most (default: the checkpoint's saved processor)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        parser.error("--test-fraction must be in (0, 1)")
    require_model(args.model)  # torch-free: a missing or incomplete checkpoint, an unreachable Hub, in one line
    require_file(args.data_file, "--data-file")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from mmcoconut.analysis.attention import analysis_num_latents
    from mmcoconut.analysis.probes import (
        collect_states,
        format_table,
        hop_targets,
        plot_probe,
        probe_table,
        state_names,
    )
    from mmcoconut.data.aokvqa import load_canonical
    from mmcoconut.inference.loading import load_model
    from mmcoconut.processing import load_internvl_processor

    records = load_canonical(args.data_file)[: args.limit]
    targets = hop_targets(records)  # before the model loads: a wrong data file fails at once
    model = load_model(args.model, dtype="float32", device="cpu", attn_implementation="eager")
    processor = load_internvl_processor(args.model, max_tiles=args.max_tiles)  # None keeps the saved tiling
    num_latents = analysis_num_latents(args.num_latents, model.config)
    if num_latents == "steps":
        counts = [len(record["steps"]) * model.config.c_thought for record in records]
    elif num_latents < 1:
        parser.error(f"the checkpoint prompts with {num_latents} latents; pass --num-latents >= 1")
    else:
        counts = num_latents
    states = collect_states(model, processor, records, counts, args.batch_size, args.max_tiles)
    names = state_names(states.shape[1] - 2)
    table = probe_table(states, targets, names, args.test_fraction, args.seed, args.l2)
    results = {
        "model": str(args.model), "data_file": str(args.data_file), "num_records": len(records),
        "num_latents": num_latents, "test_fraction": args.test_fraction, "l2": args.l2, "seed": args.seed, **table,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    plot_probe(table, out / "probe_accuracy.png", f"{Path(args.model).name}: linear probes, {len(records)} questions")
    print(format_table(table))
    print(f"wrote {out / 'probe.json'}, {out / 'probe_accuracy.png'}")
    return results


run = command(main)


if __name__ == "__main__":
    run()
