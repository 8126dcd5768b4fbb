"""The job script: valid bash in every mode, settings rendered, nothing from group values in it."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from bpcp import planfile
from bpcp.errors import BpcpError
from bpcp.inputs.cellprofiler import CellProfiler
from bpcp.jobs import runner
from bpcp.jobs.render import RunSettings, parse_sshlogins, render_script, runner_config

# a payload that leaves a trace if any shell runs it (a file named with a token of this session)
TOKEN = secrets.token_hex(6)
INJECTED = Path(f"/tmp/bpcp-injected-{TOKEN}")
MARKER = f"bpcp-marker-$(touch {INJECTED})"


def plan(kind: str = "loaddata", numbering: str = "local", version: str = "5.0.0.dev784") -> planfile.Plan:
    return planfile.from_dict({
        "format": planfile.FORMAT,
        "dataset": {"kind": kind, "path": "/data/x.csv", "sha256": ""},
        "pipeline": {"path": "/p.cppipe", "file": "pipeline.cppipe", "sha256": ""},
        "cellprofiler": {"version": version},
        "group_by": ["Metadata_Plate"], "bundle": {"asked": 0, "slots": 1, "sets_per_job": 0},
        "numbering": numbering, "tables": ["Image", "Nuclei"],
        "table_files": {"Image": "Image.csv", "Nuclei": "Nuclei.csv"},
        "delimiter": ",", "image_sets": 2,
        "jobs": [{"id": "P1_A01-0123abcd", "image_numbers": [1, 2], "group_numbers": [1, 1], "group_indexes": [1, 2],
                  "groups": [{"Metadata_Plate": f"P1; {MARKER}"}]}],
    })


CP = CellProfiler(executable=Path("/opt/cellprofiler/5.0/bin/cellprofiler"), python=Path("/opt/cellprofiler/5.0/bin/python"))


@pytest.mark.parametrize("kind,numbering,multihost", [
    ("loaddata", "local", False), ("filelist", "local", False), ("batch", "global", False),
    ("loaddata", "local", True), ("folder", "local", True),
])
def test_every_mode_renders_valid_bash(tmp_path, kind, numbering, multihost):
    text = render_script(plan(kind, numbering), tmp_path / "run dir", RunSettings(), multihost)
    script = tmp_path / "jobs.sh"
    script.write_text(text)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert MARKER not in text and TOKEN not in text and "P1;" not in text
    # the script's settings, run: nothing of the group value is executed either
    header = text[:text.index("\nbpcp_job()")]
    ran = subprocess.run(["bash", "-c", header], capture_output=True, text=True, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if not k.startswith("BPCP_")})
    assert ran.returncode == 0, ran.stderr
    assert not INJECTED.exists() and not list(tmp_path.rglob(f"*{TOKEN}*"))
    assert "'" + str(tmp_path / "run dir") + "'" in text          # quoted for the shell
    assert ("--sshloginfile sshlogins.txt" in text) is multihost
    assert len(text.splitlines()) <= 150
    s3 = plan(kind, numbering)
    s3 = s3.replace(jobs=tuple(j.replace(fetch=f"inputs/{j.id}.fetch") for j in s3.jobs))
    assert len(render_script(s3, tmp_path, RunSettings(s3_output="s3://bkt/run"), multihost, slots=64).splitlines()) <= 150


def test_jobs_run_with_pinned_threads():
    config = runner_config(plan(), Path("/run"), RunSettings(), CP, False)
    env = runner.job_environment(config["cellprofiler"]["version"], config["pin_threads"], config["cellprofiler"]["env"], base={})
    assert env["OMP_NUM_THREADS"] == "1" and env["OPENBLAS_NUM_THREADS"] == "1" and env["MPLBACKEND"] == "Agg"
    assert "JAVA_TOOL_OPTIONS" not in env
    java = runner.job_environment("4.2.8.1", True, {"JAVA_HOME": "/usr/lib/jvm/x"}, base={})
    assert java["JAVA_TOOL_OPTIONS"] == "-XX:ActiveProcessorCount=1 -XX:+UseSerialGC" and java["JAVA_HOME"] == "/usr/lib/jvm/x"
    argv = runner.cellprofiler_argv(config, "/run/pipeline.cppipe", runner.input_argv("loaddata", "local", "/in.csv", None),
                                    "/o", "/t", "/d")
    assert argv == ["/opt/cellprofiler/5.0/bin/cellprofiler", "-e", "imageio_reader", "-c", "-r", "-p", "/run/pipeline.cppipe",
                    "--data-file", "/in.csv", "-o", "/o", "-t", "/t", "-d", "/d"]


def test_settings_reach_gnu_parallel(tmp_path):
    settings = RunSettings(jobs="3", retries=5, timeout="2h", memfree="4G", halt="now,fail=1")
    text = render_script(plan(), tmp_path, settings)
    assert "options=(--retries 5 --halt now,fail=1)" in text
    assert "options+=(--timeout 2h)" in text
    assert 'BPCP_JOBS=${BPCP_JOBS:-3}' in text
    no_limits = render_script(plan(), tmp_path, RunSettings(timeout=""))
    assert "--timeout" not in no_limits.split("parallel --will-cite")[1].split("\n")[0]


def test_unpinned_threads_leave_blas_alone(tmp_path):
    config = runner_config(plan(), tmp_path, RunSettings(pin_threads=False), CP, False)
    assert config["pin_threads"] is False
    env = runner.job_environment("5.0", config["pin_threads"], {}, base={})
    assert "OMP_NUM_THREADS" not in env


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
    from bpcp.jobs.render import host_slots, total_slots

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
    text = render_script(plan(), run_dir, RunSettings(tmp_root=tmp_root))
    header = text[:text.index("\nbpcp_job()")]          # the settings, before any function
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPCP_")}
    out = subprocess.run(["bash", "-c", header + '\nprintf "%s\\n" "$BPCP_RUN_DIR" "$BPCP_TMP_ROOT" "$BPCP_JOBS"'],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(run_dir), tmp_root, "100%"]


@pytest.mark.parametrize("python,expected", [(sys.executable, sys.executable), ("/no/such/python3", "python3")])
def test_runner_interpreter_on_this_host(tmp_path, python, expected):
    """Local jobs run the runner under bpcp's own interpreter with -S (no pyenv shim, no site
    imports per job); a path that no longer exists (the run folder resumed elsewhere) falls back
    to python3, and the runner works either way."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "bpcp_runner.py").write_text(Path(runner.__file__).read_text())
    (run_dir / "runner.json").write_text(json.dumps({"tmp_root": "", "ramdisk": ""}))
    text = render_script(plan(), run_dir, RunSettings(), python=python)
    header = text[:text.index("\nbpcp_job()")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPCP_")}
    out = subprocess.run(["bash", "-c", header + '\nprintf "%s\\n" "$BPCP_PYTHON" "${runner[*]}"; "${runner[@]}" reclaim'],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [expected, f"{expected} -S {run_dir}/bpcp_runner.py"]
    assert '"${BPCP_PYTHON:-python3}" -S "$runner" run' in text      # remote hosts get no BPCP_PYTHON: python3


@pytest.mark.parametrize("hard,ok", [(4096, True), (256, False)])
def test_descriptors_for_every_slot_or_one_line(tmp_path, hard, ok):
    """GNU parallel needs 4 descriptors per running job: the script raises its soft limit to what
    the slots need, or says in one line that the hard limit is too low, before any job starts."""
    run = tmp_path / "run"
    (run / "published").mkdir(parents=True)
    (run / "joblist.tsv").write_text("P1_A01-0123abcd\t2\n")
    (run / "bpcp_runner.py").write_text("import sys; sys.exit(0)\n")   # reclaim: nothing to reclaim here
    script = run / "jobs.sh"
    text = render_script(plan(), run, RunSettings(), False, slots=200)
    script.write_text(text.replace("\nparallel --will-cite", '\necho "soft $(ulimit -Sn)"; exit 0\nparallel --will-cite'))
    proc = subprocess.run(["bash", "-c", f"ulimit -Sn 128; ulimit -Hn {hard}; bash {script}"], capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0 and "soft 864" in proc.stdout, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip() == ("bpcp: GNU parallel needs 864 open files for 200 slots but this shell may open 256; raise the "
                                       "hard limit (ulimit -Hn, limits.conf nofile, LimitNOFILE=) or run fewer slots")


@pytest.mark.parametrize("multihost", [False, True])
def test_memfree_is_admitted_by_the_runner_not_gnu_parallel(tmp_path, multihost):
    """GNU parallel's --memfree reads only the controller's memory and polls it (forking perl and
    awk) the whole time jobs run; the runner admits each job on its own host instead."""
    assert "--memfree" not in render_script(plan(), tmp_path, RunSettings(memfree="3G"), multihost=multihost)
    config = runner_config(plan(), tmp_path, RunSettings(memfree="3G"), CP, multihost)
    assert config["memory_needed"] == 3 << 30


@pytest.mark.parametrize("shared", [False, True])
def test_shared_filesystem_stages_nothing(tmp_path, shared):
    """--shared-fs: remote jobs cd into the run folder and publish there; staged: GNU parallel copies
    stage/<job>/ over and brings work/<job>/out back for the collector."""
    text = render_script(plan(), tmp_path / "run dir", RunSettings(), multihost=True, shared_fs=shared)
    script = tmp_path / "jobs.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "--sshloginfile sshlogins.txt" in text
    for staging in ("--transferfile", "--return", "--cleanup", "--workdir", "PARALLEL_RSYNC_OPTS", "collect; done"):
        assert (staging in text) is not shared, staging
    assert ('cd "$BPCP_RUN_DIR" || { echo "bpcp: $1: $(hostname) does not see' in text) is shared
    assert "--env BPCP_TMP_ROOT" in text and "--memfree" not in text
    assert len(text.splitlines()) <= 150
    config = runner_config(plan(), tmp_path, RunSettings(), CP, True, shared_fs=shared)
    assert (config["staged"], config["shared_fs"]) == (not shared, shared)
    # one host only: nothing to share, nothing staged, whatever was asked
    alone = runner_config(plan(), tmp_path, RunSettings(shared_fs="yes"), CP, False, shared_fs=shared)
    assert (alone["staged"], alone["shared_fs"]) == (False, False)
    assert render_script(plan(), tmp_path, RunSettings(), shared_fs=shared) == render_script(plan(), tmp_path, RunSettings())


def test_shared_filesystem_s3_jobs_still_get_the_endpoint(tmp_path):
    s3 = plan()
    s3 = s3.replace(jobs=tuple(j.replace(fetch=f"inputs/{j.id}.fetch") for j in s3.jobs))
    for shared in (False, True):
        text = render_script(s3, tmp_path, RunSettings(), multihost=True, shared_fs=shared)
        assert 'remote+=(--env "$name")' in text, shared


def test_shared_fs_mode_is_checked():
    with pytest.raises(BpcpError, match="--shared-fs 'maybe': give yes, no or auto"):
        RunSettings(shared_fs="maybe").validate()
