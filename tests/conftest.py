"""Shared test setup.

Without a GPU the Triton kernels can only run in the interpreter, and triton
decides interpreted-or-compiled when a kernel is defined, so the switch is set
here, before any test module imports triton. The registry never picks Triton for
CPU tensors on its own, so this changes nothing for the other backends.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def backend(monkeypatch):
    """Force a backend for the duration of a test: ``backend("cpu")``."""

    def use(name: str):
        monkeypatch.setenv("LORAKERN_BACKEND", name)

    return use


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved random-init tiny Llama and its tokenizer: a local model directory needing no network."""
    from lorakern.train.tiny import tiny_llama, tiny_tokenizer

    path = str(tmp_path_factory.mktemp("tiny"))
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
