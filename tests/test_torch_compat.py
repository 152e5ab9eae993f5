"""What keeps lorakern importable and its kernels interpretable on the oldest supported stack
(torch 2.4 with triton 3.0), checked on whichever torch runs the suite."""

import importlib
import inspect

import pytest
import torch


def test_custom_op_annotations_are_types_not_strings():
    # torch < 2.5 infers a custom op's schema from real annotations only: a string
    # ('Tensor', from ``from __future__ import annotations``) fails the import of lorakern.ops.
    from lorakern import ops

    custom_ops = [v for v in vars(ops).values() if type(v).__name__ == "CustomOpDef"]
    assert len(custom_ops) >= 8
    for op in custom_ops:
        for name, ann in inspect.signature(op._init_fn).parameters.items():
            assert not isinstance(ann.annotation, str), f"{op._name}: parameter {name} is annotated with a string"


@pytest.mark.parametrize("module", ["_device", "dropout", "gemv", "matmul", "nf4"])
def test_triton_constexpr_annotations_are_not_strings(module):
    # triton 3.0's interpreter treats a parameter as constexpr only when its annotation is
    # tl.constexpr itself; the string 'tl.constexpr' turns BLOCK sizes into tensors.
    pytest.importorskip("triton")
    mod = importlib.import_module(f"lorakern.kernels.triton.{module}")
    # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1: both wrap the Python function as .fn
    kernels = [v for v in vars(mod).values()
               if type(v).__module__.startswith("triton.runtime") and inspect.isfunction(getattr(v, "fn", None))]
    assert kernels, f"no @triton.jit function in {module}"
    for fn in kernels:
        for name, ann in fn.fn.__annotations__.items():
            assert not isinstance(ann, str), f"{module}.{fn.fn.__name__}: {name} is annotated with the string {ann!r}"


def test_autotune_gets_timing_keywords_this_triton_accepts():
    triton = pytest.importorskip("triton")
    from lorakern.kernels.triton import _launch

    accepted = inspect.signature(triton.autotune).parameters
    timing = _launch._autotune_timing()
    assert timing and set(timing) <= set(accepted)


def test_triton_3_0_interpreter_with_numpy_2_is_reported_unavailable(monkeypatch):
    """triton 3.0's interpreter (torch 2.4's) computes wrong results with numpy 2: the backend says so
    instead of running (the composite backend and the registry then use torch for those pieces)."""
    triton = pytest.importorskip("triton")
    import numpy

    from lorakern.kernels import triton as tk

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(triton, "__version__", "3.0.0")
    monkeypatch.setattr(numpy, "__version__", "2.1.3")
    ok, why = tk.availability()
    assert not ok and "numpy < 2 or triton >= 3.1" in why
    monkeypatch.setattr(numpy, "__version__", "1.26.4")
    assert tk.availability()[0]
    monkeypatch.setattr(triton, "__version__", "3.8.0+git5e1d2f")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert tk.availability()[0]
