"""The ``livemig`` command (``python -m livemig`` and the installed script)."""

import os


def main() -> None:
    # NumPy's OpenBLAS would start a thread per CPU when livemig imports NumPy; livemig
    # does no linear algebra, and `livemig run` forks its helper server while it has
    # one thread (livemig.migration.helper).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from livemig.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
