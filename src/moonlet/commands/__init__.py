"""CLI commands, one module each (see moonlet.cli)."""
