"""Every check of an outside OpenAI-compatibility checker (llm-comply, openai-chat format) against
`edgeserve serve` with the bundled model: `python bench/conformance.py` prints its JSON report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from loadtest.servers import start_edgeserve


def main() -> int:
    checker = shutil.which("llm-comply") or str(Path(sys.executable).with_name("llm-comply"))
    log = Path("conformance-serve.log")
    server = start_edgeserve(["--n-parallel", "2", "--n-ctx", "1024"], log).wait_ready()
    try:
        run = subprocess.run([checker, "--format", "openai-chat", "-u", server.url + "/v1", "-m", "edgeserve",
                              "-k", "unused", "--json", "--timeout", "600"], capture_output=True, text=True,
                             check=False)
    finally:
        server.stop()
    report = json.loads(run.stdout)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0 if report["summary"]["failed"] <= 1 else 1  # image input: the bundled model has no vision


if __name__ == "__main__":
    raise SystemExit(main())
