"""What installs: the Python package's metadata, `python -m bpcp`, and the roles as a collection."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_python_m_bpcp_and_metadata():
    proc = subprocess.run([sys.executable, "-m", "bpcp", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("bpcp "), proc.stderr
    text = (ROOT / "pyproject.toml").read_text()
    assert '\nrequires-python = ">=3.10"\n' in text          # duckdb has no wheels for 3.9
    assert '\nlicense = "BSD-3-Clause"\n' in text            # an SPDX string, not a table


def test_roles_build_and_install_as_a_collection(tmp_path):
    build = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(ROOT), "--output-path", str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    archive = next(tmp_path.glob("bpcp-roles-*.tar.gz"))
    listing = subprocess.run(["tar", "tzf", str(archive)], capture_output=True, text=True, check=True).stdout.split()
    assert {"roles/cellprofiler/tasks/main.yml", "roles/bpcp_worker/meta/argument_specs.yml", "meta/runtime.yml"} <= set(listing)
    assert not [name for name in listing if name.startswith(("bpcp/", "tests/", ".venv", "molecule/"))]
    collections = tmp_path / "collections"
    install = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", str(archive), "-p", str(collections)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    playbook = tmp_path / "play.yml"
    playbook.write_text("- hosts: localhost\n  roles:\n    - bpcp.roles.ramdisk\n    - bpcp.roles.parallel\n")
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": f"{collections}:{Path.home() / '.ansible/collections'}",
           "ANSIBLE_ROLES_PATH": str(tmp_path / "none")}
    check = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", str(playbook)], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_core_flow_needs_neither_boto3_nor_matplotlib():
    """Planning, running, merging import no extra: a plain `pip install bpcp` works without S3 or charts."""
    code = ("import sys, bpcp.cli, bpcp.jobs.prepare, bpcp.jobs.execute, bpcp.results.merge, bpcp.results.completeness\n"
            "bpcp.cli.build_parser()\n"
            "extra = sorted(m for m in ('boto3', 'botocore', 'matplotlib', 'yaml') if m in sys.modules)\n"
            "assert not extra, extra\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
