"""Usage examples that must type-check under ``mypy --strict`` (``nox -s typecheck``).

They are never run: the files are named ``check_*.py`` so that pytest does not collect
them. A ``# type: ignore[code]`` marks a line that must be an error: with
``warn_unused_ignores`` (part of ``strict``), mypy fails if the error goes away.
"""
