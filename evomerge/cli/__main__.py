"""``python -m evomerge.cli``: the same as the ``evomerge`` console script."""

from evomerge.cli import main

main()
