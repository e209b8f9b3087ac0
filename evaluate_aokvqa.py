"""Evaluate an MMCoconut checkpoint on A-OKVQA: `python evaluate_aokvqa.py --model ... --output-dir ...`.

The command itself is `mmcoconut.cli.evaluate` (installed as `mmcoconut-evaluate`); this file keeps the command
`accelerate launch evaluate_aokvqa.py ...` working from a checkout. `--help` lists the options.
"""

from mmcoconut.cli.evaluate import run

if __name__ == "__main__":
    run()
