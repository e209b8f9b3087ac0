"""Visual graph search, where CoT must commit to one path: CoT vs Coconut (fixed and adaptive), from scratch.

    python -m experiments.graph_search --out outputs/graph_search

1. Generates the `graph_search` set of `mmcoconut.data.synthetic` (a drawn directed graph of 8 to 10 colours; which of
   four colours is reachable from red; the steps are the 1 to 3 arrows of the path) and builds the recipe's tiny
   random InternVL3-shaped model once (`{out}/init`), as `adaptive_thinking.py` does.
2. Trains with `recipes/experiment_colour_chain.yaml` the runs of `experiments.thought_supervision` for this task:
   `cot` (stage 0), then per branch (`--branches`, default fixed and adaptive; the step-supervised ones are there
   too) Coconut stages 1..3 from it, `--stage-epochs` each and `--final-stage-epochs` at the last.
3. Evaluates every run on the validation split (its own way of thinking) per path length and per graph size: MC
   accuracy, mean thoughts, mean generated tokens.
4. Once every run is trained (no `--only`): the causal tests (`mmcoconut.analysis.interventions`) of each branch's
   final stage. Writes `{out}/results.{md,json}` and `causal_BRANCH.png`; a finished run or analysis is read back.
"""

import json
import logging
import sys
import time
from pathlib import Path

import torch

from experiments import thought_supervision as runs
from experiments.adaptive_thinking import Evaluator, by_hops, curriculum_table, per_hop_table
from experiments.learning_curve import parse_experiment_args, write_data, write_initial_model
from mmcoconut.analysis.interventions import format_causal_table, plot_causal
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.images import load_image
from mmcoconut.data.synthetic import GraphSearchTask
from mmcoconut.training.recipe import read_recipe

logger = logging.getLogger("graph_search")

TASK = "graph_search"


def graph_sizes(records):
    """{record id: nodes of its graph}, read from its image (`GraphSearchTask.read_edges`)."""
    task = GraphSearchTask()
    return {record["id"]: task.num_nodes(task.read_edges(load_image(record["image"], record["id"]))) for record in records}


def per_size_table(rows):
    """`rows`: [(label, by-size metrics)]; each cell is accuracy · mean thoughts · mean generated tokens."""
    keys = [key for key in rows[0][1] if key != "all"] + ["all"]
    lines = ["| method | " + " | ".join(k if k == "all" else f"{k} nodes" for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for label, groups in rows:
        lines.append(f"| {label} | " + " | ".join(
            f"{100 * groups[k]['mc_accuracy']:.1f}% · {groups[k]['mean_thoughts']:.2f} · "
            f"{groups[k]['mean_generated_tokens']:.1f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = runs.build_parser(__doc__.split("\n\n")[0], "outputs/graph_search", branches=("fixed", "adaptive"))
    args, extra_flags = parse_experiment_args(parser, argv)
    out = Path(args.out)
    hops = GraphSearchTask().max_hops
    plan = runs.plan_runs(args.branches, hops, args.cot_epochs, args.stage_epochs, args.final_stage_epochs)
    unknown = sorted(set(args.only or ()) - {run[0] for run in plan})
    if unknown:
        parser.error(f"--only: unknown runs {unknown}; the runs are {[run[0] for run in plan]}")
    files = write_data(out, TASK, args.n_train, args.n_val, args.seed)["image"]
    recipe = read_recipe(args.recipe)
    init = write_initial_model(out, recipe, files[0], args.tokenizer, args.task_vocab_size)
    if args.prepare:
        logger.info("data and initial model ready under %s", out)
        return None
    val_records = list(load_canonical(files[1]))
    size_of = graph_sizes(val_records)
    started = time.perf_counter()

    def evaluate(run_dir, mode):
        evaluator = Evaluator(run_dir, val_records, args.eval_batch_size)
        result = evaluator.run(mode)
        return {"seconds": result.metrics["seconds"], "per_hop": by_hops(result.samples, evaluator.hops_of),
                "per_size": by_hops(result.samples, size_of)}

    rows = runs.train_runs(out, plan, args, files, init, hops, extra_flags, evaluate)
    command = " ".join(["python -m experiments.graph_search", *(sys.argv[1:] if argv is None else argv)])
    summary = {"command": command, "task": TASK, "n_train": args.n_train, "n_val": args.n_val, "recipe": recipe,
               "extra_train_flags": extra_flags, "torch_threads": torch.get_num_threads(), "runs": rows}
    sections = [f"`{command}` ({TASK}, {args.n_train} train / {args.n_val} val questions)",
                "## Every run (its own way of thinking)", curriculum_table(rows)]
    if not args.only:
        finals = {row["name"]: row for row in rows}
        labels = [("CoT", "cot")] + [(f"Coconut {branch} ({branch}_{hops})", f"{branch}_{hops}")
                                     for branch in args.branches]
        sections += [
            "## Final stages per path length (MC accuracy · mean thoughts · mean generated tokens)",
            per_hop_table([(label, finals[name]["eval"]["per_hop"]) for label, name in labels]),
            "## Final stages per graph size",
            per_size_table([(label, finals[name]["eval"]["per_size"]) for label, name in labels]),
        ]
        analyses = {}
        for branch in args.branches:
            name = f"{branch}_{hops}"
            analyses[branch] = runs.analyse(out, finals[name], val_records, args, with_probes=False)
            plot_causal(analyses[branch]["causal"], out / f"causal_{branch}.png", f"{name}: edited thoughts")
            sections += [f"## Causal tests, {name} ({analyses[branch]['causal']['all'][0]['n']} questions, "
                         f"{analyses[branch]['causal_seconds']:.0f} s)", format_causal_table(analyses[branch]["causal"])]
        summary["analyses"] = analyses
    summary["wall_seconds_this_invocation"] = time.perf_counter() - started
    text = "\n\n".join(sections) + "\n"
    if not args.only:
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        (out / "results.md").write_text(text)
    print(text)
    return summary


__all__ = ["graph_sizes", "per_size_table", "main"]

if __name__ == "__main__":
    main()
