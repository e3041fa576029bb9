"""Packaging, checked cheaply on the source (nothing is installed): what the code imports is declared in
setup.py's extras, requirements-test.txt is the `test` extra, a missing dependency is named with its extra
(cggr._deps), and `cggr --help` / `cggr bench` without the bench's dependencies say so in one line."""
import ast
import os
import re
import subprocess
import sys

import pytest

from cggr import _deps
from cggr.cli import BENCH_MIN_VERSIONS, BENCH_REQUIRES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules that come with the core dependency (torch's Linux builds bring Triton) or are this repository's
LOCAL = {"cggr", "torch", "triton"} | {os.path.splitext(n)[0] for n in os.listdir(ROOT)} \
    | {os.path.splitext(n)[0] for n in os.listdir(os.path.join(ROOT, "tests"))}


def _setup_extras():
    """setup.py's EXTRAS, read from its source (running it would build the extension): the top-level
    list assignments, the dict literal that names them, and 'all' as their union."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    lists, extras = {}, None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if isinstance(node.value, ast.List):
                lists[name] = ast.literal_eval(node.value)
            elif name == "EXTRAS" and isinstance(node.value, ast.Dict):
                extras = {ast.literal_eval(k): lists[v.id] if isinstance(v, ast.Name) else ast.literal_eval(v)
                          for k, v in zip(node.value.keys, node.value.values)}
    assert extras is not None, "setup.py has no EXTRAS = {...} literal"
    extras["all"] = sorted({req for reqs in extras.values() for req in reqs})
    return extras


def _project(requirement: str) -> str:
    """The distribution name of a requirement string ('transformers>=5.0' -> 'transformers')."""
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def _third_party_imports(folder, recursive=False):
    """{top-level module: a file importing it} for every import (lazy ones included) of the .py files, and
    every ``pytest.importorskip("module")``."""
    found = {}
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules = [node.module]
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and node.func.attr == "importorskip" and node.args
                      and isinstance(node.args[0], ast.Constant)):  # a test CI would skip without it
                    modules = [node.args[0].value]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        found.setdefault(top, os.path.relpath(path, ROOT))
        if not recursive:
            break
    return found


EXTRAS = _setup_extras()


def _declared(extra):
    return {_project(r) for r in EXTRAS[extra]}


def test_extras_are_declared():
    assert {"bench", "hf", "test", "all"} <= set(EXTRAS)
    assert {"numpy", "transformers", "matplotlib", "tqdm", "tokenizers"} <= _declared("bench")
    assert "transformers" in _declared("hf")
    assert {"pytest", "hypothesis", "numpy", "ninja", "transformers"} <= _declared("test")
    assert "transformers==5.24.0" in EXTRAS["test"]  # the release CI pins
    for extra in ("bench", "hf", "test"):
        assert set(EXTRAS[extra]) <= set(EXTRAS["all"])


def test_the_bench_imports_only_what_its_extra_declares():
    imports = _third_party_imports(os.path.join(ROOT, "cggr", "bench"))
    assert "numpy" in imports  # the parser sees the bench's imports
    undeclared = {m: f for m, f in imports.items() if m not in _declared("bench")}
    assert not undeclared, f"imported by the bench but not in setup.py's 'bench' extra: {undeclared}"


def test_the_library_imports_only_torch_and_the_hf_extra():
    imports = _third_party_imports(os.path.join(ROOT, "cggr"), recursive=True)
    for folder in ("bench",):  # the bench has its own extra (above)
        imports = {m: f for m, f in imports.items() if not f.startswith(os.path.join("cggr", folder) + os.sep)}
    imports.update(_third_party_imports(os.path.join(ROOT, "triton_kernels")))
    undeclared = {m: f for m, f in imports.items() if m not in _declared("hf")}
    assert not undeclared, f"imported by the library but declared nowhere (core: torch; 'hf' extra): {undeclared}"


def test_the_tests_import_only_what_the_test_extra_declares():
    imports = _third_party_imports(os.path.join(ROOT, "tests"), recursive=True)
    assert "pytest" in imports and "peft" in imports  # imported, and importorskip-ed
    undeclared = {m: f for m, f in imports.items() if m not in _declared("test")}
    assert not undeclared, f"imported by tests/ but not in setup.py's 'test' extra: {undeclared}"


def test_requirements_test_txt_is_the_test_extra():
    lines = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, "requirements-test.txt"))]
    assert sorted(line for line in lines if line) == sorted(EXTRAS["test"])


def test_the_bench_checks_what_its_extra_declares():
    assert set(BENCH_REQUIRES) <= _declared("bench")
    for module, version in BENCH_MIN_VERSIONS.items():
        assert f"{module}>={version}" in EXTRAS["bench"]


def test_require_names_every_missing_module_and_the_extra():
    _deps.require(("json", "pytest"), "test", "the tests")  # installed: nothing to say
    with pytest.raises(ImportError) as info:
        _deps.require(("json", "cggr_no_such_module_a", "cggr_no_such_module_b"), "bench", "cggr bench")
    assert isinstance(info.value, _deps.MissingDependency)
    message = str(info.value)
    assert message.startswith("cggr bench needs cggr_no_such_module_a, cggr_no_such_module_b (")
    assert "the 'bench' extra: pip install --no-build-isolation -e '.[bench]'" in message and "json" not in message
    with pytest.raises(_deps.MissingDependency, match=r"needs pytest>=999\.0 \(found .*'\.\[test\]'"):
        _deps.require("pytest", "test", "the tests", {"pytest": "999.0"})


def test_note_missing_says_it_once():
    said = []
    for _ in range(3):
        assert not _deps.note_missing("cggr_no_such_module_c", "bench", "cggr bench", "no plot", log=said.append)
    assert said == ["cggr bench: cggr_no_such_module_c is not installed, so no plot; it comes with the 'bench' "
                    "extra: pip install --no-build-isolation -e '.[bench]' in the cggr source folder"]
    assert _deps.note_missing("json", "bench", "cggr bench", "nothing", log=said.append) and len(said) == 1


_WITHOUT_BENCH_DEPS = """
import sys
for name in ("numpy", "transformers", "tokenizers", "matplotlib", "tqdm"):
    sys.modules[name] = None  # as if not installed: importing them raises ImportError
import warnings
warnings.simplefilter("ignore")  # torch warns once that NumPy is missing
from cggr.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit:
    print("exit", exit.code)
else:
    print("returned", status)
"""


def _cli_without_bench_deps(*args):
    # without TRITON_INTERPRET: Triton's interpreter imports numpy (a user without numpy does not run it)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _WITHOUT_BENCH_DEPS, *args], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    return run.stdout, run.stderr


def test_cggr_help_needs_torch_only():
    out, err = _cli_without_bench_deps("--help")
    assert "exit 0" in out and "bench" in out, err


def test_cggr_bench_without_its_dependencies_says_so_in_one_line(tmp_path):
    out, err = _cli_without_bench_deps("bench", "--out", str(tmp_path / "out"))
    assert "returned 2" in out, err
    assert "error: cggr bench needs numpy, transformers (the 'bench' extra: pip install" in err
    assert "Traceback" not in err and err.count("needs") == 1


# --- a cggr._C built against another torch (issue 19, item 4) --------------------------------------------

_WITH_BROKEN_EXTENSION = """
import importlib.abc, importlib.machinery, sys

class BrokenExtension(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # cggr._C as the loader meets it after a torch upgrade
    def find_spec(self, name, path=None, target=None):
        if name == "cggr._C":
            return importlib.machinery.ModuleSpec(name, self)
        if name == "cggr._build_info":  # recorded by the fake build, or absent whatever the real build wrote
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        if module.__name__ == "cggr._build_info":
            if sys.argv[1] != "recorded":
                raise ModuleNotFoundError("No module named 'cggr._build_info'", name="cggr._build_info")
            module.TORCH_VERSION = "2.9.0+cu128"
            return
        raise ImportError(sys.argv[2])

sys.meta_path.insert(0, BrokenExtension())
import cggr
"""


def _import_with_broken_extension(build_info, loader_message):
    return subprocess.run([sys.executable, "-c", _WITH_BROKEN_EXTENSION, build_info, loader_message],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


UNDEFINED_SYMBOL = ("/site-packages/cggr/_C.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                    "_ZN3c1017RegisterOperatorsD1Ev")


def test_an_extension_built_against_another_torch_says_to_rebuild():
    import torch

    run = _import_with_broken_extension("recorded", UNDEFINED_SYMBOL)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: cggr's compiled ops (cggr._C) were built against torch 2.9.0+cu128 and "
                           f"do not load with the torch installed now ({torch.__version__}); rebuild them: "
                           "bash scripts/setup.sh (or: pip install --no-build-isolation -e .)"), run.stderr
    assert UNDEFINED_SYMBOL in last  # the loader's words are kept, in the same line
    assert run.stderr.count("Traceback") == 1 and "During handling" not in run.stderr


def test_the_rebuild_message_without_a_recorded_build():
    run = _import_with_broken_extension("absent", UNDEFINED_SYMBOL)
    assert "built against another torch (its version was not recorded)" in run.stderr, run.stderr
    assert "rebuild them: bash scripts/setup.sh" in run.stderr


def test_other_import_errors_of_the_extension_are_not_disguised():
    run = _import_with_broken_extension("recorded", "libcudart.so.13: cannot open shared object file")
    last = run.stderr.strip().splitlines()[-1]
    assert last == "ImportError: libcudart.so.13: cannot open shared object file", run.stderr


def test_the_rebuild_message_builder():
    import cggr

    error = cggr._extension_import_error(ImportError("_C.so: undefined symbol: _ZN2at4_ops"), "2.99.0")
    assert isinstance(error, ImportError) and "torch installed now (2.99.0)" in str(error)
    assert cggr.REBUILD_COMMAND in str(error)
    missing = ModuleNotFoundError("No module named 'cggr._C'", name="cggr._C")
    assert "not built" in str(cggr._extension_import_error(missing, "2.99.0"))
    assert cggr._extension_import_error(ImportError("No module named 'numpy'"), "2.99.0") is None
    assert cggr._extension_import_error(ModuleNotFoundError("x", name="numpy"), "2.99.0") is None


# --- cggr env (issue 19, item 5) -------------------------------------------------------------------------

ENV_LINES = ("cggr", "Python", "Platform", "torch", "CUDA (torch.version.cuda)", "Triton", "transformers",
             "cggr CUDA ops", "GPU", "Triton kernels")


def _env_lines(stdout):
    return dict(line.split(": ", 1) for line in stdout.strip().splitlines())


def test_cggr_env_reports_one_line_each():
    import torch

    import cggr
    from cggr import _C

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "cggr", "env"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = _env_lines(run.stdout)
    assert tuple(lines) == ENV_LINES
    assert lines["cggr"] == cggr.__version__ and lines["torch"] == torch.__version__
    assert lines["CUDA (torch.version.cuda)"] == (torch.version.cuda or "none (a CPU build of torch)")
    assert lines["cggr CUDA ops"].startswith("compiled" if _C.with_cuda else "not compiled (CPU ops only)")
    if torch.cuda.is_available():
        assert f"(capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})" in lines["GPU"]
        assert lines["Triton kernels"] == "can run (CUDA GPU)"
    else:
        assert lines["GPU"] == "none"
        assert lines["Triton kernels"].startswith("cannot run: no GPU and TRITON_INTERPRET is not 1")
        env["TRITON_INTERPRET"] = "1"
        run = subprocess.run([sys.executable, "-m", "cggr", "env"], capture_output=True, text=True, cwd=ROOT,
                             env=env, timeout=300)
        assert _env_lines(run.stdout)["Triton kernels"].startswith("can run (TRITON_INTERPRET=1")


def test_cggr_env_needs_torch_only():
    out, err = _cli_without_bench_deps("env")
    assert "returned 0" in out, err
    lines = _env_lines(out.replace("returned 0", ""))
    assert lines["transformers"] == "not installed" and tuple(lines) == ENV_LINES
    assert "Traceback" not in err


def test_cggr_env_reads_the_build_info(monkeypatch):
    import types

    from cggr import _C, env

    info = types.SimpleNamespace(TORCH_VERSION="2.14.1+cu130", CUDA_ARCH_LIST="8.0;9.0")
    monkeypatch.setattr(env, "_build_info", lambda: info)
    if _C.with_cuda:
        assert env._cuda_ops() == "compiled for TORCH_CUDA_ARCH_LIST=8.0;9.0; built with torch 2.14.1+cu130"
    else:
        assert env._cuda_ops() == "not compiled (CPU ops only); built with torch 2.14.1+cu130"
    monkeypatch.setattr(env, "_build_info", lambda: None)
    assert "built with" not in env._cuda_ops()


def test_the_sdist_ships_the_headers_and_kernels():
    manifest = open(os.path.join(ROOT, "MANIFEST.in")).read()
    assert "recursive-include csrc *.h" in manifest and "recursive-include triton_kernels *.py" in manifest
    assert "exclude cggr/_build_info.py" in manifest
    assert os.path.exists(os.path.join(ROOT, "cggr", "py.typed"))
    for name in ("LICENSE", "CHANGELOG.md"):
        assert os.path.exists(os.path.join(ROOT, name)), name
    version = re.search(r'__version__ = "([^"]+)"', open(os.path.join(ROOT, "cggr", "__init__.py")).read())
    assert f'version="{version.group(1)}"' in open(os.path.join(ROOT, "setup.py")).read()
    assert f"## {version.group(1)}" in open(os.path.join(ROOT, "CHANGELOG.md")).read()
