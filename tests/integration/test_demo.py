"""The README's first command: `reactor demo` sets everything up on its own and runs jobs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_jobs_end_to_end() -> None:
    base = Path(tempfile.mkdtemp(prefix="reactor-demo-test-"))
    base.chmod(0o755)  # the server may run as another user (root: postgres), who must reach it
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REACTOR_JWT_SECRET")}
    env["REACTOR_EMBEDDED_DIR"] = str(base / "embedded")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "reactor", "demo", "--duration", "6", "--rate", "5", "--port", "0"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert re.search(r"dashboard\s+http://127\.0\.0\.1:\d+/#token=\S+", proc.stdout), out[-3000:]
        assert 'msg="job started"' in proc.stderr and 'msg="job completed"' in proc.stderr
        done = re.search(r"completed=(\d+)", proc.stdout)
        assert done and int(done.group(1)) > 0, out[-3000:]
    finally:
        subprocess.run([sys.executable, "-c", (
            "import sys; from pathlib import Path; from reactor.db.embedded import EmbeddedPostgres; "
            "EmbeddedPostgres(Path(sys.argv[1])).destroy()"), str(base / "embedded")], cwd=REPO, check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)
