"""The layering rules of the code base, checked on its source.

- ``pj_core`` has no import cycle: every module's imports of other ``pj_core`` modules
  (imports inside functions included, ``if TYPE_CHECKING:`` blocks excluded) form a graph
  without a strongly connected component of more than one module, except the ones listed in
  :data:`KNOWN_CYCLES` (each with the issue that removes it).
- ``pj_core.batch`` drives the engine through its public methods only.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "pj_core"

KNOWN_CYCLES: list[list[str]] = []
"""Cycles tolerated until the issue named beside each removes it (none today)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_files(package: Path) -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(package.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    """One import statement (or literal ``importlib.import_module`` call) of a module."""

    target: str  # the imported module path as written, e.g. "pj_core.decoding.rounds"
    names: tuple[str, ...]  # for ``from target import a, b``: ("a", "b"); else ()
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> Iterator[Import]:
    """Every import in the file, at any depth (functions, classes, try blocks...)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")
        if node.level > 1:
            base = base[: -(node.level - 1)]
        return ".".join([*base, node.module] if node.module else base)

    def visit(node: ast.AST, type_checking: bool) -> Iterator[Import]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:  # the runtime branch
                yield from visit(child, type_checking)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, (), node.lineno, type_checking)
        elif isinstance(node, ast.ImportFrom):
            names = tuple(alias.name for alias in node.names)
            yield Import(absolute(node), names, node.lineno, type_checking)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield Import(node.args[0].value, (), node.lineno, type_checking)
        for nested in ast.iter_child_nodes(node):
            yield from visit(nested, type_checking)

    yield from visit(tree, False)


def _resolve(statement: Import, modules: dict[str, Path]) -> list[str]:
    """The pj_core modules a runtime import depends on.

    ``import a.b.c`` depends on ``a.b.c`` only (not on the ``__init__`` of ``a`` or ``a.b``:
    package inits that only re-export would make spurious cycles); ``from a.b import c``
    depends on module ``a.b.c`` where that is a module, else on ``a.b`` (a name of it).
    """
    out = []
    targets = (
        [f"{statement.target}.{name}" for name in statement.names]
        if statement.names
        else [statement.target]
    )
    for target in targets:
        candidate = target
        while candidate and candidate not in modules:
            candidate = candidate.rpartition(".")[0]
        if candidate:
            out.append(candidate)
    return out


def _import_graph() -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """module -> {imported module of ours: line of the first such import}, over ``pj_core``
    and ``pj_integrations``."""
    modules = {**_module_files(CORE), **_module_files(ROOT / "pj_integrations")}
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        for statement in _imports(path, name):
            if statement.type_checking:
                continue
            for target in _resolve(statement, modules):
                if target != name:
                    graph[name].setdefault(target, statement.line)
    return graph, modules


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _a_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module (breadth-first, shortest)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node]):
                if successor not in members:
                    continue
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    return component  # unreachable for a real component


def test_the_import_graph_sees_the_imports_it_should() -> None:
    """The graph builder itself: direct, from-, function-level and TYPE_CHECKING imports."""
    graph, modules = _import_graph()
    # from pj_core.decoding.rounds import ...
    assert "pj_core.decoding.rounds" in graph["pj_core.decoding.speculative"]
    # engine.generate_batch imports pj_core.batch inside the function: an edge.
    assert "pj_core.batch" in graph["pj_core.engine"]
    # engine imports personas inside render_prompts only (and under TYPE_CHECKING): an edge.
    assert "pj_core.personas" in graph["pj_core.engine"]
    # batch names PersonaJudge under TYPE_CHECKING only: no edge back to the engine.
    statements = list(_imports(modules["pj_core.batch"], "pj_core.batch"))
    assert any(s.type_checking and s.target == "pj_core.engine" for s in statements)
    assert "pj_core.engine" not in graph["pj_core.batch"]
    # The cycle finder finds a planted cycle.
    planted = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    components = [c for c in _strongly_connected(planted) if len(c) > 1]
    assert components == [["a", "b", "c"]]
    assert _a_cycle(planted, components[0]) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_pj_core_or_pj_integrations() -> None:
    graph, modules = _import_graph()
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1 and c not in KNOWN_CYCLES]
    lines = []
    for component in cycles:
        path = _a_cycle(graph, component)
        steps = [
            f"    {a} ({modules[a].relative_to(ROOT)}:{graph[a][b]}) imports {b}"
            for a, b in itertools.pairwise(path)
        ]
        lines.append(
            f"  cycle {' -> '.join(path)} (component of {len(component)}: "
            f"{', '.join(component)}):\n" + "\n".join(steps)
        )
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_known_cycles_are_still_cycles() -> None:
    """A listed exception that no longer exists must leave the list (so it cannot hide a
    new cycle among the same modules later)."""
    graph, _ = _import_graph()
    components = [c for c in _strongly_connected(graph) if len(c) > 1]
    for known in KNOWN_CYCLES:
        assert known in components, f"{known} is no longer a cycle: remove it from KNOWN_CYCLES"


def _private_engine_uses(path: Path) -> list[str]:
    """``engine._name`` attribute uses in ``path`` (the engine is named ``engine`` there)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        f"{path.name}:{node.lineno} uses engine.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "engine"
        and node.attr.startswith("_")
    ]


