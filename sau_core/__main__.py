"""`python -m sau_core` = the `sau` command."""
from .cli import main

main()
