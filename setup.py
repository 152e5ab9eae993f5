"""Build the torch-free native modules.

lorakern._C     csrc/cpu/*.cpp     C++17, -O3, OpenMP when the compiler has it; AVX2 / AVX-512
                                   code lives in functions marked __attribute__((target(...)))
                                   and is chosen at run time, so there is no global -march.
lorakern._cuda  csrc/cuda/*.cu     compiled and linked by nvcc with -cudart static, so the module
                + csrc/cuda/*.cpp  imports on machines without a driver. Built when nvcc is found.

Environment:
  LORAKERN_CUDA=auto|1|0   auto (default): build the CUDA module when nvcc is found and drop it
                           (with a warning) if that fails; 1: failure is an error; 0: skip.
  LORAKERN_NVCC            path of nvcc (else CUDA_HOME/bin/nvcc, PATH, /usr/local/cuda/bin/nvcc).
  LORAKERN_CUDA_ARCHS      e.g. "80;90a" (default): SASS for each, plus PTX for the first.
  LORAKERN_CPU=0           skip the CPU module (the pure-torch reference still works).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from pybind11.setup_helpers import Pybind11Extension
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _has_openmp(compiler: str = "c++") -> bool:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            r = subprocess.run([compiler, "-fopenmp", src, "-o", os.path.join(d, "t")], capture_output=True)
        except OSError:
            return False
        return r.returncode == 0


def find_nvcc() -> str | None:
    """nvcc from LORAKERN_NVCC, CUDA_HOME/bin, PATH, then the standard toolkit location.

    The nvcc found is used both to compile and to link, so the toolkit it belongs
    to supplies cudart; CUDA_HOME is never derived from the folder of a wrapper script.
    """
    cands = [os.environ.get("LORAKERN_NVCC")]
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("LORAKERN_CUDA_ARCHS", "80;90a").replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[0]},code=compute_{archs[0]}"]
    return flags


class CudaExtension(Extension):
    """Marker: built by nvcc in :class:`BuildExt`."""


class BuildExt(build_ext):
    def build_extensions(self):
        omp = _has_openmp(self.compiler.compiler_cxx[0] if getattr(self.compiler, "compiler_cxx", None) else "c++")
        for ext in self.extensions:
            if not isinstance(ext, CudaExtension) and omp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()

    def build_extension(self, ext):
        if not isinstance(ext, CudaExtension):
            return super().build_extension(ext)
        mode = os.environ.get("LORAKERN_CUDA", "auto").lower()
        try:
            self._build_cuda(ext)
        except Exception as e:
            if mode == "1":
                raise
            print(f"warning: lorakern._cuda not built ({e}); set LORAKERN_CUDA=1 to make this an error", file=sys.stderr)

    def _build_cuda(self, ext):
        import pybind11

        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found")
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = os.path.join(self.build_temp, "cuda")
        os.makedirs(tmp, exist_ok=True)
        includes = [f"-I{os.path.join(ROOT, 'csrc', 'include')}", f"-I{pybind11.get_include()}",
                    f"-I{sysconfig.get_paths()['include']}"]
        common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", *includes]
        objs = []
        for src in ext.sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", os.path.join(ROOT, src), "-o", obj, *common]
            if src.endswith(".cu"):
                cmd += [*cuda_arch_flags(), "--expt-relaxed-constexpr"]
            else:
                cmd += ["-x", "c++"]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objs.append(obj)
        link = [nvcc, "-shared", "-cudart", "static", *cuda_arch_flags(), "-o", out, *objs]
        print(" ".join(link))
        subprocess.check_call(link)


def extensions() -> list[Extension]:
    exts: list[Extension] = []
    if os.environ.get("LORAKERN_CPU", "1") != "0" and _rel("csrc/cpu/*.cpp"):
        exts.append(
            Pybind11Extension(
                "lorakern._C",
                _rel("csrc/cpu/*.cpp"),
                include_dirs=["csrc/include"],
                extra_compile_args=["-O3", "-std=c++17"],
                cxx_std=17,
            )
        )
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    if os.environ.get("LORAKERN_CUDA", "auto").lower() != "0" and cuda_sources and find_nvcc():
        exts.append(CudaExtension("lorakern._cuda", cuda_sources))
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
