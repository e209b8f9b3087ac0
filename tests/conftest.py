"""Shared test fixtures. Append new fixtures; don't rewrite others'."""

import pytest

from processing_mmcoconut import build_internvl_tokenizer


@pytest.fixture(scope="session")
def base_tokenizer_dir(tmp_path_factory):
    """The offline InternVL3 tokenizer, built once per session (~12 s) and saved for cheap reloads."""
    path = tmp_path_factory.mktemp("internvl3_tokenizer")
    build_internvl_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def internvl_tokenizer(base_tokenizer_dir):
    """A fresh copy of the InternVL3 tokenizer (tests may add tokens to it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_tokenizer_dir)
