"""Registers every `sau` sub-command on the group in cli.py. One import per command module."""
from .organism import commands as _organism  # noqa: F401
from . import inspect_cmd  # noqa: F401
from . import engine_commands  # noqa: F401
from . import scan_cli  # noqa: F401
