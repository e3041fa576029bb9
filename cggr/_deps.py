"""Optional dependencies: a missing one is named once, with the extra of setup.py that brings it.

The core library needs torch only (and Triton, which comes with torch's CUDA builds). ``cggr bench``
needs the ``bench`` extra, the Hugging Face integration the ``hf`` extra, the tests the ``test`` extra
(setup.py). ``require`` raises one ``MissingDependency`` naming every missing module of a feature at
once; ``note_missing`` says once per process that an optional part (a plot, a progress bar) is skipped.
"""
import importlib.metadata
import importlib.util
import re
from typing import Iterable, Optional, Sequence, Union

# Modules that are not installed under their import name (import name -> distribution name).
_DISTRIBUTIONS = {"yaml": "PyYAML", "PIL": "Pillow"}

_said = set()  # (module, purpose) pairs already reported by note_missing


class MissingDependency(ImportError):
    """An optional dependency is missing (or too old); the message names it and the extra that brings it."""


def install_hint(extra: str) -> str:
    """Where ``module`` comes from: the extra, and the command that installs it into the environment that
    has cggr (no build isolation: the extension stays built against the torch installed)."""
    return f"the '{extra}' extra: pip install --no-build-isolation -e '.[{extra}]' in the cggr source folder"


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without __spec__
        return False


def _version_tuple(text: str):
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def _too_old(module: str, min_version: Optional[str]) -> Optional[str]:
    """The installed version of ``module`` when it is older than ``min_version``, else None."""
    if min_version is None:
        return None
    try:
        installed = importlib.metadata.version(_DISTRIBUTIONS.get(module, module))
    except importlib.metadata.PackageNotFoundError:  # importable but not installed by pip: trust it
        return None
    return installed if _version_tuple(installed) < _version_tuple(min_version) else None


def require(module_name: Union[str, Sequence[str]], extra: str, purpose: str,
            min_versions: Optional[dict] = None) -> None:
    """Raise ``MissingDependency`` when a module ``purpose`` needs is not installed (or older than
    ``min_versions[module]``): one message naming every such module and the extra that brings them, e.g.
    ``cggr bench needs numpy (the 'bench' extra: pip install --no-build-isolation -e '.[bench]' ...)``."""
    modules = [module_name] if isinstance(module_name, str) else list(module_name)
    min_versions = min_versions or {}
    problems = []
    for module in modules:
        if not available(module):
            problems.append(module)
        else:
            old = _too_old(module, min_versions.get(module))
            if old is not None:
                problems.append(f"{module}>={min_versions[module]} (found {old})")
    if problems:
        raise MissingDependency(f"{purpose} needs {', '.join(problems)} ({install_hint(extra)})")


def note_missing(module: str, extra: str, purpose: str, consequence: str, log=print) -> bool:
    """True when ``module`` is installed; otherwise say once per process (through ``log``) what is
    skipped without it and how to install it, and return False."""
    if available(module):
        return True
    key = (module, purpose)
    if key not in _said:
        _said.add(key)
        log(f"{purpose}: {module} is not installed, so {consequence}; it comes with {install_hint(extra)}")
    return False


def missing(modules: Iterable[str]) -> list:
    """The modules of ``modules`` that are not installed."""
    return [m for m in modules if not available(m)]
