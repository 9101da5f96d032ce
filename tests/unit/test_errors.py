"""One error tree: every exception class of the package joins ReactorError, and the public ones are
drawn in reactor/core/errors.py."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import reactor
from reactor.core import errors
from reactor.core.errors import ReactorError


def exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(reactor.__path__, "reactor."):
        if info.name.endswith("__main__"):
            continue  # running it runs the command line
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name:
                found[f"{info.name}.{name}"] = value
    return found


def test_every_exception_class_of_the_package_joins_the_tree() -> None:
    found = exception_classes()
    assert len(found) >= 20, sorted(found)
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, ReactorError))
    assert not outside, f"not under ReactorError: {outside}"


def test_the_public_ones_are_drawn_in_errors_py() -> None:
    tree = errors.__doc__ or ""
    public = sorted({cls.__name__ for cls in exception_classes().values() if not cls.__name__.startswith("_")})
    missing = [name for name in public if f" {name} " not in tree and f" {name}\n" not in tree]
    assert not missing, f"add them to the tree in reactor/core/errors.py: {missing}"
