"""One way to register the Python-side ops of ``torch.ops.cggr`` (the C++ ones are in csrc/registration.cpp):
a schema, a CPU kernel, a CUDA kernel and a fake kernel per op, at the low level of ``torch.library``
(``custom_op`` adds a Python layer around every call, host time that host-bound steps pay)."""
import torch


def register_ops(schemas: dict, tags=()) -> torch.library.Library:
    """``schemas``: {name: (schema, cpu_kernel, cuda_kernel, fake_kernel)}. Returns the library fragment,
    which the caller keeps alive for the life of the process."""
    lib = torch.library.Library("cggr", "FRAGMENT")
    for name, (schema, cpu, cuda, fake) in schemas.items():
        lib.define(name + schema, tags=tuple(tags))
        lib.impl(name, cpu, "CPU")
        lib.impl(name, cuda, "CUDA")
        torch.library.register_fake(f"cggr::{name}", fake, lib=lib)
    return lib
