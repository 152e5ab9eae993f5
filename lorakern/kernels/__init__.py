"""Backends: one module per backend, each exposing the functions of ``lorakern.reference``.

``cpu`` (C++ in csrc/cpu, module ``lorakern._C``), ``triton`` (GPU, or CPU under
``TRITON_INTERPRET=1``) and ``cuda`` (csrc/cuda, module ``lorakern._cuda``).
Importing this package imports no backend: ``lorakern.ops`` loads them lazily.
"""
