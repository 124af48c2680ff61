"""The import rules of docs/architecture.md, read from the source with ast (imports inside functions count):
data flows one way, data -> models -> train -> eval -> report, under a thin command layer."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distpose"

# What each part of the package may import from distpose. Anything not listed is not allowed.
BASE = {"errors", "files", "keypoints", "config"}
ALLOWED = {
    "errors": set(),
    "files": set(),
    "keypoints": set(),
    "config": {"errors", "files"},
    "kernels": set(),
    "data": BASE,
    "models": BASE | {"kernels"},
    "monitor": BASE,
    "modes": BASE,
    "cluster": BASE | {"monitor"},
    "eval": BASE | {"data", "models", "cluster"},
    "train": BASE | {"data", "models", "kernels", "eval", "monitor", "cluster", "modes"},
    "pipeline": BASE | {"data", "models", "eval", "train", "cluster", "modes"},
    "bench": BASE | {"data", "models", "kernels", "eval", "train", "cluster", "modes"},
    "commands": BASE | {"__init__", "data", "models", "eval", "train", "pipeline", "bench", "modes"},
    "__main__": {"commands"},
    "__init__": set(),
}
# Ray and DeepSpeed belong to the distributed layers; the model, data and kernel code runs without them.
DISTRIBUTED = {"ray", "deepspeed"}
WITHOUT_DISTRIBUTION = {"errors", "files", "keypoints", "config", "kernels", "data", "models", "modes"}


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module `path` imports (absolute and relative, at any depth), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(("distpose", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.append((f"{base}.{node.module}" if node.module else base, node.lineno))
            else:
                found.append((node.module or "", node.lineno))
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_a_rule():
    assert {part_of(p) for p in sources()} <= set(ALLOWED)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    part = part_of(path)
    wrong = []
    for module, line in imports(path):
        names = module.split(".")
        if names[0] == "distpose" and len(names) > 1 and names[1] != part and names[1] not in ALLOWED[part]:
            wrong.append(f"{path.name}:{line} imports {module}")
        if names[0] in DISTRIBUTED and part in WITHOUT_DISTRIBUTION:
            wrong.append(f"{path.name}:{line} imports {module}")
    assert not wrong, f"{part} may import only {sorted(ALLOWED[part])}: " + "; ".join(wrong)


def test_the_rules_catch_an_import_against_the_flow(tmp_path, monkeypatch):
    """The checker itself: an eval module importing train is reported."""
    fake = tmp_path / "distpose"
    (fake / "eval").mkdir(parents=True)
    bad = fake / "eval" / "bad.py"
    bad.write_text("def f():\n    from distpose.train.driver import train\n    from ..train import worker\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert [m for m, _ in imports(bad)] == ["distpose.train.driver", "distpose.train"]
    with pytest.raises(AssertionError, match="bad.py:2 imports distpose.train.driver"):
        test_imports_follow_the_layers(bad)
