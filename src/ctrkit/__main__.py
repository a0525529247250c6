"""``python -m ctrkit`` runs the command line."""

from ctrkit.cli import main

main()
