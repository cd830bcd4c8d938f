"""Thin `python -m jobs.<name>` entrypoints: the unit of `ray job submit`."""
