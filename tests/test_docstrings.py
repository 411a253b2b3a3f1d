"""Every public name is documented, so the API reference (mkdocstrings) has no blank entries.

The public names are those in ``llamatelemetry_async.__all__`` and in the ``__all__`` of every
public subpackage (found by walking the package, so a new subpackage is checked too).

- Classes and functions carry their own non-empty docstring (a dataclass's generated
  ``Name(field: type, ...)`` text does not count, nor one inherited from a base class).
- Constants and type aliases cannot carry a docstring at run time: each is named, as
  ````NAME````, in the docstring of a package whose ``__all__`` exports it.
- Public methods, properties, classmethods and staticmethods that a public class defines
  itself (not inherited from the standard library or a dependency) have docstrings.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import pkgutil
import types
from collections.abc import Iterator

import pytest

import llamatelemetry_async

PACKAGE = llamatelemetry_async.__name__
# Names that follow a language-wide convention and need no prose.
CONVENTIONAL = frozenset({"__version__"})


def public_packages() -> list[types.ModuleType]:
    """The top-level package and every public subpackage (no ``_`` in its dotted path)."""
    found = [llamatelemetry_async]
    for info in pkgutil.walk_packages(llamatelemetry_async.__path__, prefix=PACKAGE + "."):
        parts = info.name.split(".")
        if info.ispkg and not any(part.startswith("_") for part in parts):
            found.append(importlib.import_module(info.name))
    return found


PACKAGES = public_packages()


def exported() -> Iterator[tuple[types.ModuleType, str, object]]:
    for package in PACKAGES:
        for name in getattr(package, "__all__", ()):
            yield package, name, getattr(package, name)


def is_documentable(obj: object) -> bool:
    """Classes and functions carry docstrings; everything else is a constant or an alias."""
    return inspect.isclass(obj) or inspect.isroutine(obj)


def own_docstring(obj: object) -> str:
    """The docstring ``obj`` was written with, not one Python made up or inherited."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        if not isinstance(doc, str):
            return ""
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return ""  # dataclasses write "Name(field: type, ...)" when none was given
        if issubclass(obj, enum.Enum) and doc.strip() == "An enumeration.":
            return ""
        return doc.strip()
    return (getattr(obj, "__doc__", None) or "").strip()


def test_public_packages_are_found() -> None:
    names = {package.__name__.removeprefix(PACKAGE + ".") for package in PACKAGES}
    assert {"client", "engine", "server", "telemetry", "gpu", "nccl", "testing"} <= names


def test_every_public_package_has_a_docstring_and_an_all() -> None:
    missing = [p.__name__ for p in PACKAGES if not (p.__doc__ or "").strip()]
    assert not missing, f"packages without a docstring: {missing}"
    without_all = [p.__name__ for p in PACKAGES if not hasattr(p, "__all__")]
    assert not without_all, f"packages without __all__: {without_all}"


def test_exported_classes_and_functions_have_docstrings() -> None:
    missing = sorted(
        {
            f"{package.__name__}.{name}"
            for package, name, obj in exported()
            if is_documentable(obj) and not own_docstring(obj)
        }
    )
    assert not missing, f"public names without a docstring: {missing}"


def test_exported_constants_are_described_in_their_package_docstring() -> None:
    """A constant is named as ``NAME`` in the docstring of some package that exports it."""
    exporters: dict[str, list[types.ModuleType]] = {}
    for package, name, obj in exported():
        if not is_documentable(obj) and not isinstance(obj, types.ModuleType):
            exporters.setdefault(name, []).append(package)
    undocumented = sorted(
        name
        for name, packages in exporters.items()
        if name not in CONVENTIONAL
        and not any(f"``{name}``" in (package.__doc__ or "") for package in packages)
    )
    assert not undocumented, (
        f"constants not described in an exporting package's docstring: {undocumented} "
        "(add a line naming ``NAME`` and saying what it is)"
    )


def public_classes() -> list[type]:
    seen: dict[int, type] = {}
    for _, _, obj in exported():
        if inspect.isclass(obj) and obj.__module__.startswith(PACKAGE):
            seen[id(obj)] = obj
    return sorted(seen.values(), key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


def undocumented_members(cls: type) -> list[str]:
    """Public methods and properties defined in our own classes of ``cls``'s MRO."""
    missing = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith(PACKAGE):
            continue  # the standard library's and dependencies' members are theirs to document
        for name, member in vars(klass).items():
            if name.startswith("_"):
                continue
            function: object
            if isinstance(member, classmethod | staticmethod):
                function = member.__func__
            elif isinstance(member, property):
                function = member.fget
            elif inspect.isfunction(member):
                function = member
            else:
                continue  # fields, enum members, constants
            if not (getattr(function, "__doc__", None) or "").strip():
                missing.append(f"{cls.__qualname__}.{name}")
    return missing


@pytest.mark.parametrize("cls", public_classes(), ids=lambda cls: cls.__qualname__)
def test_public_methods_have_docstrings(cls: type) -> None:
    missing = undocumented_members(cls)
    assert not missing, f"public members without a docstring: {missing}"


def test_the_checks_catch_what_they_should() -> None:
    """The detectors themselves: a generated dataclass doc and a bare method are caught."""

    @dataclasses.dataclass
    class Bare:
        x: int

    class Documented:
        """Has a docstring."""

    assert own_docstring(Bare) == ""
    assert own_docstring(Documented) == "Has a docstring."
    assert not is_documentable(1.5)
    assert is_documentable(len)
