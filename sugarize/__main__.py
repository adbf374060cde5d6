"""python -m sugarize: the command-line tool."""

from .app.cli import main

main()
