"""The error of a wrong recipe or of data that cannot be used, shared by every step that checks them.

It lives on its own so the data modules, which the recipe checks call into,
need not import the recipe schema (``repeft.recipe`` re-exports it).
"""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe field with a wrong name, type or value, or data that cannot be used as the recipe says."""


def one_line(exc: Exception) -> str:
    """A library's error message on one line, to quote inside a ``RecipeError``."""
    return " ".join(str(exc).split())
