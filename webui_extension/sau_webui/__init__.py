"""SAU's AUTOMATIC1111 / Forge extension: the "SAU" tab (Scan, Sanitize). ``host`` wraps the host's services
behind one small interface, ``jobs`` runs the engine's work on checkpoint files, ``ui`` builds the tab."""
