"""A checkpoint saved under one transformers release loads as remote code and generates under another.

transformers 5.24 renamed the KV cache `past_key_values` -> `cache`; a checkpoint's remote code must work on
both sides of such a rename. `make test-cross-version` runs this with a second virtualenv (the lock with the
oldest transformers the range admits) named by MMCOCONUT_OTHER_PYTHON, in both directions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hub_checkpoint import without_the_project

OTHER_PYTHON = os.environ.get("MMCOCONUT_OTHER_PYTHON")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not OTHER_PYTHON, reason="needs MMCOCONUT_OTHER_PYTHON (run `make test-cross-version`)"),
]

# Saves a tiny checkpoint with the project's code, and what it generates for a fixed batch.
SAVE = """
import json, sys, torch, transformers
from tests.tiny_models import collate, make_model, make_sample
out = sys.argv[1]
model = make_model(seed=3)
model.save_pretrained(out + "/ckpt")
batch = collate([make_sample(1, 2), make_sample(0, 1, seed=1)])
batch.pop("labels")
torch.save(batch, out + "/batch.pt")
tokens = model.generate(**batch, max_new_tokens=6)
json.dump({"tokens": tokens.tolist(), "transformers": transformers.__version__}, open(out + "/saved.json", "w"))
"""

# Loads it with only transformers (every project module blocked) and generates the same batch.
LOAD = without_the_project() + """
import json, torch, transformers
from transformers import AutoModel
out = sys.argv[1]
model = AutoModel.from_pretrained(out + "/ckpt", trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
tokens = model.generate(**torch.load(out + "/batch.pt"), max_new_tokens=6)
assert not any(name in sys.modules for name in BLOCKED)
json.dump({"tokens": tokens.tolist(), "transformers": transformers.__version__}, open(out + "/loaded.json", "w"))
"""


def run(python, script, out, cwd):
    # -W error: a deprecation on either side fails the check as it fails the suite.
    result = subprocess.run(
        [python, "-W", "error::FutureWarning", "-c", script, str(out)],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deprecated" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("direction", ["this_saves", "other_saves"])
def test_checkpoint_loads_and_generates_across_transformers_versions(tmp_path, direction):
    saver, loader = (sys.executable, OTHER_PYTHON) if direction == "this_saves" else (OTHER_PYTHON, sys.executable)
    run(saver, SAVE, tmp_path, cwd=ROOT)
    run(loader, LOAD, tmp_path, cwd=tmp_path)
    saved = json.loads((tmp_path / "saved.json").read_text())
    loaded = json.loads((tmp_path / "loaded.json").read_text())
    assert saved["transformers"] != loaded["transformers"], "both sides run the same transformers"
    assert loaded["tokens"] == saved["tokens"]
