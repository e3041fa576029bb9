"""Load the comparison packages (Liger-Kernel, cut-cross-entropy, cggr 0.5.0, torch's own linear_cross_entropy)
when they are present.

Each loader returns None with the reason printed once when a package is missing: a benchmark
reports "not installed" instead of a number, never a silently substituted one.

cggr 0.5.0 ships top-level modules named ``cggr`` (clashes with this package) and ``triton_kernels``
(clashes with a package Triton ships), so it must NOT be on sys.path. Install its wheel into a folder
of its own (``pip install --no-deps --target /tmp/cggr_v050 cggr-0.5.0-py3-none-any.whl``) and point
``CGGR_V050_PATH`` at it; it is loaded here under the private name ``cggr_v050``.
"""
import importlib
import importlib.util
import os
import sys

_reported = set()


def _missing(name, reason):
    if name not in _reported:
        print(f"[comparators] {name} not available: {reason}", file=sys.stderr)
        _reported.add(name)
    return None


def load_liger():
    if importlib.util.find_spec("liger_kernel") is None:
        return _missing("liger-kernel", "package not installed")
    return importlib.import_module("liger_kernel.transformers")


def load_cut_cross_entropy():
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return _missing("cut-cross-entropy", "package not installed")
    return importlib.import_module("cut_cross_entropy")


def load_torch_linear_cross_entropy():
    """torch.nn.functional.linear_cross_entropy with its chunked path (torch >= 2.13), or None (said once)."""
    import torch

    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return _missing("torch linear_cross_entropy", f"torch {torch.__version__} has none (added in 2.13)")
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, t: torch.nn.functional.linear_cross_entropy(h, w, t, options=options)


def load_cggr_v050():
    path = os.environ.get("CGGR_V050_PATH", "/tmp/cggr_v050")
    main_file = os.path.join(path, "cggr.py")
    kernels_file = os.path.join(path, "triton_kernels.py")
    if not (os.path.isfile(main_file) and os.path.isfile(kernels_file)):
        return _missing("cggr==0.5.0", f"no cggr.py/triton_kernels.py under CGGR_V050_PATH={path!r}")
    if "cggr_v050" in sys.modules:
        return sys.modules["cggr_v050"]
    # Its cggr.py does `from triton_kernels import ...` at import: lend it the name, then give it back.
    saved = sys.modules.get("triton_kernels")
    kernels = _load_file("triton_kernels", kernels_file)
    sys.modules["triton_kernels"] = kernels
    try:
        module = _load_file("cggr_v050", main_file)
    finally:
        if saved is None:
            del sys.modules["triton_kernels"]
        else:
            sys.modules["triton_kernels"] = saved
    sys.modules["cggr_v050"] = module
    sys.modules["cggr_v050_triton_kernels"] = kernels
    return module


def _load_file(name, file):
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
