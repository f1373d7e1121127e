"""`edgeserve bundle`: everything setup needs in one folder, for a machine with no package index (air-gapped).

`edgeserve bundle DIR` (short for `bundle make DIR`) fetches it on a connected machine; `split` cuts it into
parts for transport, `join` puts them back and checks every hash; `verify` checks a bundle. On the air-gapped
machine, where edgeserve is not installed yet, `python3 -m server.bundle join|verify` does the same with the
standard library, and `EDGESERVE_BUNDLE=DIR ./start_sglang.sh` installs from it. Exit status: 0 done, 1 a
problem with the bundle or its making (each named), 2 bad arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from quantize.model.units import MIB
from server.bundle.builder import BundleBuildError, BundleRequest, make_bundle
from server.bundle.manifest import MANIFEST_NAME, PURPOSES, Manifest, Role, Target
from server.bundle.parts import INDEX_NAME, join, split
from server.bundle.problems import BundleError
from server.bundle.verify import Host, verify

EXIT_BAD_BUNDLE, EXIT_USAGE = 1, 2
# The default target: an x86_64 Linux with glibc 2.28 or newer (RHEL 8, Debian 10, Ubuntu 20.04 and later)
# and Python 3.12 (Ubuntu 24.04's).
DEFAULT_PYTHON = "3.12"
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"

out = Console()
err = Console(stderr=True)


class _MakeByDefault(TyperGroup):
    """`edgeserve bundle DIR ...` is `edgeserve bundle make DIR ...` (a first word naming no subcommand)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["make", *args]
        return super().parse_args(ctx, args)


bundle_app = typer.Typer(cls=_MakeByDefault, no_args_is_help=True,
                         help="Everything setup needs, for an air-gapped machine: make (the default), split, "
                              "join, verify.")


def _fail(code: int, message: str) -> typer.Exit:
    err.print(f"[red]bundle:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def _bad_bundle(exc: BundleError) -> typer.Exit:
    for problem in exc.problems:
        err.print(f"[red]bundle:[/red] {escape(problem.message())}", highlight=False, soft_wrap=True)
    return typer.Exit(code=EXIT_BAD_BUNDLE)


def _summary(manifest: Manifest, folder: Path) -> None:
    table = Table(title=f"{folder}: {manifest.target.describe()}", title_justify="left")
    table.add_column("role")
    table.add_column("files", justify="right")
    table.add_column("MiB", justify="right")
    table.add_column("what for")
    for role in Role:
        pieces = manifest.by_role(role)
        if pieces:
            mib = sum(p.size for p in pieces) / MIB
            table.add_row(role.value, str(len(pieces)), f"{mib:.1f}", PURPOSES[role])
    table.add_row("total", str(len(manifest.pieces)), f"{manifest.total_bytes / MIB:.1f}",
                  f"listed in {MANIFEST_NAME}")
    out.print(table)


@bundle_app.command("make")
def make(
    folder: Annotated[Path, typer.Argument(help="a new or empty folder to fill")],
    python_version: Annotated[str, typer.Option(help="the target's Python, major.minor")] = DEFAULT_PYTHON,
    platform: Annotated[
        list[str] | None,
        typer.Option(help=f"the target's platform tag (repeatable; default {DEFAULT_PLATFORM}: x86_64 "
                          "Linux with glibc 2.28+). manylinux_2_<glibc minor>_<arch> also takes the older "
                          "manylinux wheels"),
    ] = None,
    with_test: Annotated[
        bool, typer.Option("--with-test", help="also what run_tests.sh installs (test, loadtest, cluster "
                                               "extras, schemathesis, llm-comply, servebench)")
    ] = False,
    llama_sdist: Annotated[
        Path | None,
        typer.Option(help="a llama-cpp-python source distribution already here (default: the one setup "
                          "cached, else a download)"),
    ] = None,
    split_mib: Annotated[
        int | None, typer.Option(min=1, help="also cut it into parts of this many MiB (into FOLDER.parts)")
    ] = None,
) -> None:
    """Fetch every file setup needs into FOLDER for a target Python and platform, with a manifest."""
    try:
        target = Target(python_version=python_version, platforms=tuple(platform or (DEFAULT_PLATFORM,)))
    except ValueError as exc:
        raise _fail(EXIT_USAGE, str(exc)) from None
    request = BundleRequest(dest=folder, target=target, with_test=with_test, llama_sdist=llama_sdist)
    try:
        manifest = make_bundle(request, say=lambda line: err.print(f"[dim]{escape(line)}[/]",
                                                                   highlight=False))
    except (BundleBuildError, ValueError, RuntimeError) as exc:
        raise _fail(EXIT_BAD_BUNDLE, str(exc)) from None
    _summary(manifest, folder)
    if split_mib is not None:
        _split(folder, folder.with_name(folder.name + ".parts"), split_mib)


def _split(folder: Path, parts_out: Path, size_mib: int) -> None:
    try:
        index = split(folder, parts_out, size_mib * MIB)
    except BundleError as exc:
        raise _bad_bundle(exc) from None
    except ValueError as exc:
        raise _fail(EXIT_USAGE, str(exc)) from None
    out.print(f"{len(index.parts)} parts of at most {size_mib} MiB in {parts_out} ({INDEX_NAME} lists them); "
              f"join with `python3 -m server.bundle join {parts_out} DIR`", highlight=False)


@bundle_app.command("split")
def split_cmd(
    folder: Annotated[Path, typer.Argument(help="a bundle folder (checked first)")],
    parts_out: Annotated[Path, typer.Option("--out", help="folder for the parts and parts.json")],
    size_mib: Annotated[int, typer.Option(min=1, help="the most one part holds, in MiB")] = 50,
) -> None:
    """Cut a bundle into numbered parts of at most --size-mib, with their sizes and sha256 in parts.json."""
    _split(folder, parts_out, size_mib)


@bundle_app.command("join")
def join_cmd(
    parts: Annotated[Path, typer.Argument(help="the folder holding the parts and parts.json")],
    folder: Annotated[Path, typer.Argument(help="where the bundle goes")],
) -> None:
    """Check every part, put the bundle back together in FOLDER, and check every file against its manifest."""
    try:
        manifest = join(parts, folder)
    except BundleError as exc:
        raise _bad_bundle(exc) from None
    _summary(manifest, folder)


@bundle_app.command("verify")
def verify_cmd(
    folder: Annotated[Path, typer.Argument(help="a bundle folder")],
    with_test: Annotated[
        bool, typer.Option("--with-test", help="the test dependencies must be in it")
    ] = False,
    here: Annotated[
        bool, typer.Option("--here", help="also check the target against this Python and machine")
    ] = False,
) -> None:
    """Check every file of a bundle against its manifest's size and sha256."""
    try:
        manifest = verify(folder, with_test=with_test, host=Host.this_machine() if here else None)
    except BundleError as exc:
        raise _bad_bundle(exc) from None
    _summary(manifest, folder)


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")
