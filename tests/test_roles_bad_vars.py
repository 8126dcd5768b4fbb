"""Bad Ansible variables fail at the start of site.yml with a clear one-line message.

Runs `ansible-playbook site.yml --check` against the default inventory (localhost,
local connection) with bad -e values, and checks the message and that nothing
(would have) changed. A positive control proves the checks do not fail everything.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

ROOT = Path(__file__).resolve().parent.parent


def ansible_playbook():
    here = Path(sys.executable).parent / "ansible-playbook"
    if here.exists():
        return str(here)
    found = shutil.which("ansible-playbook")
    require("ansible-playbook", found, "ansible-playbook is not installed (make setup)")
    return found


def run_site(extra_vars, tags=None):
    # No side-by-side 4.2.8.1 unless a case asks for it, so that the checks do not
    # depend on this host's Python 3.9.
    extra_vars = {"cellprofiler_extra_versions": [], **extra_vars}
    cmd = [ansible_playbook(), "site.yml", "--check", "-e", json.dumps(extra_vars)]
    if tags:
        cmd += ["--tags", tags]
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def recap(output):
    m = re.search(r"localhost\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output)
    assert m, output[-2000:]
    return {k: int(v) for k, v in zip(("ok", "changed", "unreachable", "failed"), m.groups())}


BAD = [
    pytest.param({"cellprofiler_version": "9.9"},
                 r"Unknown CellProfiler version\(s\) 9\.9: supported are 5\.0, 4\.2\.8\.1", id="unknown-version"),
    pytest.param({"cellprofiler_extra_versions": ["3.1.9"]},
                 r"Unknown CellProfiler version\(s\) 3\.1\.9", id="unknown-extra-version"),
    pytest.param({"ramdisk_size": "999999G"},
                 r"ramdisk_size 999999G \(\d+ MiB\) is larger than the memory of localhost \(\d+ MiB\)", id="ramdisk-too-big"),
    pytest.param({"ramdisk_size": "101%"}, r"ramdisk_size '101%' is malformed", id="ramdisk-percent-over-100"),
    pytest.param({"ramdisk_size": "4GB"}, r"ramdisk_size '4GB' is malformed", id="ramdisk-malformed-unit"),
    pytest.param({"ramdisk_size": "lots"}, r"ramdisk_size 'lots' is malformed", id="ramdisk-malformed-word"),
    pytest.param({"cellprofiler_extra_versions": ["4.2.8.1"], "cellprofiler_python39": "/nonexistent/python3.9"},
                 r"CellProfiler 4\.2\.8\.1 needs Python 3\.9, found none at /nonexistent/python3\.9", id="no-python39"),
]


@pytest.mark.parametrize("extra_vars, message", BAD)
def test_bad_vars_fail_first_with_a_clear_message(extra_vars, message):
    rc, out = run_site(extra_vars)
    assert rc != 0, out[-2000:]
    assert re.search(message, out), out[-3000:]
    r = recap(out)
    assert r["failed"] == 1 and r["changed"] == 0, r
    # Failed during validation: no role had started installing anything.
    assert "TASK [parallel :" not in out and "TASK [cellprofiler : Install" not in out, out[-3000:]


def test_good_vars_pass_validation():
    rc, out = run_site({"ramdisk_size": "512M", "cellprofiler_version": "5.0"}, tags="always")
    assert rc == 0, out[-3000:]
    r = recap(out)
    assert r["failed"] == 0 and r["changed"] == 0, r
