"""The import rules of docs/architecture.md, read from the source with ast (imports inside functions count):
data flows one way, data -> models -> train -> eval -> report, under a thin command layer."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distpose"

# What each part of the package may import from distpose. Anything not listed is not allowed.
BASE = {"errors", "files", "keypoints", "config", "metrics_log"}
ALLOWED = {
    "errors": set(),
    "files": set(),
    "keypoints": set(),
    "config": {"errors", "files", "models.registry"},  # the backbones' names, with no torch behind them
    "metrics_log": {"files"},
    "kernels": set(),
    "data": BASE,
    "models": BASE | {"kernels"},
    "monitor": BASE,
    "recipes": BASE,
    "reaper": set(),
    "cluster": BASE | {"monitor", "reaper"},
    "eval": BASE | {"data", "models", "cluster"},
    "train": BASE | {"data", "models", "kernels", "eval", "monitor", "cluster", "recipes"},
    "pipeline": BASE | {"data", "models", "eval", "train", "cluster", "recipes"},
    "bench": BASE | {"data", "models", "kernels", "eval", "train", "cluster", "recipes"},
    "commands": BASE | {"__init__", "data", "models", "eval", "train", "pipeline", "bench", "recipes"},
    "__main__": {"commands"},
    "__init__": set(),
}
# Ray and DeepSpeed belong to the distributed layers; the model, data and kernel code runs without them.
DISTRIBUTED = {"ray", "deepspeed"}
WITHOUT_DISTRIBUTION = {"errors", "files", "keypoints", "config", "metrics_log", "kernels", "data", "models", "recipes"}


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _dynamic_import(node: ast.Call) -> str | None:
    """The module of `importlib.import_module("...")` or `__import__("...")` when named by a string literal."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module `path` imports (absolute and relative, at any depth, by statement or by importlib /
    __import__ with a literal name), with its line. `from distpose import train` imports distpose.train."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(("distpose", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            if module == "distpose":  # a name may be one of the package's modules, or a name of its __init__
                found += [(f"distpose.{alias.name}", node.lineno) for alias in node.names
                          if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file()]
        elif isinstance(node, ast.Call) and (module := _dynamic_import(node)):
            found.append((module, node.lineno))
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_backbone_registry_imports_nothing_so_the_config_loads_no_network():
    """config imports models/registry.py: anything it imported would load with every config, torch included."""
    assert {m for m, _ in imports(PACKAGE / "models" / "registry.py")} <= {"__future__", "dataclasses"}
    code = "import sys, distpose.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_part_of_the_package_has_a_rule():
    assert {part_of(p) for p in sources()} <= set(ALLOWED)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    part = part_of(path)
    wrong = []
    for module, line in imports(path):
        names = module.split(".")
        allowed = ALLOWED[part] | {part}  # a part, or one module of a part ("models.registry")
        if names[0] == "distpose" and len(names) > 1 and not {names[1], ".".join(names[1:3])} & allowed:
            wrong.append(f"{path.name}:{line} imports {module}")
        if names[0] in DISTRIBUTED and part in WITHOUT_DISTRIBUTION:
            wrong.append(f"{path.name}:{line} imports {module}")
    assert not wrong, f"{part} may import only {sorted(ALLOWED[part])}: " + "; ".join(wrong)


@pytest.mark.parametrize("source, module", [
    ("from distpose.train.driver import train", "distpose.train.driver"),
    ("from ..train import worker", "distpose.train"),
    ("from distpose import train", "distpose.train"),
    ("from .. import train", "distpose.train"),
    ("import distpose.train", "distpose.train"),
    ("importlib.import_module('distpose.train')", "distpose.train"),
    ("__import__('distpose.train.tune')", "distpose.train.tune"),
])
def test_the_rules_catch_an_import_against_the_flow(tmp_path, monkeypatch, source, module):
    """The checker itself: an eval module reaching train, in each way Python allows, is reported."""
    fake = tmp_path / "distpose"
    (fake / "eval").mkdir(parents=True)
    bad = fake / "eval" / "bad.py"
    (fake / "train").mkdir()
    bad.write_text(f"import importlib\n\n\ndef f():\n    {source}\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert module in [m for m, _ in imports(bad)]
    with pytest.raises(AssertionError, match=f"bad.py:5 imports {module}"):
        test_imports_follow_the_layers(bad)
