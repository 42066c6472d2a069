"""Print pip requirements that pin every runtime dependency to the oldest version pyproject.toml allows.

    python3 scripts/oldest_deps.py [--with NAME ...]

Each `[project] dependencies` entry must have a lower bound (`>=X` or `==X`); it is printed as
`name==X` (with its environment marker, if any), so the oldest-versions check (scripts/lib.sh,
ensure_oldest_venv) installs exactly the versions the project claims to support. `--with NAME`
adds the requirement of that name from the optional dependencies as written (the test tools).
Standard library only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# name[extras] specifiers ; marker
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(?:;\s*(.+))?$")


def _name(requirement: str) -> str:
    match = _REQUIREMENT.match(requirement)
    if match is None:
        raise SystemExit(f"cannot read the requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match[1]).lower()


def oldest(requirement: str) -> str:
    """`aiohttp>=3.14.4,<4` -> `aiohttp==3.14.4`."""
    match = _REQUIREMENT.match(requirement)
    if match is None:
        raise SystemExit(f"cannot read the requirement {requirement!r}")
    name, extras, specifiers, marker = match.groups()
    bounds = [s.strip() for s in specifiers.split(",") if s.strip().startswith((">=", "=="))]
    if len(bounds) != 1:
        raise SystemExit(f"{requirement!r} needs exactly one lower bound (>=X or ==X) for the oldest-versions check")
    pinned = f"{name}{extras or ''}=={bounds[0][2:].strip()}"
    return f"{pinned}; {marker}" if marker else pinned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with", dest="extra", action="append", default=[], metavar="NAME",
                        help="also a requirement from the optional dependencies, as written")
    args = parser.parse_args()
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = [oldest(requirement) for requirement in project["dependencies"]]
    optional = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    for name in args.extra:
        found = [r for r in optional if _name(r) == _name(name)]
        if not found:
            raise SystemExit(f"no optional dependency named {name!r} in {PYPROJECT}")
        lines.extend(found)
    sys.stdout.write("".join(f"{line}\n" for line in lines))


if __name__ == "__main__":
    main()
