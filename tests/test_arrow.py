"""bpcp.arrow: pyarrow converts Python lists without importing pandas, and to_pandas() still works."""
from __future__ import annotations

import subprocess
import sys


def test_plan_and_merge_modules_convert_lists_without_pandas():
    code = ("import sys\nimport bpcp.jobs.plan, bpcp.results.merge\nfrom bpcp.arrow import pa\n"
            "pa.table({'a': [1, 2], 'b': ['x', 'y']})\nprint('pandas' in sys.modules)\n"
            "frame = pa.table({'a': [1, 2]}).to_pandas()\nprint(type(frame).__name__, list(frame['a']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["False", "DataFrame [1, 2]"], out.stdout
