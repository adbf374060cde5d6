"""The face: the typer CLI, the file-level workflows it calls, the demo and its plots."""
