"""The documentation: the site builds with ``mkdocs build --strict`` and its Python examples run.

Code blocks are checked the way a reader would use them, page by page in one namespace, in a
temporary working directory. Markers (an HTML comment on the line before a fenced block):

* ``<!-- no-test -->`` before a ```python block: an intentionally partial example, not run;
* ``<!-- output -->`` before a ```text block: the exact stdout of the Python block just before it;
* ``<!-- file: NAME -->`` before any block: its content is written to NAME before later blocks run.

A ``--8<-- "path"`` line inside a block (pymdownx.snippets) is replaced by that file, as the site does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLE_SRC = ROOT / "examples" / "tatok-plugin-example" / "src"
FENCE = re.compile(r"^```([\w-]*)\s*$")
MARKER = re.compile(r"^<!--\s*(no-test|output|file:\s*(\S+))\s*-->$")
SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"\s*$')


@attrs.frozen
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    marker: str | None  # "no-test", "output", "file" or None
    filename: str | None = None


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a Markdown document."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def blocks(text: str) -> list[Block]:
    """Fenced code blocks with the marker comment (if any) on the line before each."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"unclosed code block at line {start + 1}"
        marker = MARKER.match(lines[start - 1].strip()) if start else None
        kind = None if marker is None else ("file" if marker.group(2) else marker.group(1))
        found.append(Block(fence.group(1), "\n".join(body) + "\n", start + 1, kind, marker and marker.group(2)))
        i += 1
    return found


def expand_snippets(code: str) -> str:
    lines = []
    for line in code.splitlines(keepends=True):
        match = SNIPPET.match(line.strip())
        lines.append((ROOT / match.group(1)).read_text() if match else line)
    return "".join(lines)


def run_blocks(name: str, text: str) -> int:
    """Run the page's Python blocks in order in one namespace; check marked outputs. Returns blocks run."""
    page_blocks = blocks(text)
    namespace: dict[str, object] = {"__name__": f"docs:{name}"}
    ran, last_output = 0, None
    for i, block in enumerate(page_blocks):
        where = f"{name}:{block.line}"
        if block.marker == "file":
            Path(block.filename).write_text(block.code)
            continue
        if block.marker == "output":
            previous = page_blocks[i - 1] if i else None
            assert previous is not None and previous.lang == "python" and previous.marker is None, (
                f"{where}: an output block must follow a Python block that is run")
            assert last_output is not None
            assert last_output.rstrip("\n") == block.code.rstrip("\n"), (
                f"{where}: the Python block above printed\n{last_output}\nbut the page shows\n{block.code}")
            continue
        if block.lang != "python" or block.marker == "no-test":
            continue
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(expand_snippets(block.code), where, "exec"), namespace)  # noqa: S102 - our own docs
        last_output, ran = stdout.getvalue(), ran + 1
    return ran


DOC_PAGES = sorted(p.name for p in DOCS.glob("*.md"))


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A scratch working directory, with the example plugin's source importable (installed or not), and a
    process registry of its own (components a page registers do not leak into other tests)."""
    from tatok_core.contract.registry import reset_registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    previous = reset_registry()
    yield tmp_path
    reset_registry(previous)


def test_readme_python_usage_runs(in_tmp: Path) -> None:
    usage = section((ROOT / "README.md").read_text(), "Python usage")
    assert run_blocks("README.md#python-usage", usage) >= 1


@pytest.mark.parametrize("page", DOC_PAGES)
def test_doc_page_examples_run(page: str, in_tmp: Path) -> None:
    text = (DOCS / page).read_text()
    ran = run_blocks(page, text)
    if page in ("index.md", "plugins.md"):
        assert ran >= 2, f"{page} should hold runnable Python examples"
        assert "<!-- no-test -->" not in text, f"{page}: every example on this page must run"


def test_getting_started_matches_readme() -> None:
    """docs/index.md repeats the README's two set-up commands verbatim and its Python usage example."""
    readme, index = (ROOT / "README.md").read_text(), (DOCS / "index.md").read_text()
    commands = [b.code for b in blocks(section(readme, "Set-up (two commands)")) if b.lang == "bash"]
    assert len(commands) == 2
    for command in commands:
        assert f"```bash\n{command}```" in index, f"docs/index.md lacks the README command {command.strip()!r}"
    usage = [b.code for b in blocks(section(readme, "Python usage")) if b.lang == "python"]
    first = next(b.code for b in blocks(index) if b.lang == "python")
    assert usage and usage[0] == first, "docs/index.md's first Python example must be the README's"


def test_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s+- [^:\n]+: (\S+\.md)\s*$", config, flags=re.M))
    assert nav == set(DOC_PAGES)


def test_training_settings_table_matches_train_config() -> None:
    from tatok_core.workflows.training import TrainConfig

    table = section((DOCS / "training.md").read_text(), "Training settings")
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", table, flags=re.M))
    expected = {}
    for field in attrs.fields(TrainConfig):
        default = field.default
        expected[field.name] = f'"{default}"' if isinstance(default, str) else str(default).lower()
    assert rows == expected


def test_api_page_documents_every_builtin_component_module() -> None:
    import tatok_plugins
    from tatok_core.contract.registry import Provider, Registry

    registry = Registry()
    registry.register_plugin(tatok_plugins, Provider("tatok", "", "tatok_plugins"))
    documented = set(re.findall(r"^::: ([\w.]+)\s*$", (DOCS / "api.md").read_text(), flags=re.M))
    missing = {entry.cls.__module__ for entry in registry.entries()} - documented
    assert not missing, f"docs/api.md does not document {sorted(missing)}"


def test_api_page_lists_every_public_name_of_tatok_core() -> None:
    import tatok_core

    page = (DOCS / "api.md").read_text()
    missing = [name for name in tatok_core.__all__ if f"`{name}`" not in page]
    assert not missing, f"docs/api.md does not list {missing} (tatok_core.__all__)"
    unexported = [name for name in tatok_core.__all__ if not hasattr(tatok_core, name)]
    assert not unexported, f"tatok_core.__all__ names what it does not export: {unexported}"
    import types

    public = {name for name, value in vars(tatok_core).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public <= set(tatok_core.__all__), f"missing from tatok_core.__all__: {public - set(tatok_core.__all__)}"


def test_every_documented_module_exists_and_docs_name_no_missing_file() -> None:
    import importlib

    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    for module in re.findall(r"^::: ([\w.]+)\s*$", text, flags=re.M):
        importlib.import_module(module)
    for path in set(re.findall(r"\b((?:tatok_core|plugins|cli|benchmarks|tests|docs)/[\w/.-]+\.(?:py|md|toml))\b", text)):
        assert (ROOT / path).exists(), f"the docs name {path}, which the project does not contain"


DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_click")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    missing = [name for name in DOCS_TOOLS if importlib.util.find_spec(name.split(".")[0]) is None
               or importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"documentation tools not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    api = (site / "api" / "index.html").read_text()
    assert "dtf_select" in api and "PipelineSpec" in api and ":class:" not in api
    cli = (site / "cli" / "index.html").read_text()
    assert "tatok compose" in cli and "tatok train" in cli
    plugins = (site / "plugins" / "index.html").read_text()
    assert "bits_above" in plugins and "ConvEncoder" in plugins  # the example source is included
