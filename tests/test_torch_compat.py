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
