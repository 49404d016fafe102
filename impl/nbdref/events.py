"""Public event vocabulary of the core (see ``_events`` for the definitions)."""

from ._events import *  # noqa: F403
from ._events import __all__  # noqa: F401
