"""Build cggr._C: the selection ops (CPU always, CUDA when torch and the toolkit allow).

Environment:
  TORCH_CUDA_ARCH_LIST  honoured; defaults to "8.0;9.0" (Ampere, Hopper) to keep builds bounded.
  CUDA_HOME             honoured; when unset and torch's guess has no lib64/libcudart, /usr/local/cuda is tried.
  CGGR_FORCE_CPU=1      build the CPU ops only, even where CUDA could be built.
"""
import glob
import os
import sys

from setuptools import find_packages, setup


def _find_cuda_home():
    """torch guesses CUDA_HOME from nvcc on PATH; on some machines the guess lacks libcudart."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda",):
        if glob.glob(os.path.join(candidate, "lib64", "libcudart.so*")):
            os.environ["CUDA_HOME"] = candidate
            return


_find_cuda_home()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402  (after CUDA_HOME is settled: cpp_extension reads it at import)
from torch.utils import cpp_extension  # noqa: E402


def _cuda_build_reason():
    """Return None when CUDA ops can be built, else the reason they cannot."""
    if os.environ.get("CGGR_FORCE_CPU") == "1":
        return "CGGR_FORCE_CPU=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    home = cpp_extension.CUDA_HOME
    if home is None or not glob.glob(os.path.join(home, "lib64", "libcudart.so*")):
        return f"no CUDA toolkit with lib64/libcudart found (CUDA_HOME={home!r})"
    return None


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    cxx_flags = ["-O3"]  # the C++ standard is left to torch (C++20 from torch 2.13)
    reason = _cuda_build_reason()
    if reason is None and cuda_sources:
        print(f"cggr: building CPU and CUDA ops for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}",
              file=sys.stderr)
        return cpp_extension.CUDAExtension(
            "cggr._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=[("CGGR_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        )
    print(f"cggr: building CPU ops only ({reason or 'no CUDA sources in csrc/'})", file=sys.stderr)
    return cpp_extension.CppExtension(
        "cggr._C",
        cpp_sources,
        include_dirs=[os.path.join(here, "csrc")],
        
        extra_compile_args={"cxx": cxx_flags},
    )


# Optional dependencies (import name = distribution name for all of them). cggr._deps names a missing one
# with its extra; tests/test_packaging.py checks that what cggr/bench and tests/ import is declared here.
# cggr.router follows the transformers 5.x model forward; cggr.hf.CGGRTrainer is a transformers Trainer (which
# needs accelerate); peft and trl are optional (CGGRSFTTrainer needs trl: pip install trl)
_HF = ["transformers>=5.0", "accelerate"]
_BENCH = ["numpy", "transformers>=5.0", "tokenizers", "matplotlib", "tqdm"]  # cggr bench: plots, progress bar
# The test suite, with the transformers release CI pins (the router tests follow its model forward) and what
# tests/test_hf.py runs on (skipped without it); the same list as requirements-test.txt (CI installs the
# extras through scripts/setup.sh)
_TEST = ["pytest", "hypothesis", "ninja", "numpy", "transformers==5.24.0", "tokenizers", "matplotlib", "tqdm",
         "accelerate", "peft", "trl", "datasets"]
EXTRAS = {"hf": _HF, "bench": _BENCH, "test": _TEST}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})


setup(
    name="cggr",
    version="0.6.0.dev0",
    description="Confidence-Gated Gradient Routing: selective-token training that is really faster",
    packages=find_packages(include=["cggr", "cggr.*"]) + ["cggr.triton_kernels"],
    package_dir={"cggr.triton_kernels": "triton_kernels"},
    package_data={"cggr.bench": ["data/*"]},  # the embedded default corpus of `cggr bench`
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["cggr=cggr.cli:main"]},
)
