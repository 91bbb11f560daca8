"""The package's shape: imports point one way, entry points are siblings, files stay small."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "src" / "sclip_lab"
# Entry points (`python -m sclip_lab.<name>`): none may import another. `prepare` is also a
# library room (run checks a benchmark with it); its command line is its own module.
ENTRY_POINTS = {"sclip_lab.run", "sclip_lab.predict", "sclip_lab.learn", "sclip_lab.visualize",
                "sclip_lab.sync", "sclip_lab.prepare.__main__", "sclip_lab.prepare.cli",
                "sclip_lab.trunk_cache.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the sclip_lab modules it imports (at module level or inside functions)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: inside a package
                base = name.rsplit(".", node.level - (path.name == "__init__.py"))[0]
                mod = f"{base}.{node.module}" if node.module else base
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_entry_points_do_not_import_each_other():
    for module, deps in import_graph().items():
        imported = {d for d in deps if d in ENTRY_POINTS} - {module}
        if module.startswith("sclip_lab.prepare"):  # its own __main__ may use its cli
            imported -= {"sclip_lab.prepare.cli"}
        assert not imported, f"{module} imports the entry point(s) {sorted(imported)}"


def test_files_stay_small():
    """One thing per file: nothing in the package or the analysis scripts over 400 lines."""
    files = list(PKG.rglob("*.py")) + list((REPO / "analysis").rglob("*.py"))
    big = {str(p.relative_to(REPO)): n for p in files
           if (n := len(p.read_text().splitlines())) > 400}
    assert not big, big


def test_no_protocol_citation_points_outside_the_repository():
    """Code cites docs/protocol.md sections, and those sections exist."""
    import re

    headings = set(re.findall(r"^#+\s*§?(\d+(?:\.\d+)?)\b", (REPO / "docs/protocol.md")
                              .read_text(), flags=re.M))
    for path in [*PKG.rglob("*.py"), *(REPO / "analysis").rglob("*.py"), REPO / "README.md"]:
        text = path.read_text()
        assert "PROTOCOL.md" not in text and "/work/shared" not in text, path
        for section in re.findall(r"docs/protocol\.md §(\d+(?:\.\d+)?)", text):
            assert section in headings or section.split(".")[0] in headings, (path, section)


def documented_rules() -> dict[str, set[str] | None]:
    """docs/architecture.md's import table: room -> the rooms it may import (None: any room
    but an entry point)."""
    import re

    text = (REPO / "docs" / "architecture.md").read_text()
    table = text.split("| room | imports from the package |", 1)[1].split("\n\n", 1)[0]
    rules: dict[str, set[str] | None] = {}
    for line in table.splitlines()[2:]:
        rooms_cell, allowed_cell = (c.strip() for c in line.strip("|").split("|"))
        allowed = None if "any room" in allowed_cell else set(
            re.findall(r"`([\w.]+)`", allowed_cell))
        for room in re.findall(r"`([\w.]+)`", rooms_cell):
            rules[room] = allowed
    return rules


def _room(module: str) -> str:
    """``sclip_lab.trunk_cache.entry`` -> ``trunk_cache``; the package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_follow_the_documented_rules():
    rules = documented_rules()
    graph = import_graph()
    rooms = {_room(m) for m in graph} - {""}
    assert rooms <= set(rules), f"rooms without a row in docs/architecture.md: " \
                                f"{sorted(rooms - set(rules))}"
    assert set(rules) <= rooms, f"rows for rooms that do not exist: {sorted(set(rules) - rooms)}"
    entry_rooms = {_room(m) for m in ENTRY_POINTS} - {"prepare", "trunk_cache"}
    broken = []
    for module, deps in graph.items():
        room = _room(module)
        if not room:
            continue
        used = {_room(d) for d in deps} - {room, ""}
        allowed = rules[room]
        extra = used & entry_rooms if allowed is None else used - allowed
        broken += [f"{module} imports {r}" for r in sorted(extra)]
    assert not broken, "imports the table does not allow: " + "; ".join(broken)


def test_the_rule_table_is_read():
    """The parser sees the table (a test that cannot fail is a defect)."""
    rules = documented_rules()
    assert rules["errors"] == set() and rules["slurm"] == {"cli"} and rules["run"] is None
    assert len(rules) > 30
