"""The shape of the source tree: no import cycles, online methods named in one table, the
README's artifact table equal to the run directory's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from prefloop.loop.rundir import ARTIFACTS
from prefloop.methods import STRATEGIES

SRC = Path(__file__).resolve().parents[1] / "src" / "prefloop"
README = Path(__file__).resolve().parents[1] / "README.md"


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every prefloop module `path` imports, at module level or inside functions.
    `from pkg import sub` is an import of the submodule `pkg.sub` only."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("prefloop"):
            subs = [f"{node.module}.{a.name}" for a in node.names
                    if f"{node.module}.{a.name}" in modules]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("prefloop"))
    return {m for m in found if m in modules}


def test_no_import_cycles():
    """Counting imports inside functions too: none of them closes a cycle."""
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*path[path.index(n):], n]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert "prefloop.loop.driver" in graph and graph["prefloop.online"] <= {"prefloop.errors"}


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [s for e in node.elts for s in _strings(e)]
    return []


def method_names_outside_the_table(source: str) -> list[tuple[int, str]]:
    """(line, name) of every comparison with, or dict keyed by, a pairing strategy's name."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                hits += [(node.lineno, s) for s in _strings(side) if s in STRATEGIES]
        elif isinstance(node, ast.Dict):
            hits += [(node.lineno, s) for k in node.keys if k is not None
                     for s in _strings(k) if s in STRATEGIES]
    return hits


def test_method_names_are_compared_only_in_the_method_table():
    assert method_names_outside_the_table('if strategy in ("xpo", "spin"): pass') == \
        [(1, "xpo"), (1, "spin")]  # the walker finds what it looks for
    assert method_names_outside_the_table('needs = {"sppo": 1}') == [(1, "sppo")]
    found = {}
    for path in SRC.rglob("*.py"):
        if path.name == "methods.py":
            continue
        hits = method_names_outside_the_table(path.read_text())
        if hits:
            found[str(path.relative_to(SRC))] = hits
    assert found == {}


def test_readme_artifact_table_is_the_run_directorys():
    """The README's "where each artifact lives" table lists exactly RunDir's ARTIFACTS."""
    text = README.read_text()
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \|$", text, flags=re.M)
    listed = [path for path, _ in rows if path in dict(ARTIFACTS) or path.startswith("iter_")
              or path in ("config.yaml", "manifest.json", "metrics.jsonl")]
    assert listed == [path for path, _ in ARTIFACTS]
    described = dict(rows)
    for path, what in ARTIFACTS:
        assert described[path] == what, path


def test_every_config_validates_one_way():
    """One protocol: every config section has `validate`, and building one never validates
    (PairingConfig used to raise from __post_init__, the others from validate())."""
    import dataclasses
    import importlib
    import inspect

    found = []
    for name in _modules():
        if name.endswith("__main__"):  # importing it runs the CLI
            continue
        module = importlib.import_module(name)
        for cls_name, cls in vars(module).items():
            if (inspect.isclass(cls) and dataclasses.is_dataclass(cls)
                    and cls_name.endswith("Config") and cls.__module__ == name):
                found.append(cls)
                assert callable(getattr(cls, "validate", None)), cls_name
                post = getattr(cls, "__post_init__", None)
                if post is not None:
                    calls = [n.func.attr for n in ast.walk(ast.parse(
                        inspect.getsource(post).strip())) if isinstance(n, ast.Call)
                        and isinstance(n.func, ast.Attribute)]
                    assert "validate" not in calls, f"{cls_name}.__post_init__ validates"
    assert len(found) >= 20
    from prefloop.pairing import PairingConfig

    bad = PairingConfig(strategy="nope")  # built, not validated
    with pytest.raises(ValueError, match=r"^pairing\.strategy: unknown 'nope'"):
        bad.validate()


def test_every_prefloop_name_the_scripts_import_exists():
    """scripts/, benchmarks/ and examples/ run outside the suite: a name they import from
    prefloop that moved (scripts/demo_tables.py imported `quiet_libraries` from the module it
    had left) fails here instead of in a user's hands."""
    import importlib

    root = SRC.parents[1]
    files = [p for d in ("scripts", "benchmarks", "examples") for p in (root / d).rglob("*.py")]
    assert files
    missing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.split(".")[0] == "prefloop":
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(root)}: {node.module}.{a.name}"
                            for a in node.names if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "prefloop":
                        importlib.import_module(a.name)
    assert not missing, missing
