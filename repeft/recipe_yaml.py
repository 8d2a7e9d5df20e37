"""Recipe YAML, read safely: a recipe file, a ``--set``-style override value, or a run's saved ``recipe.yaml``.

YAML's safe loader, less aliases, and every failure (bad syntax, an alias,
nesting deep enough to exhaust the stack) as one ``RecipeError`` naming where
the text came from.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import RecipeError


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``).

    A few hundred bytes of nested aliases expand to billions of values when the
    recipe is copied or compared; recipes have no need for them.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RecipeError(
                f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not accepted in recipes; "
                "write the value out in full"
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """The value of a YAML text of a recipe (or part of one); ``RecipeError`` naming ``where`` if it is not one."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where} is not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{where} is nested too deeply to be a recipe") from None
