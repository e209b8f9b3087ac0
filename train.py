"""Train MMCoconut: `accelerate launch train.py recipes/coconut.yaml` (or `python train.py recipes/demo.yaml`).

The run itself is `mmcoconut.cli.train` (installed as `mmcoconut-train`); this file keeps the command every recipe
and launcher config names. `python train.py --help` lists the recipe fields.
"""

from mmcoconut.cli.train import run

if __name__ == "__main__":
    run()