def test_batch_uses_public_engine_methods_only(tmp_path: Path) -> None:
    assert _private_engine_uses(CORE / "batch.py") == []
    planted = tmp_path / "planted.py"
    planted.write_text("def f(engine):\n    return engine._tokenizer_lock\n")
    assert _private_engine_uses(planted) == ["planted.py:2 uses engine._tokenizer_lock"]


def test_the_profile_store_imports_the_persona_models_only() -> None:
    """``pj_core.personas`` is layered: the store reads and writes profiles, so it may import
    the value types and errors, but not composition, resolution or anything above them."""
    graph, _ = _import_graph()
    stores = {name for name in graph if name.startswith("pj_core.personas.store")}
    assert {"pj_core.personas.store.sqlite", "pj_core.personas.store.postgres"} <= stores
    allowed = {
        "pj_core.errors",
        "pj_core.personas.model",
        "pj_core.personas.profile",
        *stores,
    }
    for name in stores:
        assert set(graph[name]) <= allowed, (name, graph[name])
    # resolve reads saved profiles from the store: the edge that used to close a cycle.
    assert "pj_core.personas.store" in graph["pj_core.personas.resolve"]


def test_old_import_paths_are_the_moved_modules() -> None:
    """Every old module path (kept for one release) is the moved module itself, so an
    attribute patched through the old path is patched on the real one."""
    import subprocess
    import sys

    from pj_core._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
        where = ROOT / new.replace(".", "/")
        assert where.with_suffix(".py").exists() or (where / "__init__.py").exists(), new
        assert not (ROOT / (old.replace(".", "/") + ".py")).exists(), f"{old} still has a file"
    store = importlib.import_module("pj_core.store")
    assert store.ProfileStore is importlib.import_module("pj_core.personas.store").ProfileStore
    # In a fresh interpreter, with the old path imported first (as an old script does).
    code = (
        "import pj_core.kv as old, pj_core.backends.hf.kv as new; "
        "from pj_core.models import load_model; "
        "import pj_core.backends.hf.models as m; "
        "assert old is new and load_model is m.load_model; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_adapters_and_server_share_one_thread_bridge() -> None:
    """Async decoding goes through ``pj_core.threads`` only: neither adapter nor the server
    starts worker threads of its own (one bridge to fix, one behaviour on early exit)."""
    files = [*(ROOT / "pj_integrations").rglob("*.py"), *(CORE / "server").rglob("*.py")]
    starters = sorted(
        str(path.relative_to(ROOT))
        for path in [*files, CORE / "threads.py"]
        if "threading.Thread(" in path.read_text(encoding="utf-8")
    )
    assert starters == ["pj_core/threads.py"], starters


# The documented override points of LangChain's BaseChatModel (and what LlamaIndex's
# CustomLLM documents): an adapter may define these private names, nothing else inherited.
DOCUMENTED_HOOKS = {
    "_generate",
    "_agenerate",
    "_stream",
    "_astream",
    "_llm_type",
    "_identifying_params",
    "_get_ls_params",
    "_resolve_model_profile",
    # FunctionCallingLLM's one abstract method: how an integration turns tools into a chat call.
    "_prepare_chat_with_tools",
}
FRAMEWORKS = ("langchain", "langchain_core", "llama_index")


def _private_uses_of_frameworks(path: Path) -> list[str]:
    """Private framework names an adapter module imports, calls or overrides.

    - ``from <framework> import _name`` (or ``import <framework>._module``);
    - ``self._name`` / ``super()._name`` / ``cls._name`` where no class of this module
      defines ``_name`` (so it can only be inherited from the framework);
    - a method ``_name`` of a class with a framework base, where that base has ``_name`` and
      it is not one of :data:`DOCUMENTED_HOOKS` (overriding a private member).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported: dict[str, str] = {}  # local name -> module it came from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(FRAMEWORKS):
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module or ""
                if alias.name.startswith("_"):
                    found.append(f"imports {node.module}.{alias.name}")
            if any(part.startswith("_") for part in (node.module or "").split(".")):
                found.append(f"imports from private module {node.module}")
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    # Names this module defines on its classes (methods, class attributes, self._x = ...).
    ours: set[str] = set()
    for cls in classes:
        for item in ast.walk(cls):
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                ours.add(item.name)
            elif isinstance(item, ast.Assign | ast.AnnAssign):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        ours.add(target.id)
                    elif isinstance(target, ast.Attribute):
                        ours.add(target.attr)
    framework_classes = [
        cls
        for cls in classes
        if any(isinstance(b, ast.Name) and b.id in imported for b in cls.bases)
    ]
    for cls in framework_classes:
        for node in ast.walk(cls):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
                continue
            if node.attr.startswith("__") or node.attr in ours:
                continue
            owner = node.value
            is_self = isinstance(owner, ast.Name) and owner.id in {"self", "cls"}
            is_super = (
                isinstance(owner, ast.Call)
                and isinstance(owner.func, ast.Name)
                and owner.func.id == "super"
            )
            if is_self or is_super:
                found.append(f"line {node.lineno}: uses inherited private {node.attr}")
    for cls in classes:
        bases = [b.id for b in cls.bases if isinstance(b, ast.Name) and b.id in imported]
        if not bases:
            continue
        for item in cls.body:
            if not isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            name = item.name
            if not name.startswith("_") or name.startswith("__") or name in DOCUMENTED_HOOKS:
                continue
            for base in bases:
                module = __import__(imported[base], fromlist=[base])
                if hasattr(getattr(module, base), name):
                    found.append(f"{cls.name}.{name} overrides private {base}.{name}")
    return found


def test_adapters_use_only_public_framework_api() -> None:
    """No adapter calls an inherited private method of a LangChain or LlamaIndex class,
    imports a private name from them, or overrides a private member other than the
    documented hooks."""
    found = {
        str(path.relative_to(ROOT)): uses
        for path in sorted((ROOT / "pj_integrations").rglob("*.py"))
        if (uses := _private_uses_of_frameworks(path))
    }
    assert found == {}, found


def test_the_private_use_check_catches_each_kind(tmp_path: Path) -> None:
    planted = tmp_path / "adapter.py"
    planted.write_text(
        "from langchain_core.language_models import BaseChatModel\n"
        "from langchain_core.runnables.config import _set_config_context\n"
        "class Chat(BaseChatModel):\n"
        "    def _generate(self):\n"
        "        return self._convert_input(1), super()._get_invocation_params()\n"
        "    def _should_stream(self):\n"
        "        return self._mine()\n"
        "    def _mine(self):\n"
        "        return 1\n",
        encoding="utf-8",
    )
    found = _private_uses_of_frameworks(planted)
    assert any("_set_config_context" in f for f in found)
    assert any("_convert_input" in f for f in found)
    assert any("_get_invocation_params" in f for f in found)
    assert any("overrides private BaseChatModel._should_stream" in f for f in found)
    assert not any("_mine" in f or "_generate" in f for f in found)


def test_no_adapter_file_is_over_500_lines() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for path in (ROOT / "pj_integrations").rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 500} == {}


# ----------------------------------------------------------------------------- layering


def _layer_table() -> dict[str, set[str]]:
    """unit -> units it may import, read from the table in docs/architecture.md."""
    table: dict[str, set[str]] = {}
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for line in text.splitlines():
        if not line.startswith("| `pj_"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        unit = cells[0].strip("`")
        allowed = cells[-1]
        table[unit] = set() if allowed == "nothing" else set(re.findall(r"`([\w.]+)`", allowed))
    return table


def _unit_of(module: str, units: Iterable[str]) -> str | None:
    """The table row a module belongs to: the longest unit that is the module or a package
    above it."""
    matches = [u for u in units if module == u or module.startswith(u + ".")]
    return max(matches, key=len) if matches else None


def test_the_layer_table_parses() -> None:
    table = _layer_table()
    assert table["pj_core.errors"] == set()
    assert "pj_core.backends" in table["pj_core.decoding"]
    assert "pj_core.personas" not in table["pj_core.decoding"]
    for unit, allowed in table.items():
        assert allowed <= set(table), f"{unit} may import unknown units {allowed - set(table)}"


def test_every_import_follows_the_layer_table() -> None:
    """The table in docs/architecture.md is the rule: a module imports (at module level or
    inside a function; TYPE_CHECKING aside) only modules of its own unit or of a unit its
    row allows, e.g. decoding never imports personas or prompts."""
    table = _layer_table()
    graph, modules = _import_graph()
    unplaced = sorted(m for m in modules if _unit_of(m, table) is None)
    assert not unplaced, f"modules with no row in docs/architecture.md: {unplaced}"
    wrong = []
    for module, targets in graph.items():
        unit = _unit_of(module, table)
        assert unit is not None
        for target, line in targets.items():
            target_unit = _unit_of(target, table)
            if target_unit != unit and target_unit not in table[unit]:
                where = f"{modules[module].relative_to(ROOT)}:{line}"
                wrong.append(f"{where}: {unit} imports {target} ({target_unit})")
    assert not wrong, "imports the table in docs/architecture.md forbids:\n" + "\n".join(wrong)


def test_the_layer_check_catches_a_forbidden_import() -> None:
    table = _layer_table()
    assert _unit_of("pj_core.decoding.lockstep", table) == "pj_core.decoding"
    assert _unit_of("pj_core.personas.store", table) == "pj_core.personas"
    assert _unit_of("pj_core._moved", table) == "pj_core"
    # what test_every_import_follows_the_layer_table would flag
    assert "pj_core.personas" not in table["pj_core.decoding"]
    assert "pj_core.prompts" not in table["pj_core.decoding"]
    assert "pj_core.engine" not in table["pj_core.batch"]


def test_pj_core_is_framework_neutral() -> None:
    """No pj_core module imports LangChain, LlamaIndex or the adapters, even lazily."""
    found = []
    for name, path in _module_files(CORE).items():
        for statement in _imports(path, name):
            if statement.target.split(".")[0] in {
                "langchain",
                "langchain_core",
                "llama_index",
                "pj_integrations",
            }:
                found.append(f"{path.relative_to(ROOT)}:{statement.line}: {statement.target}")
    assert not found, found


def _decoding_backend_imports(files: dict[str, Path]) -> list[str]:
    """Imports in ``files`` (module name -> path) of transformers or of a backend other than
    the protocol, TYPE_CHECKING ones included (a type import still ties code to a backend)."""
    found = []
    for name, path in files.items():
        for statement in _imports(path, name):
            target = statement.target
            module = target if not statement.names else f"{target}.{statement.names[0]}"
            if target.split(".")[0] == "transformers" or (
                target.startswith("pj_core.backends")
                and not module.startswith("pj_core.backends.protocol")
                and target != "pj_core.backends.protocol"
            ):
                found.append(f"{path.name}:{statement.line}: {target}")
    return found


def test_the_decoding_imports_no_transformers_and_no_backend() -> None:
    """Issue 35: the algorithm reaches a model only through ``pj_core.backends.protocol``."""
    assert _decoding_backend_imports(_module_files(CORE / "decoding")) == []


def test_the_backend_import_check_catches_each_kind(tmp_path: Path) -> None:
    planted = tmp_path / "a.py"
    planted.write_text(
        "from typing import TYPE_CHECKING\n"
        "from pj_core.backends.protocol import Backend\n"
        "from pj_core.backends import protocol\n"
        "import transformers\n"
        "from pj_core.backends.hf.kv import BatchedContexts\n"
        "if TYPE_CHECKING:\n"
        "    from transformers import PreTrainedModel\n"
        "def f():\n"
        "    from pj_core.backends import hf\n"
    )
    assert _decoding_backend_imports({"planted.a": planted}) == [
        "a.py:4: transformers",
        "a.py:5: pj_core.backends.hf.kv",
        "a.py:7: transformers",
        "a.py:9: pj_core.backends",
    ]
