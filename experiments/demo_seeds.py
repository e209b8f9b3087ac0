"""Does `make demo` learn every time? The demo recipe for several seeds and thread counts, one table.

    python -m experiments.demo_seeds                       # seeds 0-4 x OMP_NUM_THREADS 1 and 2: 10 runs
    python -m experiments.demo_seeds --threads 1 --parallel 2   # two runs at a time: the other core busy
    python -m experiments.demo_seeds --threads 2                # one at a time: a quiet machine

Each run is `python train.py recipes/demo.yaml --seed S` in its own process with `OMP_NUM_THREADS=T`, into
`{out}/s{S}-t{T}` (the generated data is shared). `--parallel 2` runs two at a time (one core busy with the other
run: the "loaded machine" condition). Writes `{out}/results.md` and `{out}/results.json`: per run, the MC accuracy
and mean generated tokens of each stage's last evaluation, and the wall time. Runs written earlier into the same
`--out` (other seeds or thread counts) are kept in the table.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from mmcoconut.cli.help import DefaultsHelpFormatter
from mmcoconut.training.arguments import DataArguments
from mmcoconut.training.build import ensure_synthetic_data
from trainer_curriculum import stage_results

REPO = Path(__file__).resolve().parent.parent


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo.yaml", help="the recipe to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="recipe seeds")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS values")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo-seeds"), help="where the runs go")
    return parser


def log_history(run_dir):
    """The Trainer's log history of a finished run (its last checkpoint's trainer_state.json)."""
    states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        raise FileNotFoundError(f"{run_dir} has no checkpoint-*/trainer_state.json: did the run fail?")
    return json.loads(states[-1].read_text())["log_history"]


def run_one(recipe, seed, threads, out):
    run_dir = out / f"s{seed}-t{threads}"
    command = [sys.executable, "train.py", recipe, "--seed", str(seed), "--output_dir", str(run_dir),
               "--synthetic_dir", str(out / "data"), "--overwrite_output_dir", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with open(out / f"s{seed}-t{threads}.log", "w") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed}, {threads} threads failed; see {out / f's{seed}-t{threads}.log'}")
    stages = {str(stage): {"mc_accuracy": entry["eval_mc_accuracy"], "tokens": entry["eval_mean_generated_tokens"]}
              for stage, entry in stage_results(log_history(run_dir)).items()}
    return {"seed": seed, "threads": threads, "seconds": seconds, "stages": stages}


def table(results):
    stages = sorted({stage for r in results for stage in r["stages"]}, key=int)
    header = ["seed", "threads", *[f"stage {s}: accuracy / tokens" for s in stages], "wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [f"{100 * r['stages'][s]['mc_accuracy']:.0f}% / {r['stages'][s]['tokens']:.1f}" for s in stages]
        minutes, seconds = divmod(round(r["seconds"]), 60)
        lines.append(f"| {r['seed']} | {r['threads']} | " + " | ".join(cells) + f" | {minutes} min {seconds:02d} s |")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(REPO / args.recipe, encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    # Generate the data once (as train.py does, with its manifest), before runs that would race to write it.
    ensure_synthetic_data(DataArguments(
        data_source="synthetic", synthetic_dir=str(args.out / "data"), synthetic_task=recipe["synthetic_task"],
        synthetic_train=recipe["synthetic_train"], synthetic_val=recipe["synthetic_val"],
    ))
    jobs = [(seed, threads) for threads in args.threads for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: run_one(args.recipe, *job, args.out), jobs))
    # Runs of earlier invocations into the same --out (other seeds or thread counts) stay in the table.
    previous = args.out / "results.json"
    if previous.is_file():
        done = {(r["seed"], r["threads"]) for r in results}
        results = [r for r in json.loads(previous.read_text()) if (r["seed"], r["threads"]) not in done] + results
        results.sort(key=lambda r: (r["threads"], r["seed"]))
    text = table(results)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(text)
    return results


if __name__ == "__main__":
    main()
