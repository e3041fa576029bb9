"""Build cggr._C: the selection ops (CPU always, CUDA when torch and the toolkit allow).

Environment:
  TORCH_CUDA_ARCH_LIST  honoured; defaults to "8.0;9.0" (Ampere, Hopper) to keep builds bounded.
  CUDA_HOME             honoured; when unset and torch's guess has no lib64/libcudart, /usr/local/cuda is tried.
  CGGR_FORCE_CPU=1      build the CPU ops only, even where CUDA could be built.

The build writes cggr/_build_info.py (gitignored) next to the compiled module: the torch it was built
against and the CUDA architectures, so that `cggr env` can report them and a `cggr._C` that no longer loads
after a torch upgrade is explained (cggr/__init__.py).
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


def _build_info_source(with_cuda: bool) -> str:
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None
    return ("# Written by setup.py when cggr._C is built (not in git): what the extension was built against.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
            f"WITH_CUDA = {with_cuda!r}\n"
            f"CUDA_ARCH_LIST = {arch!r}\n")


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, then cggr/_build_info.py written next to the compiled module (the build
    folder, for a wheel) and into the source folder (for an editable install)."""

    def run(self):
        super().run()
        with_cuda = any(macro[0] == "CGGR_WITH_CUDA" for ext in self.extensions for macro in ext.define_macros)
        text = _build_info_source(with_cuda)
        folders = {os.path.dirname(self.get_ext_fullpath("cggr._C")),
                   os.path.join(os.path.dirname(os.path.abspath(__file__)), "cggr")}
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_info.py"), "w") as f:
                f.write(text)


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
         "accelerate", "peft", "trl", "datasets", "gguf"]
EXTRAS = {"hf": _HF, "bench": _BENCH, "test": _TEST}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})


setup(
    name="cggr",
    version="0.6.0.dev0",
    description="Confidence-Gated Gradient Routing: selective-token training that is really faster",
    long_description=open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    packages=find_packages(include=["cggr", "cggr.*"]) + ["cggr.triton_kernels"],
    package_dir={"cggr.triton_kernels": "triton_kernels"},
    # the embedded default corpus of `cggr bench`; py.typed: the package ships type hints (PEP 561)
    package_data={"cggr.bench": ["data/*"], "cggr": ["py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["cggr=cggr.cli:main"]},
)
