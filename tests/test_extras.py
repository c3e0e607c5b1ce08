"""The slim install: optional packages stay optional, and a missing one names its extra."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tatok_core import MissingExtraError
from tatok_core.contract.extras import EXTRAS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
IMPORT_NAMES = {"scikit-image": "skimage", "scikit-learn": "sklearn", "matplotlib": "matplotlib",
                "huggingface_hub": "huggingface_hub"}


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]


def test_pyproject_extras_match_the_messages() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    optional = project["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        names = [requirement_name(r) for r in optional[extra]]
        assert sorted(IMPORT_NAMES[n] for n in names) == sorted(modules), extra
        assert not core & set(names), f"{extra} packages must not be core dependencies"
    assert "tatok[photos,plots]" in optional["test"]  # the README's test command and CI get the photos


def test_readme_installs_the_extras_its_commands_need() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme.split("## Set-up")[1].split("## ")[0], flags=re.S)
    assert commands == ['pip install torch==2.13.0 && pip install -e ".[photos,plots]" && tatok demo',
                        'pip install torch==2.13.0 && pip install -e ".[test]" && pytest -q']


def test_the_core_never_imports_the_optional_packages() -> None:
    code = (
        "import sys, torch\n"
        "from tatok_core import Tokenizer, create\n"
        "import tatok_core.workflows.metrics, tatok_core.workflows.data, tatok_core.workflows.rate_control, tatok_core.workflows.encoding, tatok_core.workflows.rate_distortion, tatok_core.workflows.plotting, tatok_core.workflows.panels, tatok_core.workflows.generation\n"
        "model = Tokenizer.from_pretrained('tatok-tiny')\n"
        "tokens = model.encode(torch.rand(1, 3, 16, 16))\n"
        "tatok_core.workflows.metrics.ssim(model.decode(tokens), torch.rand(1, 3, 16, 16))\n"
        "tatok_core.workflows.data.BUILTIN_PHOTOS[-1].path\n"
        "print(sorted({'skimage', 'sklearn', 'matplotlib', 'scipy', 'huggingface_hub'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_missing_photos_and_plots_name_their_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tatok_core.workflows.data import load_builtin_photo
    from tatok_core.workflows.plotting import plot_rate_distortion

    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtraError, match=r"^built-in photo 'flower' needs sklearn, which is not installed: "
                                                r"pip install 'tatok\[photos\]'$"):
        load_builtin_photo("flower")
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=r"^plotting rate-distortion needs matplotlib.*'tatok\[plots\]'$"):
        plot_rate_distortion([], tmp_path / "rd.png")
