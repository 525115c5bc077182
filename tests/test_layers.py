"""The layers go one way (GSM core <- membership <- components <- tools <- webcache): the
import-linter contracts of pyproject.toml hold, and they do fail when an import goes upward."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mcs
from conftest import REPO

LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("mcs", "membership", "webcache")


def _lint(where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache"], cwd=where, capture_output=True, text=True,
                          timeout=120)


def _copy_tree(dst: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("*.so", "*.c"))


@pytest.fixture(scope="module")
def lint_available() -> None:
    if not LINT.exists():
        pytest.skip(f"lint-imports not installed next to {sys.executable}")


def test_contracts_hold(lint_available: None) -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module,line", [
    ("membership/view.py", "import mcs.component\n"),  # membership above the component layer
    ("mcs/section.py", "from membership import view as _upward\n"),  # core above membership
    ("mcs/component.py", "import webcache.cache\n"),  # the component layer above webcache
])
@pytest.mark.slow
def test_an_upward_import_breaks_the_build(lint_available: None, tmp_path: Path, module: str,
                                           line: str) -> None:
    _copy_tree(tmp_path)
    assert _lint(tmp_path).returncode == 0  # the copy itself is clean
    target = tmp_path / module
    target.write_text(target.read_text() + line)
    result = _lint(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module an import statement in ``path`` names, with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.module, node.lineno)]
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


def test_webcache_uses_only_the_public_api_of_the_core() -> None:
    """import-linter cannot see the native ``mcs._gsm``: this check can."""
    bad = [f"{p.relative_to(REPO)}:{line}" for p in sorted((REPO / "webcache").glob("*.py"))
           for name, line in _imports(p) if name == "mcs._gsm" or name.startswith("mcs._gsm.")]
    assert not bad, f"webcache imports the private native core: {bad}"


def test_component_api_is_exported_lazily() -> None:
    code = ("import sys, mcs; assert 'mcs.component' not in sys.modules; "
            "assert 'membership' not in sys.modules; "
            "from mcs import McsComponent, transaction, RecoveryStats; "
            "import mcs.component as c; assert McsComponent is c.McsComponent; "
            "assert transaction is c.transaction; print('ok')")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         cwd="/", timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
    assert {"McsComponent", "transaction", "Recovering"} <= set(mcs.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        getattr(mcs, "nope")
