"""Optional dependencies, grouped as the package's extras, imported only where a feature needs them.

The core library needs torch and a few small packages; the built-in photos (scikit-image's and
scikit-learn's sample images), plotting (matplotlib) and the Hugging Face Hub (huggingface_hub) are
extras, so a research environment does not pull them in. A missing one fails with one line naming the
extra: ``pip install 'tatok[plots]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: extra → the importable packages it installs (must match ``[project.optional-dependencies]``)
EXTRAS: dict[str, tuple[str, ...]] = {
    "photos": ("skimage", "sklearn"),
    "plots": ("matplotlib",),
    "hub": ("huggingface_hub",),
}


def _extra_of(module: str) -> str:
    top = module.partition(".")[0]
    return next(extra for extra, packages in EXTRAS.items() if top in packages)


def missing_extra_message(module: str, purpose: str) -> str:
    """``"plots need matplotlib: pip install 'tatok[plots]'"``-style one line for ``module``."""
    extra = _extra_of(module)
    return f"{purpose} needs {module.partition('.')[0]}, which is not installed: pip install 'tatok[{extra}]'"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (of one of :data:`EXTRAS`) or raise :class:`MissingExtraError` naming the extra."""
    from tatok_core.contract.errors import MissingExtraError

    try:
        return importlib.import_module(module)
    except ImportError:
        if _installed(module.partition(".")[0]):
            raise  # installed but broken: the real error is more useful than advice to install it
        raise MissingExtraError(missing_extra_message(module, purpose)) from None


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # e.g. sys.modules[package] is None: blocked, so not usable
        return False
