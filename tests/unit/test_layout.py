"""The package boundaries the README's layout table states, checked on the source: a stage imports only what it
may, so the layers stay apart as the code grows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imports(package: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        out[path.name] = names
    return out


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("dicom_node/series", {"dicom_node.settings", "dicom_node.types", "dicom_node.errors", "dicom_node.series"}),
        ("inference", {"inference"}),
    ],
)
def test_a_package_imports_only_what_it_may(package: str, allowed: set[str]) -> None:
    own = {"dicom_node", "inference"}
    for module, names in _imports(REPO / package).items():
        for name in names:
            if name.split(".")[0] not in own:
                continue
            assert any(name == a or name.startswith(a + ".") for a in allowed), f"{package}/{module} imports {name}"


def test_no_module_loads_another_through_importlib() -> None:
    for path in (REPO / "dicom_node").rglob("*.py"):
        assert "importlib" not in path.read_text(encoding="utf-8"), path


def test_every_stage_package_states_its_public_names() -> None:
    for package in ("receive", "series", "export"):
        init = REPO / "dicom_node" / package / "__init__.py"
        tree = ast.parse(init.read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
                   for n in tree.body), init  # fmt: skip
