"""Shared-filesystem mode over SSH (bpcp.jobs.sharedfs): the check every host passes before any
job starts, and a run whose hosts read and write the run folder directly.

The hosts are real sshd processes on 127.0.0.1 (tests/local_sshd.py); a host "without the shared
mount" runs in a mount namespace of its own with an empty tmpfs over the run folder's (or the
images') parent, so it sees another folder at the same path, as a worker without NFS would.
The same scenario over Docker containers with bind mounts is in test_multihost.py.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import require
from local_sshd import Host, namespaces_ready, sshd_ready, start_host
from test_e2e_local import assert_merged_equals, bpcp, single_process

from bpcp import planfile
from bpcp.errors import BpcpError
from bpcp.jobs import sharedfs
from bpcp.jobs.sharedfs import decide, parse_login
from bpcp.results.joblog import read_joblog
from bpcp.runfolder import RunFolder


def test_sshlogin_lines_are_read_as_gnu_parallel_reads_them():
    yml = parse_login("2/ssh -o BatchMode=yes -p 2201 -i /k/id -o StrictHostKeyChecking=no -l root 127.0.0.1")
    assert yml.name == "root@127.0.0.1:2201" and not yml.local
    assert yml.argv[:5] == ("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20") and yml.argv[-1] == "127.0.0.1"
    plain = parse_login("4/alice@node7:2222")
    assert plain.name == "alice@node7:2222" and plain.argv[-3:] == ("-p", "2222", "alice@node7")
    assert parse_login("node8").argv[-1] == "node8" and parse_login("node8").name == "node8"
    assert parse_login("@gpu/1/myssh -J jump node9").argv == ("myssh", "-J", "jump", "node9")
    assert parse_login(":").local and parse_login("8/:").local


def test_each_problem_is_one_line_naming_the_host_and_the_path():
    login, run = parse_login("ssh -p 2201 root@w1"), Path("/nfs/run")
    ok = {"python": [3, 11, 2], "token": True, "wrote": True, "unreadable": [], "images": 5, "missing_count": 0}
    assert sharedfs.problems(login, run, ok, True) == []
    unseen = sharedfs.problems(login, run, {**ok, "token": False, "token_error": "No such file or directory"}, False)
    assert unseen == ["root@w1:2201: does not see the run folder /nfs/run (No such file or directory); mount it on "
                      "root@w1:2201 at the same path (NFS or another shared filesystem), or leave out --shared-fs "
                      "(run.yml: shared_fs) to copy each job's inputs to the hosts instead"]
    assert "cannot write to the run folder /nfs/run (Read-only file system)" in sharedfs.problems(
        login, run, {**ok, "wrote": False, "write_error": "Read-only file system"}, False)[0]
    assert "has another folder at that path" in sharedfs.problems(login, run, ok, False)[0]
    images = sharedfs.problems(login, run, {**ok, "missing": ["/img/a.tif"], "missing_count": 3}, True)
    assert images == ["root@w1:2201: does not see /img/a.tif (and 2 more of the 5 images); the images must be on a "
                      "filesystem root@w1:2201 shares, at the same paths as here, or leave out --shared-fs to copy "
                      "them to the hosts"]
    assert "python3 is 3.6.9; the job runner needs 3.9" in sharedfs.problems(login, run, {**ok, "python": [3, 6, 9]}, True)[0]
    assert sharedfs.problems(login, run, {"error": "cannot log in over ssh (refused)"}, False) == [
        "root@w1:2201: cannot log in over ssh (refused)"]


# ------------------------------------------------------------------ over real sshd hosts

@pytest.fixture(scope="module")
def ssh_folder(tmp_path_factory) -> Path:
    require("sshd", sshd_ready(), "no /usr/sbin/sshd and ssh, or not root (apt-get install -y openssh-server)")
    return tmp_path_factory.mktemp("ssh")


@pytest.fixture
def hosts():
    started: list[Host] = []
    yield started
    for host in started:
        host.stop()


def small_run(root: Path) -> tuple[RunFolder, planfile.Plan]:
    """A planned run folder by hand: two jobs of LoadData rows naming real files under images/."""
    images = root / "images" / "P1"
    images.mkdir(parents=True)
    run = RunFolder(root / "shared" / "run")
    (run.root / "inputs").mkdir(parents=True)
    (run.root / "pipeline.cppipe").write_text("CellProfiler Pipeline\n")
    jobs = []
    for i, well in enumerate(("A01", "A02")):
        for ch in ("DNA", "GFP"):
            (images / f"{well}_{ch}.tif").write_bytes(b"II*\0")
        (run.root / "inputs" / f"{well}.csv").write_text(
            "FileName_DNA,PathName_DNA,FileName_GFP,PathName_GFP\n"
            f"{well}_DNA.tif,{images},{well}_GFP.tif,{images}\n")
        jobs.append({"id": well, "groups": [{"Metadata_Well": well}], "image_numbers": [i + 1], "group_numbers": [i + 1],
                     "group_indexes": [1], "input": f"inputs/{well}.csv"})
    plan = planfile.from_dict({
        "format": planfile.FORMAT, "dataset": {"kind": "loaddata", "path": "/x.csv", "sha256": ""},
        "pipeline": {"path": "/p", "file": "pipeline.cppipe", "sha256": ""}, "cellprofiler": {"version": "5"},
        "group_by": ["Metadata_Well"], "bundle": {"asked": 0, "slots": 1, "sets_per_job": 0}, "numbering": "local",
        "tables": ["Image"], "table_files": {"Image": "Image.csv"}, "delimiter": ",", "image_sets": 2, "jobs": jobs})
    planfile.write(run, plan)
    return run, plan


def test_hosts_that_see_the_run_folder_pass_and_leave_nothing_behind(ssh_folder, hosts, tmp_path):
    run, plan = small_run(tmp_path)
    (run.root / ".bpcp-check-0123").mkdir()          # left by a check that was killed
    hosts += [start_host(ssh_folder), start_host(ssh_folder)]
    said: list[str] = []
    assert decide(run, plan, [h.sshlogin() for h in hosts] + [":"], "yes", said.append)
    assert said == [f"bpcp: shared filesystem: 2 host(s) see {run.root} and the 4 images at the same paths; jobs read "
                    "and write the run folder directly (no staging)"]
    assert not list(run.root.glob(".bpcp-check-*"))
    assert decide(run, plan, [h.sshlogin() for h in hosts], "no", said.append) is False and len(said) == 1
    assert decide(run, plan, ["4/:"], "auto", said.append) and said[-1].endswith("only this host in the sshlogin "
                                                                                 "file; jobs run in the run folder (no staging)")


def test_a_host_without_the_run_folder_is_one_line_or_staging(ssh_folder, hosts, tmp_path):
    require("mount namespaces", namespaces_ready(), "unshare -m with a tmpfs needs root and CAP_SYS_ADMIN")
    run, plan = small_run(tmp_path)
    good = start_host(ssh_folder)
    hosts.append(good)
    blind = start_host(ssh_folder, hide=(run.root.parent,))     # an empty folder at the run folder's parent
    hosts.append(blind)
    logins = [good.sshlogin(), blind.sshlogin()]
    with pytest.raises(BpcpError) as refused:
        decide(run, plan, logins, "yes")
    assert len(refused.value.lines) == 1, refused.value.lines
    line = refused.value.lines[0]
    assert line.startswith(f"{blind.name}: does not see the run folder {run.root} (No such file or directory); "
                           f"mount it on {blind.name} at the same path"), line
    assert good.name not in line
    said: list[str] = []
    assert decide(run, plan, logins, "auto", said.append) is False
    assert said == [f"bpcp: shared filesystem: not used, staging each job's inputs instead ({blind.name}: does not see "
                    f"the run folder {run.root} (No such file or directory))"]
    assert not list(run.root.glob(".bpcp-check-*"))


def test_a_host_without_the_images_names_the_first_it_misses(ssh_folder, hosts, tmp_path):
    require("mount namespaces", namespaces_ready(), "unshare -m with a tmpfs needs root and CAP_SYS_ADMIN")
    run, plan = small_run(tmp_path)
    blind = start_host(ssh_folder, hide=(tmp_path / "images",))
    hosts.append(blind)
    with pytest.raises(BpcpError) as refused:
        decide(run, plan, [blind.sshlogin()], "yes")
    first = sharedfs.image_paths(run.root, plan)[0]
    assert refused.value.lines == [f"{blind.name}: does not see {first} (and 3 more of the 4 images); the images must "
                                   f"be on a filesystem {blind.name} shares, at the same paths as here, or leave out "
                                   "--shared-fs to copy them to the hosts"]


def test_a_host_that_cannot_be_reached_is_named(ssh_folder, hosts, tmp_path):
    run, plan = small_run(tmp_path)
    host = start_host(ssh_folder)
    host.stop()                                      # nothing listens on its port any more
    with pytest.raises(BpcpError) as refused:
        decide(run, plan, [host.sshlogin()], "yes")
    assert refused.value.lines[0].startswith(f"{host.name}: cannot log in over ssh ("), refused.value.lines
    assert "Connection refused" in refused.value.lines[0]


# ------------------------------------------------------------------ bpcp run --shared-fs, end to end

@pytest.mark.cellprofiler
@pytest.mark.slow
def test_shared_fs_run_over_two_hosts_equals_one_process(ssh_folder, hosts, example_plate, cp_venv, tmp_path):
    """Two sshd hosts (this machine) sharing the run folder: nothing staged, nothing returned, each
    job published by its own runner by rename; the merge equals one CellProfiler process."""
    require("mount namespaces", namespaces_ready(), "unshare -m with a tmpfs needs root and CAP_SYS_ADMIN")
    reference = single_process(cp_venv, tmp_path / "ref", "-p", str(example_plate / "example_loaddata.cppipe"),
                               "--data-file", str(example_plate / "load_data.csv"))
    hosts += [start_host(ssh_folder), start_host(ssh_folder)]
    logins = tmp_path / "hosts.sshlogin"
    logins.write_text("".join(h.sshlogin() + "\n" for h in hosts))
    run = tmp_path / "shared" / "run"
    common = ["--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
              "-p", str(example_plate / "example_loaddata.cppipe"), "-o", str(run), "--bundle", "4"]

    # a host that does not see the run folder: one line naming it before any job starts
    run.mkdir(parents=True)
    blind = start_host(ssh_folder, hide=(run.parent,))
    hosts.append(blind)
    refused_logins = tmp_path / "refused.sshlogin"
    refused_logins.write_text(f"{hosts[0].sshlogin()}\n{blind.sshlogin()}\n")
    proc = bpcp("run", *common, "--sshloginfile", str(refused_logins), "--shared-fs", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bpcp: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout + proc.stderr
    assert errors[0].startswith(f"bpcp: error: {blind.name}: does not see the run folder {run} "), errors
    assert not (run / "joblog.tsv").exists() and not (run / "jobs.sh").exists()
    assert not list((run / "work").glob("*")) and not list((run / "published").glob("*"))

    proc = bpcp("run", *common, "--sshloginfile", str(logins), "--shared-fs")
    assert f"bpcp: shared filesystem: 2 host(s) see {run} and the 48 images at the same paths" in proc.stdout
    assert "COMPLETE: 4/4 jobs done, 8/8 groups, 16/16 image sets" in proc.stdout, proc.stdout[-3000:]
    assert_merged_equals(reference, run)
    config = json.loads((run / "runner.json").read_text())
    assert (config["staged"], config["shared_fs"]) == (False, True)
    script = (run / "jobs.sh").read_text()
    assert "--transferfile" not in script and "--return" not in script
    assert not (run / "stage").exists()
    for job in (run / "published").iterdir():            # ran in the run folder itself, not a copy
        assert json.loads((job / "bpcp-job.json").read_text())["workdir"] == str(run)
    attempts, notes = read_joblog(run / "joblog.tsv")
    ports = {int(re.search(r"-p (\d+)", a.host).group(1)) for a in attempts if a.ok}  # type: ignore[union-attr]
    assert not notes and ports == {h.port for h in hosts[:2]}, [a.host for a in attempts]

    # auto: the same hosts pass; a staged render made stage/, the shared one removes it
    bpcp("render", "-o", str(run), "--sshloginfile", str(logins))
    assert (run / "stage").is_dir() and "--transferfile" in (run / "jobs.sh").read_text()
    proc = bpcp("render", "-o", str(run), "--sshloginfile", str(logins), "--shared-fs", "auto")
    assert "bpcp: shared filesystem: 2 host(s) see" in proc.stdout
    assert not (run / "stage").exists() and "--transferfile" not in (run / "jobs.sh").read_text()
    # auto with the blind host: staging, said in one line
    proc = bpcp("render", "-o", str(run), "--sshloginfile", str(refused_logins), "--shared-fs", "auto")
    said = [line for line in proc.stdout.splitlines() if "shared filesystem" in line]
    assert said == [f"bpcp: shared filesystem: not used, staging each job's inputs instead ({blind.name}: does not "
                    f"see the run folder {run} (No such file or directory))"], proc.stdout
    assert (run / "stage").is_dir() and json.loads((run / "runner.json").read_text())["staged"] is True
    assert subprocess.run(["bash", "-n", str(run / "jobs.sh")]).returncode == 0


def test_the_folders_of_the_sshlogins_control_paths_are_made_private(tmp_path, monkeypatch):
    """ssh cannot share a connection whose ControlPath folder is missing ("unix_listener: cannot
    bind to path"), and run.yml's ~/.ssh is missing for a user who never ran ssh."""
    from bpcp.jobs.sharedfs import make_control_dirs

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    made = make_control_dirs([
        "4/ssh -o ControlMaster=auto -o ControlPath=~/.ssh/bpcp-%C -o ControlPersist=60 -p 22 -l root host1",
        f"ssh -oControlPath={tmp_path}/sockets/deep/%C host2",
        "ssh -o ControlPath=none host3", ":", "8/host4",
        f"@gpu/2/ssh -o ControlPath={tmp_path}/grouped/%C host5"])
    assert made == [tmp_path / "home" / ".ssh", tmp_path / "sockets" / "deep", tmp_path / "grouped"]
    assert (tmp_path / "home" / ".ssh").stat().st_mode & 0o777 == 0o700
    assert make_control_dirs(["ssh -o ControlPath=~/.ssh/bpcp-%C host1"]) == []   # there already
