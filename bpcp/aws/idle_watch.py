"""Power an EC2 worker off once no SSH connection has reached it for a while: the controller's heartbeat.

    python3 bpcp-idle-watch --idle SECONDS [--every SECONDS] [--port N ...] [--message TEXT] [--command ...]

The user data (bpcp/aws/templates/user_data.yml.j2) installs this file as
/usr/local/sbin/bpcp-idle-watch and starts it at boot. While a run goes on, the controller keeps
an SSH connection to every worker (run.yml shares one per host, kept open between jobs; Ansible's
own tasks hold theirs); when the controller vanishes, sshd drops its connections after its
ClientAlive probes go unanswered (60 s with the bpcp_worker role's drop-in) and the jobs there
end. So "no established connection to sshd for --idle seconds" means the controller stopped
talking to this worker (or never started: the clock starts at boot), and the worker runs --command
(default `shutdown -h now`, which terminates it: the launch template sets
InstanceInitiatedShutdownBehavior terminate). Anyone logged in over SSH keeps it up too.

Standard library only, Python 3.7 or newer (whatever python3 the image has): it runs before
site.yml ever configured the host. Connections are read from /proc/net/tcp and /proc/net/tcp6.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable

ESTABLISHED = "01"
DEFAULT_COMMAND = ["shutdown", "-h", "now"]


def sshd_ports() -> list[int]:
    """The ports sshd listens on (`sshd -T`), else 22."""
    try:
        out = subprocess.run(["sshd", "-T"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    ports = sorted({int(line.split()[1]) for line in out.splitlines() if line.startswith("port ")})
    return ports or [22]


def established(ports: list[int], tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> int:
    """Established TCP connections whose local end is one of these ports (connections to sshd)."""
    wanted = {f"{port:04X}" for port in ports}
    count = 0
    for table in tables:
        try:
            with open(table, encoding="ascii") as fd:
                next(fd, None)                      # the header
                for line in fd:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == ESTABLISHED and fields[1].rsplit(":", 1)[-1] in wanted:
                        count += 1
        except OSError:
            continue
    return count


def watch(idle: float, every: float, ports: list[int], command: list[str],
          say: Callable[[str], None] = print) -> int:
    """Wait until no connection has been seen for `idle` seconds, then run `command`; its exit status."""
    last_seen = time.monotonic()
    say(f"bpcp-idle-watch: powering off after {idle:.0f} s without an SSH connection to port(s) "
        f"{', '.join(map(str, ports))}")
    while True:
        now = time.monotonic()
        if established(ports):
            last_seen = now
        elif now - last_seen >= idle:
            say(f"bpcp-idle-watch: no SSH connection for {now - last_seen:.0f} s: {' '.join(command)}")
            return subprocess.call(command)
        time.sleep(min(every, max(0.05, idle - (now - last_seen))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bpcp-idle-watch", description=__doc__.splitlines()[0])
    p.add_argument("--idle", type=float, required=True, help="seconds without an SSH connection before --command")
    p.add_argument("--every", type=float, default=30.0, help="seconds between looks (default 30)")
    p.add_argument("--port", type=int, action="append", help="sshd port (default: what sshd -T says, else 22)")
    p.add_argument("--message", default="bpcp: the controller stopped talking to this worker",
                   help="the wall message of the default command")
    p.add_argument("--command", nargs=argparse.REMAINDER, help="what to run instead of shutdown -h now MESSAGE")
    args = p.parse_args(argv)
    if args.idle <= 0 or args.every <= 0:
        p.error("--idle and --every take seconds above 0")
    command = args.command or DEFAULT_COMMAND + [args.message]

    def say(text: str) -> None:
        print(text, flush=True)

    return watch(args.idle, args.every, args.port or sshd_ports(), command, say)


if __name__ == "__main__":
    sys.exit(main())
