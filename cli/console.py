"""The two rich consoles every command prints to (a module of its own so commands never import ``main``)."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
