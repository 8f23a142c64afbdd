"""Registers every `sau` sub-command on the group in cli.py. One import per command module."""
