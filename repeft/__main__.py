"""``python -m repeft`` (and ``accelerate launch -m repeft``) run the ``repeft`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
