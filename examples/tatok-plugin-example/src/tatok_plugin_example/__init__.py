"""A worked third-party TaTok plugin: encoder ``conv`` and filter ``threshold``.

Nothing here is special to TaTok's own code: the package is found through the entry-point group
``tatok`` (see ``pyproject.toml``) and registers its components in :mod:`tatok_plugin_example.tatok_plugin`.
"""

from tatok_plugin_example.encoder import ConvEncoder
from tatok_plugin_example.filter import ThresholdFilter

__version__ = "0.1.0"
__all__ = ["ConvEncoder", "ThresholdFilter"]
