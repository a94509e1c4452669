"""Build of psld_fast and its compiled kernels (psld_fast._C).

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed: it is not
a build requirement, so pip does not fetch a second torch into an isolated build env).

What gets built (printed as "psld_fast build: ..." at the start):

* torch importable            -> the C++ CPU kernel (CppExtension psld_fast._C);
* torch is a CUDA build and nvcc is found -> the CUDA kernel too (CUDAExtension);
* ``FORCE_CUDA=1``            -> insist on the CUDA kernel, fail with the reason if impossible;
* ``PSLD_FAST_BUILD_EXT=0``   -> no extension at all: a pure-Python install (reference backend).

Environment honoured: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0" when no GPU is visible, else
torch's default: the visible GPUs' architectures), ``MAX_JOBS`` (parallel compile jobs, via
torch's ninja build), ``CUDA_HOME`` (toolkit root; when unset, the parent of the folder holding nvcc
is used if it has the CUDA headers, else /usr/local/cuda), ``PSLD_FAST_NVCC_FLAGS`` (extra nvcc flags,
space separated, e.g. ``-Xptxas -v`` for the register/spill report of .ci/check_cuda_build.sh).  Nothing is downloaded; CUDA library
headers a CUDA torch needs (cublas, cusparse, ...) are taken from the toolkit, or else from the
installed ``nvidia-*`` wheels.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/affine_step_cpu.cpp"]
CUDA_SOURCES = ["csrc/affine_step_cuda.cu"]
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def _log(msg: str) -> None:
    print(f"psld_fast build: {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def _locate_cuda_home() -> None:
    """Set CUDA_HOME before torch.utils.cpp_extension reads it: torch guesses the parent of the
    folder holding nvcc, which is wrong for a wrapper script such as /usr/local/bin/nvcc."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(root, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = root
            return


def _wheel_cuda_includes(cuda_home: str) -> list[str]:
    """Include dirs of installed nvidia-* wheels, when the toolkit lacks the library headers."""
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _cuda_reason_missing(torch, cpp_ext) -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cpp_ext.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_ext.CUDA_HOME, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit root)"
    return None


def _extensions():
    """Return (ext_modules, cmdclass) for the resolved configuration."""
    build_ext = _env_flag("PSLD_FAST_BUILD_EXT")
    force_cuda = bool(_env_flag("FORCE_CUDA"))
    if build_ext is False:
        if force_cuda:
            raise RuntimeError("psld_fast build: FORCE_CUDA=1 contradicts PSLD_FAST_BUILD_EXT=0")
        _log("PSLD_FAST_BUILD_EXT=0: pure-Python install, no compiled kernels")
        return [], {}
    _locate_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension as cpp_ext
    except ImportError as exc:
        if force_cuda or build_ext:
            raise RuntimeError(f"psld_fast build: torch is needed to build the kernels ({exc}); "
                               "install torch first and use pip install --no-build-isolation") from exc
        _log(f"torch not importable ({exc}): pure-Python install, no compiled kernels")
        return [], {}

    missing = _cuda_reason_missing(torch, cpp_ext)
    if force_cuda and missing:
        raise RuntimeError(f"psld_fast build: FORCE_CUDA=1 but {missing}")
    with_cuda = missing is None
    kwargs = dict(name="psld_fast._C", extra_link_args=["-fopenmp"],
                  include_dirs=[os.path.join(ROOT, "csrc")])
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        kwargs["include_dirs"] += _wheel_cuda_includes(cpp_ext.CUDA_HOME)
        ext = cpp_ext.CUDAExtension(sources=CPU_SOURCES + CUDA_SOURCES,
                                    define_macros=[("PSLD_FAST_WITH_CUDA", "1")],
                                    extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + os.environ.get(
                                        "PSLD_FAST_NVCC_FLAGS", "").split()},
                                    **kwargs)
    else:
        ext = cpp_ext.CppExtension(sources=CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS},
                                   **kwargs)
    _log(f"torch {torch.__version__}, CPU kernel: yes, CUDA kernel: "
         f"{'yes' if with_cuda else 'no (' + missing + ')'}, CUDA_HOME={cpp_ext.CUDA_HOME}, "
         f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}, "
         f"MAX_JOBS={os.environ.get('MAX_JOBS', '(torch default)')}")
    return [ext], {"build_ext": cpp_ext.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
