"""The code's shape: imports run one way (common <- data_service <- trainer <- evaluators <- cluster <- experiments),
and every collective of the project lives in trainer/losses/dist.py."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

ORDER = ("common", "data_service", "trainer", "evaluators", "cluster", "experiments")
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
               "all_to_all", "barrier"}


def _py_files(pkg: str):
    return sorted((REPO / pkg).rglob("*.py"))


def _imports(path: Path):
    """(line, top-level package) of every import in the file, at any depth (lazy imports too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]


def test_imports_run_one_way():
    wrong = []
    for rank, pkg in enumerate(ORDER):
        for f in _py_files(pkg):
            for line, top in _imports(f):
                if top in ORDER and ORDER.index(top) > rank:
                    wrong.append(f"{f.relative_to(REPO)}:{line} imports {top} (above {pkg})")
    assert not wrong, "imports against common <- data_service <- trainer <- evaluators <- cluster <- experiments:\n" + "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from evaluators.scoring import Scoring\n")
    assert list(_imports(bad)) == [(2, "evaluators")]


def test_collectives_only_in_losses_dist():
    home = REPO / "trainer" / "losses" / "dist.py"
    found = []
    for pkg in ORDER:
        for f in _py_files(pkg):
            if f == home:
                continue
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                    base = ast.unparse(node.func.value)
                    if "dist" in base or "torch" in base:
                        found.append(f"{f.relative_to(REPO)}:{node.lineno} {ast.unparse(node.func)}")
    assert not found, "collectives outside trainer/losses/dist.py:\n" + "\n".join(found)
    assert "all_reduce" in home.read_text() and "all_gather" in home.read_text()


def test_checkpoints_load_weights_only():
    """Every torch.load in the project passes weights_only=True (exports are safetensors): a
    checkpoint file cannot run code when it is loaded."""
    found = [f"{f.relative_to(REPO)}:{line} {code}" for pkg in ORDER + ("benchmarks",) for f in _py_files(pkg)
             for line, code in _unsafe_loads(f.read_text())]
    assert not found, "torch.load without weights_only=True:\n" + "\n".join(found)
    assert _unsafe_loads("import torch\nx = torch.load(p)\ny = torch.load(p, weights_only=False)\n") == [
        (2, "torch.load(p)"), (3, "torch.load(p, weights_only=False)")]


def _unsafe_loads(source: str) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if kw.get("weights_only") != "True":
                out.append((node.lineno, ast.unparse(node)))
    return out


LAYOUT_HOME = REPO / "trainer" / "checkpoint.py"


def _layout_literals(source: str) -> list[tuple[int, str]]:
    """String constants (f-string parts included) that spell the run folder's layout: a checkpoint's
    ``step_`` name, ``export``, ``export.json``, ``model.safetensors``. Docstrings are prose, skipped."""
    tree = ast.parse(source)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            v = node.value
            if v.startswith("step_") or v.strip("/") in ("export", "export.json", "model.safetensors") \
                    or "/export/" in v or v.endswith(("/export.json", "/model.safetensors")):
                out.append((node.lineno, v))
    return out


def test_run_layout_is_spelled_once():
    """The run folder's layout (``step_*``, ``export/``, its files) lives in trainer/checkpoint.py; every
    other module of the code asks it (``list_checkpoints``, ``step_name``, ``export_of`` ...)."""
    found = [f"{f.relative_to(REPO)}:{line} {v!r}" for pkg in ORDER for f in _py_files(pkg) if f != LAYOUT_HOME
             for line, v in _layout_literals(f.read_text())]
    assert not found, "the run layout spelled outside trainer/checkpoint.py:\n" + "\n".join(found)
    assert _layout_literals('"""step_* in prose"""\nx = "step_*"\ny = f"{d}/export/model.safetensors"\n') == [
        (2, "step_*"), (3, "/export/model.safetensors")]
    assert _layout_literals(LAYOUT_HOME.read_text())            # the home does spell it
