"""The ``reactor`` command line: argument parsing, settings built once, output helpers."""

from __future__ import annotations

from reactor.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
