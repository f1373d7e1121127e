"""`edgeserve host-setup --apply`: run the planned nvidia-smi commands one by one and report each result.

The commands are the ones printed without --apply, run as they are printed: what an operator reviews is what
runs. A failing command does not stop the others (each changes one setting of one GPU).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict

from server.ops.host_setup import Action

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class ActionResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Action
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]} not found: {exc}")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]} did not finish within 60 s")


def apply_actions(actions: Sequence[Action], runner: Runner = run_command) -> tuple[ActionResult, ...]:
    results = []
    for action in actions:
        proc = runner(action.argv)
        output = "\n".join(part.strip() for part in (proc.stdout, proc.stderr) if part and part.strip())
        results.append(ActionResult(action=action, returncode=proc.returncode, output=output))
    return tuple(results)
