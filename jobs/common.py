"""What every job shares: ``--config``, ``--set`` overrides, ``--dry-run``, and printing a plan.

A job parses arguments, builds a config, and calls one library function (STYLE.md rule 10).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from aquila_ray.errors import AquilaError


def base_parser(description: str, takes_config: bool = True) -> argparse.ArgumentParser:
    """The shared options; ``takes_config=False`` for a job that has no config to overlay (it offers no
    ``--config``/``--set``, so they cannot be silently ignored)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if takes_config:
        parser.add_argument("--config", default=None, help="YAML/JSON file overlaid on the defaults")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                            help="override a config field, e.g. --set model.hidden_size=128 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print the resolved config and the plan, and exit without compute")
    return parser


def print_plan(title: str, plan: dict[str, Any]) -> None:
    print(f"== {title} ==")
    print(json.dumps(plan, indent=2, default=str, ensure_ascii=False))


def run_main(main: Any) -> None:
    """Run a job's main; user errors print one clear line and exit 2 (no traceback)."""
    try:
        main()
    except AquilaError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
