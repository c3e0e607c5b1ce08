"""Shared fixtures: fake installed plugin packages (real entry points) and small images; hypothesis profiles.

Hypothesis runs **derandomised** by default (profile ``ci``): every run draws the same examples, so the
suite's duration and verdict do not depend on luck. ``HYPOTHESIS_PROFILE=explore`` searches with fresh
random examples each run, when hunting for new counterexamples.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tatok_core.contract import registry as registry_module

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Create an installed distribution (dist-info with an entry point in group ``tatok``) on sys.path.

    importlib.metadata discovers it exactly as it would a pip-installed package.
    """
    created: list[str] = []

    def install(dist_name: str, module: str, source: str, version: str = "0.1.0", ep_name: str | None = None) -> str:
        root = tmp_path / f"site-{dist_name}"
        (root / module).mkdir(parents=True)
        (root / module / "__init__.py").write_text(textwrap.dedent(source))
        info = root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[tatok]\n{ep_name or module} = {module}\n")
        monkeypatch.syspath_prepend(str(root))
        created.append(module)
        return module

    previous = registry_module.reset_registry()
    yield install
    registry_module.reset_registry(previous)
    for module in created:
        sys.modules.pop(module, None)
