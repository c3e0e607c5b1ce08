"""The plugin hook: the whole public surface a plugin package implements.

Built-in components and third-party packages register through exactly this hook; a package makes
itself discoverable by naming a module in the entry-point group ``tatok``::

    [project.entry-points.tatok]
    my_components = "my_package.tatok_plugin"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from tatok_core.contract.registry import Registry

PROJECT_NAME = "tatok"
ENTRY_POINT_GROUP = "tatok"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def tatok_register(registry: Registry) -> None:
    """Add components to ``registry`` with ``registry.add(kind, name, cls)``.

    ``kind`` is one of :data:`tatok_core.contract.registry.KINDS` and ``cls`` must subclass that kind's
    interface (e.g. :class:`tatok_core.contract.interfaces.Encoder`). Names are global per kind: registering
    a name another package already registered is an error naming both packages.
    """


@hookspec
def tatok_pretrained() -> dict[str, str] | None:
    """Return ``{name: directory}`` of pretrained tokenizers this package ships.

    Each directory holds ``spec.toml`` and ``model.safetensors`` as written by
    :meth:`tatok_core.pipeline.tokenizer.Tokenizer.save_pretrained`, so that
    ``Tokenizer.from_pretrained(name)`` works offline.
    """
