"""The layer rules of docs/architecture.md, checked on the source (every import, lazy ones included)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = {"cggr": os.path.join(ROOT, "cggr"), "cggr.triton_kernels": os.path.join(ROOT, "triton_kernels")}


def _modules():
    """{module name: path} for every .py file of the installed package."""
    found = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for dirpath, _, files in os.walk(folder):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), folder)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join([prefix] + rel)] = os.path.join(dirpath, name)
    return found


MODULES = _modules()
EXTENSIONS = {"cggr._C", "cggr._build_info"}  # compiled (csrc/) or written by the build (setup.py)


def _imports(module, path):
    """Names of the package's modules that ``module`` imports (``from pkg import sub`` counts ``pkg.sub``)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = {f"{target}.{alias.name}" for alias in node.names}
            subs = {name for name in subs if name in MODULES or name in EXTENSIONS}
            out.update(subs)
            if len(subs) < len(node.names):  # some names are attributes of the target module itself
                out.add(target)
    return {name for name in out if name == "cggr" or name.startswith("cggr.")}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _is_under(module, package):
    return module == package or module.startswith(package + ".")


def test_the_module_list_is_complete():
    assert "cggr.model" in MODULES and "cggr.triton_kernels.token_stats" in MODULES
    assert "cggr.experimental.policies" in MODULES and "cggr.bench.cli" in MODULES


def test_no_module_imports_the_package_root():
    offenders = {m for m, deps in GRAPH.items() if "cggr" in deps and m != "cggr"}
    assert not offenders


def test_kernels_import_nothing_of_the_package():
    for module, deps in GRAPH.items():
        if _is_under(module, "cggr.triton_kernels"):
            assert {d for d in deps if not _is_under(d, "cggr.triton_kernels")} == set(), module


@pytest.mark.parametrize("package", ["cggr.experimental", "cggr.bench"])
def test_the_core_never_imports(package):
    """Experiments and the bench sit on top of the core; only they (and the command line, for the bench)
    import them."""
    allowed = ("cggr.experimental", "cggr.bench", "cggr.cli", "cggr.__main__")
    for module, deps in GRAPH.items():
        if any(_is_under(module, a) for a in allowed):
            continue
        assert not any(_is_under(d, package) for d in deps), f"{module} imports {package}"


def test_ops_are_the_only_door_to_the_kernels():
    """Above the op layer, kernels are reached through cggr.ops (torch.library ops), never directly."""
    op_layer = {"cggr.ops", "cggr.stats_ops", "cggr.selection_ops", "cggr.linear_ops", "cggr.op_registry", "cggr"}
    for module, deps in GRAPH.items():
        if module in op_layer or _is_under(module, "cggr.triton_kernels"):
            continue
        assert not any(_is_under(d, "cggr.triton_kernels") for d in deps), module
        # the env report reads one build fact, _C.with_cuda
        assert "cggr._C" not in deps or module in op_layer | {"cggr.env"}, module


def test_no_import_cycle():
    def visit(module, stack, done):
        if module in stack:
            cycle = stack[stack.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done or module not in GRAPH:
            return
        stack.append(module)
        # the package root's own imports (loading the extension and the ops) are where every import starts
        for dep in sorted(GRAPH[module] - {"cggr"}):
            visit(dep, stack, done)
        stack.pop()
        done.add(module)

    done = set()
    for module in sorted(GRAPH):
        visit(module, [], done)


def test_no_module_is_longer_than_600_lines():
    long = {m: n for m, path in MODULES.items() if (n := sum(1 for _ in open(path))) > 600}
    assert not long
