"""``python -m tatok_cli``: the ``tatok`` command without relying on PATH."""

from tatok_cli.main import cli

cli()
