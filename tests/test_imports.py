"""Imports run one way (issue 9): every module of megatron_mgt/ and data_prep/ sits in a layer
of LAYERS and imports only from its own layer and lower ones (module-level and function-level
imports alike), and the module-level imports of the two packages form no cycle.

Layers, lowest first: config (and fileio); data, model (and stats) side by side; output (metrics, plots);
geometry (geometry, flops); engine; trainer; the tools (megatron_mgt's command-line modules and
experiments, and data_prep). So the model never imports an engine or the trainer, no engine
imports a tool, data_prep needs nothing of megatron_mgt but the shard format, and the Hugging
Face modelling file (hf_modeling, copied out by mgt-export) nothing of either package."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

# Where each module sits: a module name, or "package.*" for a package and everything under it.
# A new top-level module fails test_every_module_is_placed_in_a_layer until it is added here.
LAYERS = {
    "megatron_mgt": "config",  # the package __init__ (empty): anything may import the package
    "megatron_mgt.config": "config",
    "megatron_mgt.fileio": "config",  # the atomic text write: stdlib only, usable by every layer
    "megatron_mgt.stats": "stats",
    "megatron_mgt.data.*": "data",
    "megatron_mgt.model.*": "model",
    "megatron_mgt.metrics": "output",
    "megatron_mgt.plots": "output",
    "megatron_mgt.geometry": "geometry",
    "megatron_mgt.flops": "geometry",
    "megatron_mgt.engine.*": "engine",
    "megatron_mgt.train": "trainer",
    "megatron_mgt.checkpoint": "trainer",
    "megatron_mgt.stability": "trainer",
    "megatron_mgt.telemetry": "trainer",
    "megatron_mgt.evaluate": "tool",
    "megatron_mgt.convert": "tool",
    "megatron_mgt.plan": "tool",
    "megatron_mgt.compare": "tool",
    "megatron_mgt.job_array": "tool",
    "megatron_mgt.signal_prop": "tool",
    "megatron_mgt.export": "tool",
    "megatron_mgt.generate": "tool",
    "megatron_mgt.baselines": "tool",
    "megatron_mgt.experiments.*": "tool",
    "data_prep.*": "prep",
    "megatron_mgt.hf_modeling.*": "standalone",  # copied into exported checkpoints: torch and transformers only
}
# A module may import its own layer and every layer of lower rank; layers of equal rank do not
# import each other (data and model; stats sits beside them) unless ALSO says so.
RANK = {
    "standalone": 0,
    "config": 0,
    "data": 1,
    "model": 1,
    "stats": 1,  # pure statistics (t intervals, correlations): used by geometry and the experiments
    "output": 2,  # metrics.jsonl / wandb / progress bar and PNGs: usable by every layer above data and model
    "geometry": 3,
    "engine": 4,
    "trainer": 5,
    "tool": 6,
    "prep": 6,  # data_prep: text -> tokens on disk, a tool package of its own
}
ALSO = {"tool": {"prep"}}  # mgt-eval and the n-gram baselines read data_prep's shard statistics and WikiText words
ONLY = {  # whatever their rank, these import only the layers listed
    "prep": {"config", "data", "prep"},
    "standalone": set(),
}

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("megatron_mgt", "data_prep")


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the scanned root
    line: int
    source: str  # the importing module
    target: str  # the megatron_mgt / data_prep module it loads
    top_level: bool  # runs when `source` is imported (not inside a function or `if TYPE_CHECKING:`)

    def where(self) -> str:
        return f"{self.file}:{self.line} imports {self.target}"


def layer_of(module: str) -> str | None:
    if module in LAYERS:
        return LAYERS[module]
    packages = [key[:-2] for key in LAYERS if key.endswith(".*") and (module == key[:-2] or module.startswith(key[:-1]))]
    return LAYERS[max(packages, key=len) + ".*"] if packages else None


def discover(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the packages under `root`."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _deferred_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes that do not run at import time: function bodies, `if TYPE_CHECKING:` blocks."""
    deferred: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = [node.body] if isinstance(node, ast.Lambda) else node.body
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            inner = node.body
        else:
            continue
        for part in inner:
            deferred.update(id(n) for n in ast.walk(part))
    return deferred


