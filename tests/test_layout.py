"""The layout shows the three programs: the gateway, the viewer and the
example backend import only the shared ``latency_common`` package and their
own modules, never each other; ``latency_common`` imports none of them. And
no file of the repository cites a document that is not in it."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from tests.servers import ROOT

PROGRAMS = ("gateway", "viewer", "backend", "latency_common")


def _first_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PROGRAMS)


@pytest.mark.parametrize("package", PROGRAMS)
def test_each_program_imports_only_itself_and_the_shared_package(package: str) -> None:
    allowed = {package} if package == "latency_common" else {package, "latency_common"}
    offenders = {
        str(path.relative_to(ROOT)): sorted(_first_party_imports(path) - allowed)
        for path in sorted((ROOT / package).rglob("*.py"))
        if _first_party_imports(path) - allowed
    }
    assert offenders == {}


def test_no_file_cites_a_document_outside_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    # The design and style documents the project grew from live outside the
    # repository; built from parts so that this file does not cite them.
    design, style = "DE" + "SIGN", "ST" + "YLE"
    outside = ("../" + "shared", f"shared/{design}", f"{design}.md", f"{design} §", f"{style}.md")
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {
            ".py",
            ".md",
            ".js",
            ".mjs",
            ".ts",
            ".yml",
            ".yaml",
            ".toml",
            ".txt",
            ".cfg",
            ".json",
            ".conf",
            ".html",
            "",
        }:
            continue
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{name}: {needle}" for needle in outside if needle in text]
    assert offenders == []
