"""The CLI shell: plugins listing, compose (spec output, --check) and one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tatok_cli.main import cli
from tatok_core import PipelineSpec
from tests.test_registry import CONV_ENCODER_PLUGIN


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_plugins_lists_every_builtin(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["plugins"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in ("vit", "learned", "none", "fsq", "vq", "prior", "pixel", "dtf", "all", "topk", "random", "raster"):
        assert f" {name} " in result.output
    assert "tatok" in result.output


def test_compose_writes_a_spec_that_round_trips(runner: CliRunner, tmp_path) -> None:
    out = tmp_path / "spec.toml"
    result = runner.invoke(cli, ["compose", "--encoder", "vit", "--filter", "dtf", "--quantizer", "fsq",
                                 "--set", "encoder.dim=64", "--set", "quantizer.levels=[8,5,5,5]", "-o", str(out)])
    assert result.exit_code == 0, result.output
    spec = PipelineSpec.load(out)
    assert spec.encoder.options == {"dim": 64} and spec.quantizer.options == {"levels": (8, 5, 5, 5)}
    assert "total" in result.output and "max tokens per 64×64 image: 8 global + 256 patch" in result.output


def test_compose_check_runs_a_forward(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["compose", "--encoder", "vit", "--filter", "dtf", "--quantizer", "fsq", "--check",
                                 "--set", "encoder.depth=1", "--set", "decoder.depth=1", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert "check passed" in result.output


def test_compose_prints_toml_without_output(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["compose", "--quantizer", "vq"])
    assert result.exit_code == 0
    assert '[quantizer]\nname = "vq"' in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compose", "--quantizer", "fsqq"], "error: unknown quantizer 'fsqq' (known: fsq, vq); did you mean 'fsq'?"),
        (["compose", "--set", "encoder.depht=2"], "error: encoder 'vit' has no option(s) depht"),
        (["compose", "--set", "nonsense"], "error: expected KIND.OPTION=VALUE, got 'nonsense'"),
        (["compose", "--spec", "missing.toml"], "error: spec file not found: missing.toml"),
    ],
)
def test_user_errors_are_one_line_with_nonzero_exit(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(cli, args)
    assert result.exit_code == 1
    assert result.output.strip() == message.strip() or result.output.strip().startswith(message)
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_outside_package_shows_up_and_composes(runner: CliRunner, install_plugin) -> None:
    install_plugin("tatok-conv-test", "tatok_conv_test", CONV_ENCODER_PLUGIN, version="2.0.0")
    listing = runner.invoke(cli, ["plugins"], terminal_width=250)
    assert listing.exit_code == 0, listing.output
    assert "conv-test" in listing.output and "tatok-conv-test" in listing.output and "2.0.0" in listing.output
    result = runner.invoke(cli, ["compose", "--encoder", "conv-test", "--check", "--image-size", "16"])
    assert result.exit_code == 0, result.output
    assert "check passed" in result.output


def test_help_works(runner: CliRunner) -> None:
    assert runner.invoke(cli, ["compose", "--help"]).exit_code == 0
    assert runner.invoke(cli, ["--help"]).exit_code == 0
