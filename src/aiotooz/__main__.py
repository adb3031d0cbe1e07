"""``python -m aiotooz``: the ``aiotooz`` command (see ``python -m aiotooz --help``)."""

from ._cli import main

if __name__ == "__main__":
    main()
