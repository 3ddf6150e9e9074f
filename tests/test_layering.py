"""Fast tier: the package's import structure (docs/architecture.md). Every import of a
``vitq_onnx`` module, at module level, inside a function or through ``lazy_import``, is an
edge; none may run up the layers, close a cycle, or bring torch where it has no place."""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitq_onnx"

# top to bottom: a module may import modules of its own layer and of the layers below
LAYERS = [
    ("interface", ["vitq_onnx", "vitq_onnx.cli", "vitq_onnx.api"]),
    ("commands", ["vitq_onnx.orchestrator", "vitq_onnx.layer_report", "vitq_onnx.evaluate"]),
    ("checks and model building", ["vitq_onnx.options", "vitq_onnx.validate", "vitq_onnx.models", "vitq_onnx.hf_models",
                                   "vitq_onnx.fp32"]),
    ("engines", ["vitq_onnx.calibration", "vitq_onnx.passes"]),
    ("families and float kernels", ["vitq_onnx.families", "vitq_onnx.runtime_kernels"]),
    ("the recipe and torch-free code tables", ["vitq_onnx.recipe", "vitq_onnx.codes"]),
    ("utilities", ["vitq_onnx.errors", "vitq_onnx.naming", "vitq_onnx.outputs", "vitq_onnx.progress",
                   "vitq_onnx.cpu", "vitq_onnx.formats", "vitq_onnx.lazy", "vitq_onnx.runtime",
                   "vitq_onnx.runtimes", "vitq_onnx.images", "vitq_onnx.latency"]),
]
# side by side in one layer, and never importing each other
APART = [("vitq_onnx.calibration", "vitq_onnx.passes")]
# only these import the orchestrator (from outside it)
ORCHESTRATOR_CALLERS = {"vitq_onnx.cli", "vitq_onnx.api"}
# neither these modules nor anything they import (at any level) may import these packages
TORCH_FREE = ["vitq_onnx.passes", "vitq_onnx.codes", "vitq_onnx.recipe", "vitq_onnx.formats", "vitq_onnx.naming",
              "vitq_onnx.errors", "vitq_onnx.outputs", "vitq_onnx.cpu"]
HEAVY = ("torch", "timm", "torchvision")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Every module ``path`` imports (vitq_onnx modules as named; others by their top package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def resolve(level: int, target: str | None) -> str:
        base = package
        for _ in range(level - 1):
            base = base.rpartition(".")[0]
        return ".".join(p for p in (base, target) if p) if level else target

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.level, node.module)
            for a in node.names:  # `from . import x` names a module when x is one
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_import" and node.args \
                and isinstance(node.args[0], ast.Constant):
            found.add(node.args[0].value)
    return {m if m.startswith("vitq_onnx") else m.split(".")[0] for m in found}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports(p, modules) - {module_name(p)} for p in files}


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:  # the package itself is its __init__ only, not every module under it
            inside = module == prefix or (module.startswith(prefix + ".") and prefix != "vitq_onnx")
            if inside and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in edges.items():
        for target in (t for t in targets if t.startswith("vitq_onnx")):
            if layer_of(target) < layer_of(module):
                found.append(f"{module} imports {target}, a layer above it "
                             f"({LAYERS[layer_of(target)][0]} over {LAYERS[layer_of(module)][0]})")
            for a, b in APART:
                if within(module, a) and within(target, b) or within(module, b) and within(target, a):
                    found.append(f"{module} imports {target}: {a} and {b} stay apart")
            if within(target, "vitq_onnx.orchestrator") and not within(module, "vitq_onnx.orchestrator") \
                    and module not in ORCHESTRATOR_CALLERS:
                found.append(f"{module} imports the orchestrator: only {sorted(ORCHESTRATOR_CALLERS)} do")
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [t for t in edges.get(m, ()) if t in edges or t in HEAVY]
    return seen


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_import_runs_up_the_layers():
    assert violations(graph()) == []


@pytest.mark.parametrize("root", TORCH_FREE)
def test_torch_free_modules_import_no_torch_at_any_depth(root):
    edges = graph()
    for module in (m for m in edges if within(m, root)):
        heavy = closure(edges, module) & set(HEAVY)
        assert not heavy, f"{module} reaches {sorted(heavy)}"


def test_the_checks_catch_what_they_are_for():
    """A cycle, an upward import and calibration <-> passes, each added to a copy of the graph."""
    edges = graph()
    assert cycles({**edges, "vitq_onnx.recipe": edges["vitq_onnx.recipe"] | {"vitq_onnx.codes.spec"},
                   "vitq_onnx.codes.spec": edges["vitq_onnx.codes.spec"] | {"vitq_onnx.recipe"}})
    assert violations({"vitq_onnx.passes.base": {"vitq_onnx.calibration.stages"}})
    assert violations({"vitq_onnx.calibration.stages": {"vitq_onnx.orchestrator"}})
    assert violations({"vitq_onnx.layer_report": {"vitq_onnx.orchestrator.inputs"}})
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("vitq_onnx.brand_new_module")
    assert closure({**edges, "vitq_onnx.codes.log2": {"torch"}}, "vitq_onnx.passes.log2_softmax") & set(HEAVY)


def test_help_and_usage_errors_answer_without_torch():
    code = ("import sys, time; t = time.time(); from vitq_onnx.cli import main\n"
            "for argv in (['export', '--help'], ['--version'], ['export', '--model', 'deit_t']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'\n"
            "print(time.time() - t)")
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--calib" in out.stdout or "required" in out.stderr
    assert time.time() - start < 5  # the interpreter start included; the answer itself prints its seconds
    assert float(out.stdout.strip().splitlines()[-1]) < 1.0
