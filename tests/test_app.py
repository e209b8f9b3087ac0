"""The Gradio demo, driven as a user's client would: served on a loopback port, called through gradio_client."""

import json
import os
import shutil
from pathlib import Path

import pytest

from mmcoconut import app  # gradio is imported where the demo is built
from mmcoconut.cli import app as app_cli
from mmcoconut.inference.loading import load
from tests.test_inference_prediction import QUESTION, _run_predict

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture
def served(inference_checkpoint, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    model, processor = load(inference_checkpoint, attn_implementation="eager")
    demo = app.build_demo(model, processor, "tiny", trained_on="the tests' records")
    header = [c["props"]["value"] for c in demo.config["components"] if c.get("type") == "markdown"]
    assert any("Trained on: the tests' records." in text for text in header), header
    port = app.free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_app_answers_as_predict_does_and_shows_the_thoughts(served, inference_checkpoint, question_image):
    client = gradio_client.Client(served, verbose=False)
    choices = ["red", "blue", "green", "yellow"]
    answer, generated, heat_map, table = client.predict(
        gradio_client.handle_file(str(question_image)), QUESTION, "\n".join(choices), None, api_name="/answer"
    )
    cli = json.loads(_run_predict(
        "--model", inference_checkpoint, "--image", question_image, "--question", QUESTION,
        "--choices", *choices, "--show-thoughts", "--json",
    ).strip().splitlines()[-1])
    assert generated == cli["generated_text"]
    assert answer == (cli["answer"] if cli["answer"] is not None else f"(unparseable: {cli['parse_error']})")
    assert os.path.isfile(heat_map)  # the heat map comes back as an image file
    rows = table["data"]
    assert [row[0] for row in rows] == [1, 2]
    for row, thought in zip(rows, cli["thoughts"]):
        assert row[1] == pytest.approx(thought["attention"]["mean"]["image"], abs=1e-3)
        assert row[2].startswith(app.display_token(thought["top_k"][0]["token"]))


def test_app_without_image_and_with_an_explicit_latent_count(served):
    client = gradio_client.Client(served, verbose=False)
    answer, generated, heat_map, table = client.predict(None, QUESTION, "", 3, api_name="/answer")
    assert isinstance(generated, str) and heat_map is None
    assert [row[0] for row in table["data"]] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_screenshot_in_headless_chromium(inference_checkpoint, question_image, tmp_path):
    out = tmp_path / "app.png"
    app_cli.main(["--model", str(inference_checkpoint), "--screenshot", str(out), "--example-image", str(question_image),
              "--example-question", QUESTION, "--example-choices", "red", "blue"])
    import numpy as np
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (1400, 1000)
        assert len(np.unique(np.asarray(image.convert("L")))) > 50  # a rendered page, not a blank one


def test_the_app_opens_with_the_runs_own_validation_question(tmp_path):
    """A run that kept its generated data (the demo) pre-fills the page with its first validation question."""
    import json

    from mmcoconut.cli.app import run_example

    assert run_example(tmp_path) is None  # a checkpoint without generated data: no example
    canonical = tmp_path / "data" / "canonical"
    (tmp_path / "data" / "coco").mkdir(parents=True)
    canonical.mkdir(parents=True)
    (tmp_path / "data" / "coco" / "1.jpg").write_bytes(b"")
    record = {"image": "../coco/1.jpg", "question": "Which colour?\nA. green\nB. blue", "choices": ["green", "blue"]}
    (canonical / "val.jsonl").write_text(json.dumps(record) + "\n")
    image, question, choices = run_example(tmp_path)
    assert image == str((tmp_path / "data" / "coco" / "1.jpg").resolve())
    assert question == "Which colour?" and choices == "green\nblue"


def test_the_app_says_what_the_model_was_trained_on_and_picks_its_example(tmp_path):
    """The header names the training data from the checkpoint's card; a model trained on generated data gets no
    bundled photo, an A-OKVQA (or unknown) one gets the bundled A-OKVQA-style example."""
    from PIL import Image

    from mmcoconut.cli.app import choose_example, trained_on, trained_recipe

    demo_cot = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-cot"
    recipe = trained_recipe(demo_cot)
    assert recipe["data_source"] == "synthetic" and recipe["synthetic_task"] == "colour_chain"
    assert "`colour_chain`" in trained_on(recipe)
    assert choose_example(demo_cot, recipe) is None  # no generated data kept, and a photo would be nonsense to it

    assert trained_recipe(tmp_path) is None and trained_on(None) is None  # no card: the header says so
    image, question, choices = choose_example(tmp_path, None)
    assert Image.open(image).size[0] > 100 and question.endswith("?") and len(choices.splitlines()) == 4
    (tmp_path / "README.md").write_text("# card\n\n## Training recipe\n\n```yaml\ndata_source: aokvqa_official\n```\n")
    assert trained_on(trained_recipe(tmp_path)).startswith("A-OKVQA")
    assert choose_example(tmp_path, trained_recipe(tmp_path))[0] == image
