"""Component registry and plugin discovery: one namespace of names per component kind.

Discovery order: the built-in plugin module ``tatok_plugins`` first, then every module named in the
entry-point group ``tatok`` (see :mod:`tatok_core.contract.hooks`). Both go through the same pluggy hook.

Environment switches (read when the default registry is first built):

* ``TATOK_DISABLE_ENTRYPOINTS=1`` skips third-party entry points (built-ins only);
  ``TATOK_DISABLE_ENTRYPOINTS=name1,name2`` skips just those entry-point names.
* ``TATOK_TRACE_HOOKS=1`` prints every hook call and result (pluggy tracing), for debugging plugins.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Iterable
from types import ModuleType
import attrs
import pluggy

from tatok_core.contract import hooks
from tatok_core.contract.errors import PluginError, UnknownComponentError
from tatok_core.contract.interfaces import INTERFACES, Component

KINDS: tuple[str, ...] = tuple(INTERFACES)
BUILTIN_MODULE = "tatok_plugins"


@attrs.frozen
class Provider:
    """The package that registered an entry."""

    package: str
    version: str
    plugin: str


@attrs.frozen
class Entry:
    kind: str
    name: str
    cls: type[Component]
    provider: Provider

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


def _distribution_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Registry:
    """Maps (kind, name) to a component class and remembers which package provided it.

    Plugins receive an instance in :func:`tatok_core.contract.hooks.tatok_register` and call :meth:`add`.
    """

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._pretrained: dict[str, tuple[str, Provider]] = {}
        self._current: Provider = Provider("<direct>", "", "<direct>")
        self.plugin_manager = pluggy.PluginManager(hooks.PROJECT_NAME)
        self.plugin_manager.add_hookspecs(hooks)

    # -- the plugin-facing API -------------------------------------------------------------
    def add(self, kind: str, name: str, cls: type[Component]) -> None:
        """Register ``cls`` as the ``kind`` component called ``name``."""
        who = f"plugin package {self._current.package!r}"
        if kind not in self._entries:
            raise PluginError(f"{who} registered {name!r} under unknown kind {kind!r}; kinds are: {', '.join(KINDS)}")
        interface = INTERFACES[kind]
        if not (isinstance(cls, type) and issubclass(cls, interface)):
            raise PluginError(
                f"{who} registered {kind} {name!r} as {cls!r}, which does not subclass "
                f"{interface.__module__}.{interface.__qualname__}"
            )
        if not name or not name.replace("-", "_").replace(".", "_").isidentifier():
            raise PluginError(f"{who} registered {kind} with invalid name {name!r} (use letters, digits, '_', '-')")
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise PluginError(
                f"duplicate {kind} {name!r}: registered by package {existing.provider.package!r} "
                f"and again by package {self._current.package!r}"
            )
        self._entries[kind][name] = Entry(kind, name, cls, self._current)

    def get(self, kind: str, name: str) -> type[Component]:
        """The class registered as ``kind`` ``name``; unknown names list the known ones."""
        return self.entry(kind, name).cls

    def entry(self, kind: str, name: str) -> Entry:
        if kind not in self._entries:
            raise UnknownComponentError("component kind", kind, KINDS)
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownComponentError(kind, name, self._entries[kind]) from None

    def names(self, kind: str) -> list[str]:
        if kind not in self._entries:
            raise UnknownComponentError("component kind", kind, KINDS)
        return sorted(self._entries[kind])

    def name_for_role(self, kind: str, role: str) -> str:
        """The registered name of the ``kind`` component playing ``role`` (its class's ``role``; the first
        name in sorted order when several do), e.g. ``name_for_role("filter", "keep-all")``."""
        names = [name for name in self.names(kind) if getattr(self._entries[kind][name].cls, "role", None) == role]
        if not names:
            roles = sorted({r for e in self._entries[kind].values() if (r := getattr(e.cls, "role", None))})
            raise UnknownComponentError(f"{kind} role", role, roles)
        return names[0]

    def entries(self) -> list[Entry]:
        return [entry for kind in KINDS for _, entry in sorted(self._entries[kind].items())]

    def pretrained(self) -> dict[str, tuple[str, Provider]]:
        """``{name: (directory, provider)}`` of every shipped pretrained tokenizer."""
        return dict(self._pretrained)

    # -- discovery ---------------------------------------------------------------------------
    def register_plugin(self, plugin: ModuleType | object, provider: Provider) -> None:
        """Register one plugin object/module and run its hooks, attributing entries to ``provider``."""
        pm = self.plugin_manager
        if pm.is_registered(plugin):
            return
        try:
            pm.register(plugin, name=provider.plugin)
        except ValueError as exc:  # pluggy: name already registered
            raise PluginError(f"plugin {provider.plugin!r} from package {provider.package!r}: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin package {provider.package!r} has an invalid hook: {exc}") from exc
        others = [p for p in pm.get_plugins() if p is not plugin]
        self._current = provider
        try:
            pm.subset_hook_caller("tatok_register", remove_plugins=others)(registry=self)
            for shipped in pm.subset_hook_caller("tatok_pretrained", remove_plugins=others)():
                for name, directory in (shipped or {}).items():
                    if name in self._pretrained:
                        raise PluginError(
                            f"duplicate pretrained tokenizer {name!r}: shipped by package "
                            f"{self._pretrained[name][1].package!r} and by {provider.package!r}"
                        )
                    self._pretrained[name] = (str(directory), provider)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin package {provider.package!r} failed while registering: {exc!r}") from exc
        finally:
            self._current = Provider("<direct>", "", "<direct>")

    def load_entry_points(self, skip: Iterable[str] = ()) -> None:
        """Import and register every module in the ``tatok`` entry-point group."""
        skip = set(skip)
        for ep in sorted(importlib.metadata.entry_points(group=hooks.ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in skip:
                continue
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else ep.value.split(":")[0]
            version = dist.version if dist is not None else "unknown"
            if self.plugin_manager.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin package {package!r} (entry point {ep.name!r} = {ep.value!r}) failed to import: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self.register_plugin(plugin, Provider(package, version, ep.name))


def build_default_registry() -> Registry:
    """Built-ins first, then installed plugin packages (honouring the environment switches)."""
    registry = Registry()
    if os.environ.get("TATOK_TRACE_HOOKS"):
        registry.plugin_manager.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        registry.plugin_manager.enable_tracing()
    import tatok_plugins

    registry.register_plugin(tatok_plugins, Provider("tatok", _distribution_version("tatok"), BUILTIN_MODULE))
    disabled = os.environ.get("TATOK_DISABLE_ENTRYPOINTS", "").strip()
    if disabled not in {"1", "true", "all"}:
        registry.load_entry_points(skip=[name.strip() for name in disabled.split(",") if name.strip()])
    return registry


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    global _default
    if _default is None:
        _default = build_default_registry()
    return _default


def reset_registry(registry: Registry | None = None) -> Registry | None:
    """Replace (or with ``None``, forget) the process-wide registry; returns the previous one.

    Tests use this to install a registry holding extra components, and to rediscover plugins.
    """
    global _default
    previous, _default = _default, registry
    return previous
