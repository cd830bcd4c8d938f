"""Write examples/cluster/requirements.lock: the exact version of every runtime dependency of aquila-ray
(its requirements and theirs, extras and environment markers evaluated) as installed in this environment,
the one the tests ran in. cluster.yaml's setup_commands install it on every node, so every node (and every
spot replacement) runs the same torch, DeepSpeed and Ray.

    python examples/cluster/write_lock.py            # from a venv where `pip install -e .` ran

A local version label (``torch 2.13.0+cpu`` here) is dropped: on a GPU node ``torch==2.13.0`` from PyPI is
the CUDA build, which pins its own nvidia-* libraries.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

OUT = Path(__file__).with_name("requirements.lock")
CLUSTER_ONLY = ("boto3",)
"""Not aquila-ray's dependencies but every node's: the head's autoscaler launches EC2 nodes with boto3."""


def closure(root: str) -> dict[str, str]:
    """Installed name -> version of ``root``'s runtime dependencies, transitively."""
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name.lower(), extras) in seen:
            continue
        seen.add((name.lower(), extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} is required but not installed here; install aquila-ray first") from None
        if name != root:
            found[dist.metadata["Name"]] = dist.version.split("+")[0]
        for text in dist.requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return found


def main() -> None:
    pins = closure("aquila-ray")
    for name in CLUSTER_ONLY:
        pins[distribution(name).metadata["Name"]] = distribution(name).version
        pins.update(closure(name))
    lines = [f"{name}=={version}" for name, version in sorted(pins.items(), key=lambda kv: kv[0].lower())]
    OUT.write_text(f"# written by examples/cluster/write_lock.py (Python {sys.version_info.major}."
                   f"{sys.version_info.minor}); do not edit by hand\n" + "\n".join(lines) + "\n")
    print(f"{OUT}: {len(lines)} packages")


if __name__ == "__main__":
    main()
