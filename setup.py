"""Builds the optional extension pidkern._C (metadata lives in pyproject.toml).

- CPU ops (csrc/*.cpp): always attempted when torch is importable at build time.
- CUDA ops (csrc/*.cu): added when torch is a CUDA build, a CUDA toolkit is found and
  PIDKERN_SKIP_CUDA_BUILD is not 1. Arch flags default to the local card's; with no card
  visible, to every architecture pidkern has kernel configs for that the toolkit builds
  (sm_80, 86, 89, 90, and 100 and 120 from CUDA 12.8), plus PTX of the newest.
- Anything missing (torch, a C++ compiler, nvcc) or a failing compile: the install still
  succeeds, without the extension, after a loud warning; pidkern then runs the same
  math in PyTorch (pidkern/_ext.py).

Install with `pip install --no-build-isolation -e .` so the build sees the installed torch.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def warn(msg):
    bar = "!" * 78
    print(f"\n{bar}\npidkern: {msg}\npidkern: continuing without the extension; the PyTorch fallback will be used.\n{bar}\n",
          file=sys.stderr, flush=True)


def default_arch_list(cuda_version: str) -> str:
    """TORCH_CUDA_ARCH_LIST for a build with no card to ask: A100, RTX 30xx, RTX 40xx,
    H100/H200 and, where the toolkit knows them (CUDA 12.8 on), B200 and RTX 50xx; PTX of
    the newest so a later card can JIT it."""
    major, minor = (int(v) for v in cuda_version.split(".")[:2])
    archs = ["8.0", "8.6", "8.9", "9.0"]
    if (major, minor) >= (12, 8):
        archs += ["10.0", "12.0"]
    return ";".join(archs) + "+PTX"


def extension_and_cmd():
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # no torch at build time (e.g. an isolated build)
        warn(f"torch is not importable at build time ({e!r}); build with --no-build-isolation to get pidkern._C")
        return [], {}

    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    cxx = ["-O3", "-ffp-contract=off"]  # same rounding as the CUDA kernels
    want_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("PIDKERN_SKIP_CUDA_BUILD") != "1")
    if want_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
        elif not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(torch.version.cuda)
        ext = cpp_extension.CUDAExtension(
            "pidkern._C", cpp + cu, include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]})
        print(f"pidkern: building pidkern._C with CUDA ({torch.version.cuda}, "
              f"arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'torch default')})", flush=True)
    else:
        ext = cpp_extension.CppExtension("pidkern._C", cpp, include_dirs=[os.path.join(HERE, "csrc")],
                                         extra_compile_args={"cxx": cxx})
        print("pidkern: building pidkern._C for CPU only"
              + (" (PIDKERN_SKIP_CUDA_BUILD=1)" if os.environ.get("PIDKERN_SKIP_CUDA_BUILD") == "1" else ""),
              flush=True)

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class TolerantBuild(base):
        """A failed compile must not fail the install: the package works without _C."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                warn(f"building pidkern._C failed: {e!r}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                warn(f"building {ext.name} failed: {e!r}")

    return [ext], {"build_ext": TolerantBuild}


ext_modules, cmdclass = extension_and_cmd()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
