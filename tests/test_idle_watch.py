"""EC2 workers power themselves off once the controller stops talking to them (bpcp/aws/idle_watch.py).

The user data installs the watch and its systemd unit; the watch rendered there is run here as a
real process against real TCP connections on a port of this host: it must not act while a
connection is established, and must run its command once none has been for --idle seconds.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bpcp.aws.launch_template import IDLE_WATCH, load_config, user_data
from bpcp.errors import BpcpError

from ec2_support import write_config

SCRIPT = "/usr/local/sbin/bpcp-idle-watch"
UNIT = "/etc/systemd/system/bpcp-idle-watch.service"


def rendered(tmp_path: Path, **changes) -> dict:
    return yaml.safe_load(user_data(load_config(write_config(tmp_path / "ec2.yml", **changes))))


def files(doc: dict) -> dict[str, str]:
    return {f["path"]: f["content"] for f in doc.get("write_files", [])}


def test_user_data_installs_and_starts_the_idle_watch(tmp_path):
    doc = rendered(tmp_path, idle_minutes=10)
    written = files(doc)
    assert written[SCRIPT] == IDLE_WATCH.read_text()
    assert "ExecStart=/usr/bin/env python3 /usr/local/sbin/bpcp-idle-watch --idle 600 " in written[UNIT]
    assert "WantedBy=multi-user.target" in written[UNIT]
    start = [c for c in doc["runcmd"] if "bpcp-idle-watch" in str(c)]
    assert len(start) == 1 and "systemctl enable --now bpcp-idle-watch.service" in start[0][2]
    # the default: 15 minutes; 0 turns it off (max_hours stays the only safety net)
    assert "--idle 900 " in files(rendered(tmp_path, idle_minutes=None))[UNIT]
    off = rendered(tmp_path, idle_minutes=0)
    assert SCRIPT not in files(off) and "bpcp-idle-watch" not in str(off["runcmd"])
    assert len(user_data(load_config(write_config(tmp_path / "s.yml", user_data="site"))).encode()) < 16384


@pytest.mark.parametrize("value", [2, -1, "soon"])
def test_a_bad_idle_minutes_is_one_line(tmp_path, value):
    with pytest.raises(BpcpError) as err:
        load_config(write_config(tmp_path / "ec2.yml", idle_minutes=value))
    assert str(err.value).count("\n") == 0
    assert f"idle_minutes: {value!r}: give the minutes without an SSH connection" in str(err.value)
    assert "at least 5" in str(err.value) and "0 = never" in str(err.value)


def start_watch(script: Path, port: int, flag: Path, idle: float) -> subprocess.Popen:
    return subprocess.Popen(["/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable, str(script),
                             "--idle", str(idle), "--every", "0.2", "--port", str(port), "--command", "touch", str(flag)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_rendered_watch_acts_only_once_the_connections_are_gone(tmp_path):
    script = tmp_path / "bpcp-idle-watch"
    script.write_text(files(rendered(tmp_path, idle_minutes=5))[SCRIPT])
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        flag = tmp_path / "powered-off"
        watch = start_watch(script, port, flag, idle=2)
        try:
            time.sleep(4)                       # twice --idle with a connection open: nothing happens
            assert watch.poll() is None and not flag.exists(), watch.communicate(timeout=5)[0] if watch.poll() else ""
            client.close()
            accepted.close()
            closed = time.monotonic()
            assert watch.wait(30) == 0
            waited = time.monotonic() - closed
            assert flag.exists()
            assert 1.5 <= waited < 10, waited
            out = watch.stdout.read()
            assert "no SSH connection for 2 s: touch" in out, out
        finally:
            watch.kill()
        # a worker nobody ever connected to powers off too, --idle after the watch started
        started = time.monotonic()
        flag.unlink()
        assert start_watch(script, port, flag, idle=1).wait(30) == 0
        assert flag.exists() and time.monotonic() - started >= 1
