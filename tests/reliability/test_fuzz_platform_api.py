"""Schema-driven fuzzing of the platform API with schemathesis, against a real stack and
the document generated from the API's own models (docs/platform-openapi.json).

As for the key service (test_fuzz_keyservice_api.py): requests valid and invalid
(`--mode all`) with the API token, so they reach the handlers; the property is
`not_a_server_error` (never a 5xx), and no traceback in the server's log. The platform's
own 503 (key service unreachable) and 504 (deadline) are answers, not faults, but none
is expected here: the key service runs. Bounded for CI by examples per operation.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from nbdserver import openapi
from tests.helpers.platform import Stack

CI_EXAMPLES = 5


def test_platform_api_no_server_errors(tmp_path):
    st = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    if st is None:
        import pytest
        pytest.skip("schemathesis is not installed")
    stack = Stack(tmp_path / "stack").start()
    try:
        stack.create_disk("fuzz-disk", "--size", "1M")
        token = stack.nb.token_file.read_text().strip()
        args = [st, "run", str(openapi.PATH), "--url", stack.api_url,
                "--checks", "not_a_server_error", "--mode", "all", "-n", str(CI_EXAMPLES),
                "--seed", "1", "--workers", "1", "--request-timeout", "60",
                "--suppress-health-check", "all", "--no-shrink",
                "-H", f"Authorization: Bearer {token}"]
        r = subprocess.run(args, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
        out = r.stdout + r.stderr
        stack.nb.assert_healthy()
        assert "Traceback" not in stack.logs(), stack.logs()[-6000:]
    finally:
        stack.close()
    assert r.returncode == 0, f"schemathesis found failures:\n{out[-6000:]}"
    print("\nschemathesis:", [ln.strip() for ln in out.splitlines()
                              if re.search(r"(passed|generated|operations|failures|Test cases)", ln)][-6:])
