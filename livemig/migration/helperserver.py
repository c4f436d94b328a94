"""The helper server process (livemig.migration.helper.HelperServer):
``python -m livemig.migration.helperserver <control fd> <module>...`` imports the
helper modules, then forks one helper per request of the VMM's."""

from __future__ import annotations

import logging
import socket
import sys

from livemig.kernel.mman import keep_freed_buffers
from livemig.migration.helper import serve_forks


def main(argv: list[str]) -> None:
    keep_freed_buffers()  # helpers reuse their receive buffers (inherited by the forks)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    serve_forks(socket.socket(fileno=int(argv[0])), argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
