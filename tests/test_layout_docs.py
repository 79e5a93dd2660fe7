"""README's "How the code is laid out" names every module of the package, so a newcomer finds where a
change goes."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_layout_section_lists_every_module():
    section = (ROOT / "README.md").read_text().split("## How the code is laid out")[1].split("\n## ")[0]
    modules = [path.relative_to(ROOT / "farcast_cli").as_posix() for path in (ROOT / "farcast_cli").rglob("*.py")]
    missing = [module for module in modules if not module.endswith("__init__.py") and f"`{module}`" not in section]
    assert missing == []
