"""The web dashboard over run folders: `difftrain-dist ui` (server.py; run status in runs.py)."""
