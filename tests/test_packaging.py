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
