"""The job script: valid bash in every mode, settings rendered, nothing from group values in it."""
from __future__ import annotations

import os
import subprocess

import pytest

from bpcp.errors import BpcpError
from bpcp.render import RunSettings, parse_sshlogins, render_script


def plan(kind: str = "loaddata", numbering: str = "local") -> dict:
    return {
        "cellprofiler": {"version": "5.0.0.dev784"},
        "dataset": {"kind": kind},
        "numbering": numbering,
        "pipeline": {"file": "pipeline.cppipe"},
        "table_files": {"Image": "Image.csv", "Nuclei": "Nuclei.csv"},
        "delimiter": ",",
        "jobs": [{"id": "P1_A01-0123abcd", "image_numbers": [1, 2],
                  "groups": [{"Metadata_Plate": "P1; rm -rf ~"}]}],
    }


@pytest.mark.parametrize("kind,numbering,multihost", [
    ("loaddata", "local", False), ("filelist", "local", False), ("batch", "global", False),
    ("loaddata", "local", True), ("folder", "local", True),
])
def test_every_mode_renders_valid_bash(tmp_path, kind, numbering, multihost):
    text = render_script(plan(kind, numbering), tmp_path / "run dir", RunSettings(),
                         ["/opt/cellprofiler/5.0/bin/cellprofiler", "-e", "imageio_reader"], {}, multihost)
    script = tmp_path / "jobs.sh"
    script.write_text(text)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "rm -rf ~" not in text
    assert "'" + str(tmp_path / "run dir") + "'" in text          # quoted for the shell
    assert ("--sshloginfile sshlogins.txt" in text) is multihost
    assert "OMP_NUM_THREADS=1" in text


def test_settings_reach_gnu_parallel(tmp_path):
    settings = RunSettings(jobs="3", retries=5, timeout="2h", memfree="4G", halt="now,fail=1")
    text = render_script(plan(), tmp_path, settings, ["cp"], {})
    assert "options=(--retries 5 --halt now,fail=1)" in text
    assert "options+=(--timeout 2h)" in text and "options+=(--memfree 4G)" in text
    assert 'BPCP_JOBS=${BPCP_JOBS:-3}' in text
    no_limits = render_script(plan(), tmp_path, RunSettings(timeout="", memfree=""), ["cp"], {})
    assert "--timeout" not in no_limits.split("parallel --will-cite")[1].split("\n")[0]
    assert "options+=(--memfree" not in no_limits


def test_unpinned_threads_leave_blas_alone(tmp_path):
    text = render_script(plan(), tmp_path, RunSettings(pin_threads=False), ["cp"], {})
    assert "OMP_NUM_THREADS" not in text


@pytest.mark.parametrize("field,value,message", [
    ("jobs", "many", "--jobs 'many'"), ("timeout", "soon", "--timeout 'soon'"),
    ("memfree", "lots", "--memfree 'lots'"), ("halt", "maybe", "--halt 'maybe'"),
    ("tmp_root", "relative/dir", "--tmp-root 'relative/dir'"),
])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(BpcpError, match=message.replace("(", r"\(")):
        RunSettings(**{field: value}).validate()


def test_sshlogin_file_needs_a_host():
    assert parse_sshlogins("# hosts\n2/ssh -p 2201 root@127.0.0.1\n\n:\n", "h") == ["2/ssh -p 2201 root@127.0.0.1", ":"]
    with pytest.raises(BpcpError, match="no hosts in it"):
        parse_sshlogins("# nothing\n", "hosts.txt")


def test_total_slots_counts_every_host():
    from bpcp.render import host_slots, total_slots

    assert host_slots("100%", 8) == 8 and host_slots("50%", 8) == 4 and host_slots("-2", 8) == 6
    assert host_slots("+1", 2) == 3 and host_slots("3", 64) == 3 and host_slots("10%", 2) == 1
    assert total_slots("100%", 2) == 2
    # run.yml's hosts.sshlogin: "slots/ssh command" per host; ':' without a count is this host
    logins = ["4/ssh -p 2201 root@127.0.0.1", "16/ssh w2", ":"]
    assert total_slots("100%", 2, logins) == 4 + 16 + 2


@pytest.mark.parametrize("tmp_root", ["", "/tmp/bpcp tmp's"])
def test_script_settings_reach_bash_unquoted(tmp_path, tmp_root):
    """The values the script starts with are the values given: no stray quotes (a run folder
    with a space, --tmp-root '' meaning on disk)."""
    run_dir = tmp_path / "run dir"
    text = render_script(plan(), run_dir, RunSettings(tmp_root=tmp_root), ["cp"], {})
    header = text[:text.index("\nbpcp_check()")]          # the settings, before any function
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPCP_")}
    out = subprocess.run(["bash", "-c", header + '\nprintf "%s\\n" "$BPCP_RUN_DIR" "$BPCP_TMP_ROOT" "$BPCP_JOBS"'],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(run_dir), tmp_root, "100%"]
