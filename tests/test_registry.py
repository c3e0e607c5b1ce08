"""Registry behaviour and plugin discovery through real entry points."""

from __future__ import annotations

import pytest

from tatok_core import Encoder, PipelineSpec, hookimpl
from tatok_core.contract.errors import PluginError, UnknownComponentError
from tatok_core.contract.registry import KINDS, Provider, Registry, build_default_registry, get_registry
from tatok_core.pipeline.tokenizer import Tokenizer

CONV_ENCODER_PLUGIN = """
    import torch
    from tatok_core import Encoder, hookimpl

    class ConvEncoder(Encoder):
        '''A strided convolution as encoder (test plugin).'''
        def __init__(self, facts, *, dim: int = 32, patch_size: int = 4):
            super().__init__(facts)
            self.dim, self.patch_size, self.channels = dim, patch_size, 3
            self.conv = torch.nn.Conv2d(3, dim, patch_size, patch_size)
        def forward(self, images):
            return self.conv(images).flatten(2).transpose(1, 2)

    @hookimpl
    def tatok_register(registry):
        registry.add("encoder", "conv-test", ConvEncoder)
"""


def test_builtins_register_every_kind() -> None:
    registry = get_registry()
    for kind in KINDS:
        assert registry.names(kind), f"no built-in {kind}"
    assert set(registry.names("filter")) >= {"dtf", "all", "topk", "random", "raster"}
    assert registry.entry("encoder", "vit").provider.package == "tatok"


def test_unknown_name_lists_known_and_closest() -> None:
    with pytest.raises(UnknownComponentError) as info:
        get_registry().get("quantizer", "fsqq")
    message = str(info.value)
    assert "unknown quantizer 'fsqq'" in message
    assert "fsq, vq" in message
    assert "did you mean 'fsq'?" in message


def test_unknown_kind() -> None:
    with pytest.raises(UnknownComponentError, match="component kind"):
        get_registry().names("tokenizer")


def test_entry_point_plugin_is_discovered_with_its_package(install_plugin) -> None:
    install_plugin("tatok-conv-test", "tatok_conv_test", CONV_ENCODER_PLUGIN, version="1.2.3")
    registry = build_default_registry()
    entry = registry.entry("encoder", "conv-test")
    assert entry.provider == Provider("tatok-conv-test", "1.2.3", "tatok_conv_test")
    assert entry.summary == "A strided convolution as encoder (test plugin)."
    # and it composes by name with the built-ins
    spec = PipelineSpec.compose(encoder="conv-test", options={"encoder.dim": 32}, registry=registry)
    model = Tokenizer(spec, registry)
    assert model.encoder.dim == 32


def test_env_switch_disables_entry_points(install_plugin, monkeypatch) -> None:
    install_plugin("tatok-conv-test", "tatok_conv_test", CONV_ENCODER_PLUGIN)
    monkeypatch.setenv("TATOK_DISABLE_ENTRYPOINTS", "tatok_conv_test")
    assert "conv-test" not in build_default_registry().names("encoder")


def test_plugin_that_fails_to_import_is_named(install_plugin) -> None:
    install_plugin("tatok-broken", "tatok_broken", "raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match=r"plugin package 'tatok-broken' .*failed to import: RuntimeError: boom"):
        build_default_registry()


def test_duplicate_name_names_both_packages(install_plugin) -> None:
    install_plugin("tatok-dup", "tatok_dup", CONV_ENCODER_PLUGIN.replace('"conv-test"', '"vit"'))
    with pytest.raises(PluginError, match=r"duplicate encoder 'vit': registered by package 'tatok' and again by package 'tatok-dup'"):
        build_default_registry()


def test_wrong_kind_class_is_rejected(install_plugin) -> None:
    source = CONV_ENCODER_PLUGIN.replace('registry.add("encoder"', 'registry.add("decoder"')
    install_plugin("tatok-wrong", "tatok_wrong", source)
    with pytest.raises(PluginError, match=r"plugin package 'tatok-wrong' registered decoder 'conv-test' .* does not subclass tatok_core.contract.interfaces.Decoder"):
        build_default_registry()


def test_unknown_kind_from_plugin() -> None:
    class Plugin:
        @hookimpl
        def tatok_register(self, registry: Registry) -> None:
            registry.add("tokenizer", "x", Encoder)

    with pytest.raises(PluginError, match="unknown kind 'tokenizer'"):
        Registry().register_plugin(Plugin(), Provider("pkg-x", "0", "x"))


def test_direct_registration_records_provider() -> None:
    class Plugin:
        @hookimpl
        def tatok_register(self, registry: Registry) -> None:
            from tatok_plugins.vit import ViTEncoder

            registry.add("encoder", "vit2", ViTEncoder)

    registry = Registry()
    registry.register_plugin(Plugin(), Provider("research-code", "0.0.1", "mine"))
    assert registry.names("encoder") == ["vit2"]
    assert registry.entry("encoder", "vit2").provider.package == "research-code"


def test_workflows_find_baselines_by_role_not_by_name() -> None:
    import tatok_plugins
    from tatok_core import FILTER_ROLES
    from tatok_plugins.filters import KeepAll

    registry = Registry()
    registry.register_plugin(tatok_plugins, Provider("tatok", "", "tatok_plugins"))
    assert {role: registry.name_for_role("filter", role) for role in FILTER_ROLES} == {
        "entropy-rules": "dtf", "keep-all": "all", "top-k": "topk", "random-k": "random", "raster-k": "raster"}

    class EveryToken(KeepAll):
        """A third-party keep-all baseline under another name."""

    registry.add("filter", "a-every-token", EveryToken)  # sorts before "all": the role decides, not the name
    assert registry.name_for_role("filter", "keep-all") == "a-every-token"
    with pytest.raises(UnknownComponentError, match=r"unknown filter role 'keep-al' .*did you mean 'keep-all'"):
        registry.name_for_role("filter", "keep-al")
