"""The module named in the ``tatok`` entry-point group: one hook, two components."""

from tatok_core import hookimpl

from tatok_plugin_example.encoder import ConvEncoder
from tatok_plugin_example.filter import ThresholdFilter


@hookimpl
def tatok_register(registry):
    registry.add("encoder", "conv", ConvEncoder)
    registry.add("filter", "threshold", ThresholdFilter)
