"""Checkpoints load with remote code where only transformers is installed."""

import json
import subprocess
import sys
import textwrap

import torch

from tests.tiny_models import collate, make_model, make_sample

PROJECT_MODULES = [
    "configuration_mmcoconut", "modeling_mmcoconut", "pipeline_mmcoconut", "processing_mmcoconut", "convert_internvl_chat",
    "data_collator", "data_curriculum", "data_aokvqa", "trainer_curriculum",
]


def without_the_project(extra=()):
    """Python source that makes every project module (and `extra`) unimportable, as where only transformers is
    installed; a script that starts with it can check `BLOCKED` against `sys.modules` at the end."""
    return textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {[*PROJECT_MODULES, *extra]!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
                return None

        sys.meta_path.insert(0, Block())
    """)


def test_saved_checkpoint_carries_remote_code(tmp_path):
    make_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mmcoconut.MMCoconutConfig",
        "AutoModel": "modeling_mmcoconut.MMCoconutForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_mmcoconut.MMCoconutForConditionalGeneration",
    }
    for name in ("modeling_mmcoconut.py", "configuration_mmcoconut.py", "pipeline_mmcoconut.py"):
        assert (tmp_path / name).is_file(), name
    assert config["custom_pipelines"]["image-text-to-text"]["impl"] == (
        "pipeline_mmcoconut.MMCoconutImageTextToTextPipeline"
    )


def test_remote_code_loads_without_the_project(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    batch = collate([make_sample(1, 2), make_sample(0, 1, seed=1)])
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(model(**batch).logits, tmp_path / "expected.pt")
    script = without_the_project() + textwrap.dedent(f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert not any(name in sys.modules for name in BLOCKED)
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            logits = model(**batch).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), atol=0, rtol=0)
        print("remote code OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code OK" in result.stdout
