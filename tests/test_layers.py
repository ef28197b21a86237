"""Dependencies between the pipeline's folders point one way (STYLE.md §1). Any other arrow fails here."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {  # folder: kiln subpackages (or modules) it may import, besides kiln.errors
    "ir": set(),
    "frontend": {"ir"},
    "passes": {"ir"},
    "schedules": {"ir"},
    "codegen": {"ir", "schedules", "runtime.artifact"},
    # passes: tasks are fused groups, built by the pipeline; runtime.model: candidates are timed inside the model
    "autotune": {"ir", "passes", "schedules", "codegen", "runtime.model"},
    "runtime": set(),
    "serve": {"runtime"},
}
COMPILER_ONLY = ("tvm.te", "tvm.topi", "tvm.s_tir", "tvm.relax", "onnx")


def _imports(path: Path, folder: str):
    tree = ast.parse(path.read_text(), filename=str(path))
    rel_parts = path.relative_to(ROOT).with_suffix("").parts  # ('ir', 'ops', 'conv')
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel_parts[: len(rel_parts) - node.level])
                mod = ".".join(["kiln", *base] + ([node.module] if node.module else []))
                if not node.module:
                    for alias in node.names:
                        yield node.lineno, f"{mod}.{alias.name}"
                    continue
                yield node.lineno, mod.replace(f"kiln.{folder}", f"kiln.{folder}", 1)
            else:
                yield node.lineno, node.module or ""


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "kiln" or len(parts) < 2:
        return None
    return ".".join(parts[1:3]) if parts[1] == "runtime" and len(parts) > 2 else parts[1]


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_point_downward(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in _imports(path, folder):
            layer = _layer_of(module)
            if layer is None or layer == "errors" or layer.split(".")[0] == folder:
                continue
            if layer not in ALLOWED[folder] and layer.split(".")[0] not in ALLOWED[folder]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, f"{folder}/ may import only {sorted(ALLOWED[folder])}:\n" + "\n".join(bad)


def test_runtime_stays_free_of_the_compiler():
    bad = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        for line, module in _imports(path, "runtime"):
            if module.startswith(COMPILER_ONLY):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "runtime/ must load artifacts without the compiler:\n" + "\n".join(bad)
