"""The package layout stays what docs/architecture.md says: no private name crosses a module boundary,
each room imports only the rooms the map allows, every sub-package is installed, the CLI runs as a module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Import name → folder, as pyproject.toml maps them.
PACKAGES = {"tatok_core": ROOT / "tatok_core", "tatok_plugins": ROOT / "plugins", "tatok_cli": ROOT / "cli",
            "benchmarks": ROOT / "benchmarks", "tests": ROOT / "tests"}
SCANNED = [ROOT / d for d in ("tatok_core", "plugins", "cli", "benchmarks", "tests")] + [ROOT / "examples"]


def python_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in d.rglob("*.py") if ".venv" not in p.parts and "pretrained" not in p.parts)


def module_file(name: str) -> Path | None:
    """The source file of a project module name (``tatok_core.io.tokenfile``), None for anything else."""
    head, _, rest = name.partition(".")
    if head not in PACKAGES:
        return None
    base = PACKAGES[head].joinpath(*rest.split(".")) if rest else PACKAGES[head]
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    for name, folder in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join((name, *[p for p in parts if p != "__init__"]))
    return path.stem


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path) -> list[str]:
    """Every private name of another project module that ``path`` imports or reads."""
    tree = ast.parse(path.read_text(), str(path))
    own = module_name(path)
    modules: dict[str, str] = {}  # local name bound to a project module → that module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if module_file(full) is not None:  # `from pkg import module`
                    modules[alias.asname or alias.name] = full
                elif module_file(node.module) is not None and is_private(alias.name) and node.module != own:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {node.module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if module_file(alias.name) is not None and alias.asname:
                    modules[alias.asname] = alias.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # monkeypatch.setattr("pkg.mod._name")
            for match in re.finditer(r"\b((?:tatok_core|tatok_plugins|tatok_cli)(?:\.\w+)+)\.(_\w+)\b", node.value):
                if module_file(match.group(1)) is not None and is_private(match.group(2)) and match.group(1) != own:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} names {match.group(1)}.{match.group(2)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            value = node.value
            dotted = []
            while isinstance(value, ast.Attribute):
                dotted.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name):
                base = modules.get(value.id) or (value.id if value.id in PACKAGES else None)
                target = ".".join([base, *reversed(dotted)]) if base else None
                if target and module_file(target) is not None and target != own:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {target}.{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("setattr", "getattr")
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in modules
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and is_private(node.args[1].value) and modules[node.args[0].id] != own):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} patches {modules[node.args[0].id]}.{node.args[1].value}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    found = [use for path in python_files() if path != Path(__file__).resolve() for use in private_uses(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_private_name_scan_catches_each_form() -> None:
    probe = ROOT / "tests" / "_layout_probe.py"  # scanned as a module of the project, then removed
    probe.write_text(
        "from tatok_core.contract.spec import _construct\n"
        "import tatok_core.ops.dtf.triton_kernel as kernel\n"
        "from tatok_core.io import tokenfile\n"
        "kernel._launch\n"
        "tokenfile._Shard\n"
        "def f(monkeypatch):\n"
        "    monkeypatch.setattr(tokenfile, '_fsync_dir', None)\n"
        "    monkeypatch.setattr('tatok_core.io.tokenfile._fsync_dir', None)\n"
    )
    try:
        found = private_uses(probe)
    finally:
        probe.unlink()
    assert [f.split(" ", 1)[1] for f in found] == [
        "imports _construct from tatok_core.contract.spec",
        "names tatok_core.io.tokenfile._fsync_dir",
        "reads tatok_core.ops.dtf.triton_kernel._launch",
        "reads tatok_core.io.tokenfile._Shard",
        "patches tatok_core.io.tokenfile._fsync_dir",
    ]


#: What each room of tatok_core may import (docs/architecture.md, "Package map"). Workflows may import all.
ALLOWED = {
    "contract": {"contract"},
    "ops": {"contract", "ops"},
    "io": {"contract", "io"},
    "pipeline": {"contract", "ops", "io", "pipeline"},
    "workflows": {"contract", "ops", "io", "pipeline", "workflows"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                                                    if module_file(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def test_each_room_imports_only_what_the_package_map_allows() -> None:
    bad = []
    for room, allowed in ALLOWED.items():
        for path in sorted((ROOT / "tatok_core" / room).rglob("*.py")):
            for line, name in imported_modules(path):
                parts = name.split(".")
                if name == "tatok_plugins" and path == ROOT / "tatok_core/contract/registry.py":
                    continue  # the registry loads the built-in components through the same hook as any plugin
                if parts[0] in ("tatok_plugins", "tatok_cli", "benchmarks", "tests"):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
                elif parts[0] == "tatok_core" and len(parts) > 1 and parts[1] in ALLOWED and parts[1] not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    for path in sorted((ROOT / "plugins").rglob("*.py")):  # components build on the contract and the operations
        for line, name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "tatok_cli" or (parts[0] == "tatok_core" and len(parts) > 1 and parts[1] in ("workflows", "pipeline")):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "imports the package map forbids:\n" + "\n".join(bad)


def test_pyproject_installs_every_sub_package() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(tatok_core(?:\.\w+)*)"', text.split("packages =", 1)[1].split("]", 1)[0]))
    on_disk = {module_name(init.parent / "__init__.py") for init in (ROOT / "tatok_core").rglob("__init__.py")}
    assert on_disk == listed, f"pyproject.toml [tool.setuptools] packages: missing {on_disk - listed}, stale {listed - on_disk}"


def test_the_cli_runs_as_a_module() -> None:
    # both `python -m` forms, as python -m runs them, in ONE fresh interpreter (a circular import shows here)
    code = (
        "import runpy, sys\n"
        "sys.argv = ['tatok', '--help']\n"
        "for module in ('tatok_cli.main', 'tatok_cli'):\n"
        "    try:\n"
        "        runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), (module, exc.code)\n"
        "    print('ran', module)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("encode") >= 2 and "ran tatok_cli.main" in result.stdout and "ran tatok_cli\n" in result.stdout


def test_no_test_runs_a_tatok_executable_from_path() -> None:
    pattern = re.compile(r"""shutil\.which\(\s*["']tatok|\[\s*["']tatok["']""")
    found = [f"{p.relative_to(ROOT)}" for p in python_files()
             if p != Path(__file__).resolve() and pattern.search(p.read_text())]
    assert not found, f"run the CLI as [sys.executable, '-m', 'tatok_cli', ...] instead: {found}"
