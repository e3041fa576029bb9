"""``cggr env`` (``python -m cggr env``): what a bug report needs, one line each (Liger-Kernel's
``env_report`` is the model): the versions of cggr, Python, torch, CUDA, Triton and transformers, whether the
CUDA ops were compiled and for which architectures, the GPU, and whether the Triton kernels can run.

Needs torch only: a package that is missing is reported as 'not installed' (and not imported: its version
comes from the installed metadata).
"""
import importlib.metadata
import os
import platform
import sys
from typing import List, Tuple

import torch

from . import _deps

NOT_INSTALLED = "not installed"


def _version(module: str, *distributions: str) -> str:
    """The installed version of ``module`` (from its distribution's metadata), or 'not installed'."""
    if not _deps.available(module):
        return NOT_INSTALLED
    for name in distributions or (module,):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed (version unknown)"


def _build_info():
    try:
        from . import _build_info
    except ImportError:  # built before the build recorded it, or by other means
        return None
    return _build_info


def _cuda_ops() -> str:
    from . import _C

    info = _build_info()
    built = f"; built with torch {info.TORCH_VERSION}" if info is not None else ""
    if not _C.with_cuda:
        return f"not compiled (CPU ops only){built}"
    arch = getattr(info, "CUDA_ARCH_LIST", None) if info is not None else None
    arch_text = f"for TORCH_CUDA_ARCH_LIST={arch}" if arch else "(architectures not recorded)"
    return f"compiled {arch_text}{built}"


def _gpus() -> List[str]:
    if not torch.cuda.is_available():
        return []
    names = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        names.append(f"{torch.cuda.get_device_name(index)} (capability {major}.{minor})")
    return names


def _triton_kernels(triton_version: str, gpus: List[str]) -> str:
    if triton_version == NOT_INSTALLED:
        return "cannot run: Triton is not installed (the CPU implementations of the ops are used)"
    if gpus:
        return "can run (CUDA GPU)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "can run (TRITON_INTERPRET=1: interpreted, on CPU tensors)"
    return "cannot run: no GPU and TRITON_INTERPRET is not 1 (the CPU implementations of the ops are used)"


def collect() -> List[Tuple[str, str]]:
    """(name, value) pairs, in the order ``cggr env`` prints them."""
    __version__ = _version("cggr")  # the installed distribution's (no import of the package root)
    triton = _version("triton", "triton", "pytorch-triton")
    gpus = _gpus()
    return [
        ("cggr", __version__),
        ("Python", platform.python_version()),
        ("Platform", platform.platform()),
        ("torch", torch.__version__),
        ("CUDA (torch.version.cuda)", torch.version.cuda or "none (a CPU build of torch)"),
        ("Triton", triton),
        ("transformers", _version("transformers")),
        ("cggr CUDA ops", _cuda_ops()),
        ("GPU", "; ".join(f"{i}: {name}" for i, name in enumerate(gpus)) if gpus else "none"),
        ("Triton kernels", _triton_kernels(triton, gpus)),
    ]


def report() -> str:
    return "\n".join(f"{name}: {value}" for name, value in collect())


def main() -> int:
    print(report())
    sys.stdout.flush()
    return 0