def _targets(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The megatron_mgt / data_prep modules an import statement (or import_module("...") call) loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            parent = ".".join(base + ([node.module] if node.module else []))
        else:
            parent = node.module or ""
        # `from pkg import sub` loads the submodule pkg.sub; `from pkg import name` loads pkg
        names = [f"{parent}.{alias.name}" if f"{parent}.{alias.name}" in modules else parent for alias in node.names]
    elif (
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        names = [node.args[0].value]
    else:
        return []
    return list(dict.fromkeys(name for name in names if name.split(".")[0] in PACKAGES))


def scan(root: Path) -> tuple[dict[str, Path], list[Import]]:
    """Every module under `root` and every import of a megatron_mgt / data_prep module they make."""
    modules = discover(root)
    imports = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deferred = _deferred_nodes(tree)
        for node in ast.walk(tree):
            for target in _targets(node, module, path.name == "__init__.py", modules):
                imports.append(Import(str(path.relative_to(root)), node.lineno, module, target, id(node) not in deferred))
    return modules, sorted(imports, key=lambda i: (i.file, i.line, i.target))


def unplaced(modules: dict[str, Path], root: Path) -> list[str]:
    return [
        f"{path.relative_to(root)} ({module}) is in no layer: add it to LAYERS at the top of tests/test_imports.py"
        for module, path in modules.items()
        if layer_of(module) is None
    ]


def allowed(source_layer: str, target_layer: str) -> bool:
    if source_layer in ONLY:
        return target_layer in ONLY[source_layer]
    return target_layer == source_layer or RANK[target_layer] < RANK[source_layer] or target_layer in ALSO.get(source_layer, ())


def violations(modules: dict[str, Path], imports: list[Import]) -> list[str]:
    """`file:line imports module (layer A -> layer B)` for each import against the layers, and
    each import of a megatron_mgt / data_prep name that is no module."""
    out = []
    for imp in imports:
        if imp.target not in modules:
            out.append(f"{imp.where()} (no such module under {' or '.join(p + '/' for p in PACKAGES)})")
            continue
        source, target = layer_of(imp.source), layer_of(imp.target)
        if source is not None and target is not None and not allowed(source, target):
            out.append(f"{imp.where()} (layer {source} -> layer {target})")
    return out


def cycles(modules: dict[str, Path], imports: list[Import]) -> list[str]:
    """Each cycle of module-level imports found by a depth-first search, as its chain of imports.
    Importing a.b.c also runs the packages a.b and a (those that are not the importer's own)."""
    edges: dict[str, list[Import]] = {m: [] for m in modules}
    for imp in imports:
        if not imp.top_level or imp.target not in modules:
            continue
        parts = imp.target.split(".")
        for n in range(len(parts), 0, -1):
            runs = ".".join(parts[:n])
            own = imp.source == runs or imp.source.startswith(runs + ".")
            if runs in modules and not own and all(e.target != runs for e in edges[imp.source]):
                edges[imp.source].append(Import(imp.file, imp.line, imp.source, runs, True))
    found, state, stack = [], dict.fromkeys(modules, 0), []  # state 0: new, 1: on the stack, 2: done

    def visit(module: str) -> None:
        state[module] = 1
        for edge in edges[module]:
            stack.append(edge)
            if state[edge.target] == 1:
                start = next(i for i, e in enumerate(stack) if e.source == edge.target)
                found.append(" -> ".join(e.where() for e in stack[start:]))
            elif state[edge.target] == 0:
                visit(edge.target)
            stack.pop()
        state[module] = 2

    for module in modules:
        if state[module] == 0:
            visit(module)
    return found


# --- the real packages -----------------------------------------------------------------


def test_layer_table_is_consistent():
    assert set(LAYERS.values()) <= set(RANK), sorted(set(LAYERS.values()) - set(RANK))
    for table in (ALSO, ONLY):
        assert set(table) | {layer for layers in table.values() for layer in layers} <= set(RANK)


def test_every_module_is_placed_in_a_layer():
    modules, _ = scan(REPO)
    assert "megatron_mgt.train" in modules and "data_prep.cli" in modules  # the scan sees the packages
    missing = unplaced(modules, REPO)
    assert not missing, "\n".join(missing)


def test_imports_run_one_way():
    modules, imports = scan(REPO)
    assert any(i.target == "megatron_mgt.config" for i in imports) and any(not i.top_level for i in imports)
    bad = violations(modules, imports)
    assert not bad, "imports against the layers (tests/test_imports.py LAYERS):\n" + "\n".join(bad)


def test_no_import_cycle():
    modules, imports = scan(REPO)
    found = cycles(modules, imports)
    assert not found, "module-level import cycles:\n" + "\n".join(found)


# --- the checker on a made-up tree -----------------------------------------------------

FAKE = {
    "megatron_mgt/__init__.py": "",
    "megatron_mgt/config.py": "from megatron_mgt.train import train\n",
    "megatron_mgt/train.py": "from megatron_mgt import config\n",
    "megatron_mgt/newmod.py": "",
    "megatron_mgt/data/__init__.py": "",
    "megatron_mgt/data/indexed.py": "",
    "megatron_mgt/data/loader.py": "from .indexed import IndexedDataset\nfrom ..model import block\n",
    "megatron_mgt/model/__init__.py": "",
    "megatron_mgt/model/block.py": "import torch\n\n\ndef f():\n    from megatron_mgt.engine import base\n",
    "megatron_mgt/engine/__init__.py": "",
    "megatron_mgt/engine/base.py": "import importlib\n\nTOOL = importlib.import_module('megatron_mgt.evaluate')\n",
    "megatron_mgt/evaluate.py": "from data_prep import wikitext\nimport megatron_mgt.nothere\nfrom megatron_mgt.engine import build_engine\n",
    "data_prep/__init__.py": "",
    "data_prep/wikitext.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from megatron_mgt.model.block import f\n",
}


def test_checker_finds_each_kind_of_fault(tmp_path):
    for name, text in FAKE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, imports = scan(tmp_path)
    assert unplaced(modules, tmp_path) == [
        "megatron_mgt/newmod.py (megatron_mgt.newmod) is in no layer: add it to LAYERS at the top of tests/test_imports.py"
    ]
    assert violations(modules, imports) == [
        "data_prep/wikitext.py:4 imports megatron_mgt.model.block (layer prep -> layer model)",
        "megatron_mgt/config.py:1 imports megatron_mgt.train (layer config -> layer trainer)",
        "megatron_mgt/data/loader.py:2 imports megatron_mgt.model.block (layer data -> layer model)",
        "megatron_mgt/engine/base.py:3 imports megatron_mgt.evaluate (layer engine -> layer tool)",
        "megatron_mgt/evaluate.py:2 imports megatron_mgt.nothere (no such module under megatron_mgt/ or data_prep/)",
        "megatron_mgt/model/block.py:5 imports megatron_mgt.engine.base (layer model -> layer engine)",
    ]
    # function-level and TYPE_CHECKING imports count for the layers, not for cycles:
    # block -> engine.base -> evaluate -> engine (package) is no cycle, config <-> train is one
    assert cycles(modules, imports) == [
        "megatron_mgt/config.py:1 imports megatron_mgt.train -> megatron_mgt/train.py:1 imports megatron_mgt.config"
    ]
