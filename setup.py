"""Build the compiled extension ``moekernels._C``.

* The C++ CPU kernels (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``) are always built.
* The CUDA kernels (``csrc/cuda/*.cu`` + their ``*_bind.cpp``) are added when torch was built with CUDA and nvcc
  is found, or when ``MOEKERNELS_FORCE_CUDA=1``; ``MOEKERNELS_SKIP_CUDA_BUILD=1`` skips them.
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU archs (default: "8.0;9.0").

Install with ``pip install --no-build-isolation .`` so the extension is compiled against the torch you run.
"""
import glob
import os
import platform
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda(torch):
    if os.environ.get("MOEKERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return False, "MOEKERNELS_SKIP_CUDA_BUILD=1"
    if os.environ.get("MOEKERNELS_FORCE_CUDA", "0") == "1":
        return True, "MOEKERNELS_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}"


def _extensions():
    import torch
    from torch.utils import cpp_extension

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-DMOEKERNELS_X86=1")
    link = ["-fopenmp"]
    use_cuda, why = _want_cuda(torch)
    print(f"[moekernels] CUDA kernels: {'yes' if use_cuda else 'no'} ({why})")
    if not use_cuda:
        ext = cpp_extension.CppExtension(
            "moekernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=link)
        return [ext], cpp_extension.BuildExtension
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DMOEKERNELS_WITH_CUDA=1"]
    ext = cpp_extension.CUDAExtension(
        "moekernels._C", sources, include_dirs=include_dirs,
        define_macros=[("MOEKERNELS_WITH_CUDA", "1"),
                       ("MOEKERNELS_CUDA_ARCHS", '"' + os.environ["TORCH_CUDA_ARCH_LIST"] + '"')],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    return [ext], cpp_extension.BuildExtension


try:
    ext_modules, build_ext = _extensions()
    cmdclass = {"build_ext": build_ext.with_options(use_ninja=shutil.which("ninja") is not None)}
except ImportError as e:  # torch missing at build time: pure-Python install, eager backend only
    print(f"[moekernels] WARNING: building without the compiled extension ({e}); "
          "install torch first and use `pip install --no-build-isolation .`")
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
