"""A small local stand-in for lmms-eval's ScienceQA-IMG, to run lmms-eval's own `scienceqa_img` task offline.

    python -m mmcoconut.integrations.scienceqa_copy --out outputs/scienceqa_img_local --n 20
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lmms_eval --model mmcoconut \\
        --model_args pretrained=checkpoints/demo-cot --tasks scienceqa_img_local \\
        --include_path outputs/scienceqa_img_local --reasoning_tags '[["<think>", "Answer:"]]' ...

writes

    {out}/test.parquet               generated questions in the schema of lmms-lab's ScienceQA-IMG test split
    {out}/scienceqa_img_local.yaml   lmms-eval's own scienceqa_img.yaml (included by its installed path: prompt,
                                     image, generation options, answer parser and metric), reading test.parquet,
                                     without the prompt's last line (see below)

The questions are those of a generated task (`mmcoconut.data.synthetic.TASKS`, default `colour_chain`, the demo's):
an image, a question, four choices and the answer's index; `hint` is empty and the subject fields name the task.
Two things differ from the real benchmark: the data, and the prompt's closing line ("Answer with the option's letter
from the given choices directly."), left out because the demo checkpoints, trained on question and choices only, do
not know it. The same command with `--tasks scienceqa_img` scores the real ScienceQA-IMG (from the Hub) with the
task exactly as lmms-eval ships it.
"""

import argparse
import io
import random
from pathlib import Path

TASK_NAME = "scienceqa_img_local"


def lmms_eval_task_yaml():
    """The installed lmms-eval's `scienceqa_img.yaml`."""
    from importlib.util import find_spec

    spec = find_spec("lmms_eval")
    if spec is None:
        from mmcoconut.errors import MissingExtraError

        raise MissingExtraError("lmms-eval is not installed: pip install 'mmcoconut[lmms-eval]'")
    path = Path(spec.origin).parent / "tasks" / "scienceqa" / "scienceqa_img.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this lmms-eval has no scienceqa_img task")
    return path


def scienceqa_rows(n, seed=0, task="colour_chain"):
    """`n` rows in ScienceQA-IMG's schema, drawn from the generated `task` (deterministic for a seed)."""
    from mmcoconut.data.synthetic import TASKS

    generator, rng = TASKS[task](), random.Random(f"scienceqa:{task}:{seed}")
    rows = []
    for _ in range(n):
        example = generator.sample(rng)
        image = io.BytesIO()
        example.image.save(image, format="PNG")
        rows.append({
            "image": {"bytes": image.getvalue(), "path": None},
            "question": example.question,
            "choices": list(example.choices),
            "answer": example.correct_choice_idx,
            "hint": "",
            "task": "closed choice",
            "grade": "",
            "subject": task,
            "topic": task,
            "category": task,
            "skill": task,
            "lecture": "",
            "solution": " ".join(example.steps),
        })
    return rows


def write_scienceqa_copy(out, n, seed=0, task="colour_chain"):
    """Write `test.parquet` and `scienceqa_img_local.yaml` under `out` (see the module docstring); returns `out`."""
    import datasets

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "answer": datasets.Value("int8"),
        **{name: datasets.Value("string") for name in ("hint", "task", "grade", "subject", "topic", "category",
                                                        "skill", "lecture", "solution")},
    })
    datasets.Dataset.from_list(scienceqa_rows(n, seed, task), features=features).to_parquet(out / "test.parquet")
    (out / f"{TASK_NAME}.yaml").write_text(
        "# lmms-eval's own ScienceQA-IMG task, reading the local copy beside this file"
        " (written by mmcoconut.integrations.scienceqa_copy).\n"
        f"include: {lmms_eval_task_yaml()}\n"
        f"task: {TASK_NAME}\n"
        "dataset_path: parquet\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        "    test: test.parquet\n"
        "# The generated questions are asked as the demo checkpoints were trained: question and choices, without the\n"
        "# task's \"Answer with the option's letter ...\" line, which a tiny model never saw.\n"
        "lmms_eval_specific_kwargs:\n"
        "  default:\n"
        "    format: default\n"
        "    pre_prompt: \"\"\n"
        "    post_prompt: \"\"\n"
    )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write test.parquet and the task's YAML into")
    parser.add_argument("--n", type=int, default=20, help="questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="colour_chain", help="the generated task the questions come from")
    args = parser.parse_args(argv)
    print(write_scienceqa_copy(args.out, args.n, args.seed, args.task))


__all__ = ["TASK_NAME", "lmms_eval_task_yaml", "scienceqa_rows", "write_scienceqa_copy", "main"]


if __name__ == "__main__":
    main()
