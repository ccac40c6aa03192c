"""The house's two floors: utils/ is the library the stages import, tools/ the programs run as `python -m tools.NAME`.
README's layout section says so; these tests keep the folders saying the same."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_a_program():
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path)
                                                      if name == "tools" or name.startswith("tools."))
                 for path in (ROOT / "utils").rglob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_every_program_runs_as_a_module_and_says_how():
    programs = sorted(p for p in (ROOT / "tools").glob("*.py") if p.name != "__init__.py")
    assert programs
    for path in programs:
        source = path.read_text()
        assert 'if __name__ == "__main__":' in source, path.name
        assert f"python -m tools.{path.stem}" in (ast.get_docstring(ast.parse(source)) or ""), path.name


def test_readme_layout_names_every_module_where_it_lives():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    for folder in ("utils", "tools"):
        for path in (ROOT / folder).glob("*.py"):
            if path.name != "__init__.py":
                assert re.search(rf"\b{re.escape(path.name)}\b", layout), f"{folder}/{path.name} missing from README"


def test_readme_layout_names_no_module_that_is_not_there():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Where to change what")]
    folder = None
    for line in layout.splitlines():
        if re.match(r"(utils|tools)/ ", line):
            folder = line.split("/")[0]
        elif not line.startswith("  "):
            folder = None
        named = re.match(r"  (\w+\.(?:py|html|jinja))\b", line)
        if folder and named:
            assert (ROOT / folder / named.group(1)).is_file(), f"README names {folder}/{named.group(1)}"
