"""``python -m livemig`` is the ``livemig`` command."""

from livemig.cli import main

main()
