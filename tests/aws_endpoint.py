"""A real local AWS endpoint for tests: moto's server on a free 127.0.0.1 port.

Every AWS call in the tests goes there (boto3, the AWS CLI, Ansible's amazon.aws modules and the
aws_ec2 inventory plugin) through `AwsEndpoint.env`; no test may talk to real AWS.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from container_hosts import free_port

REGION = "us-east-1"
# Fake credentials: moto accepts any. A test that plants a "secret" uses its own value.
FAKE_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@dataclass
class AwsEndpoint:
    url: str
    process: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None          # moto_server's output: one line per HTTP request it answered

    def client(self, service: str):
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)

    def reset(self) -> None:
        """Forget every resource (moto's reset API), so tests do not see each other's."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def log_size(self) -> int:
        assert self.log is not None
        return self.log.stat().st_size

    def requests_since(self, offset: int) -> list[str]:
        """The HTTP request lines moto logged from byte `offset` of its log up to now.

        moto (werkzeug) logs a request before it sends the answer, so every request answered so
        far is in the log once a marker request sent now is: the log is read (a bounded number of
        times) until the marker's line is there, and the lines before it are returned."""
        assert self.log is not None
        token = f"bpcp-marker-{secrets.token_hex(8)}"
        with contextlib.suppress(urllib.error.HTTPError):     # any answer will do: it is logged
            urllib.request.urlopen(f"{self.url}/moto-api/?{token}", timeout=10).read()
        for _ in range(400):
            with open(self.log, "rb") as fd:
                fd.seek(offset)
                data = fd.read()
            if token.encode() in data:
                before = data[:data.index(token.encode())].rsplit(b"\n", 1)[0]
                return [line.decode(errors="replace") for line in before.splitlines() if b'HTTP/1.1"' in line]
            time.sleep(0.05)
        raise AssertionError(f"moto never logged the marker request {token}; see {self.log}")


def start(log: Path) -> AwsEndpoint:
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    out = open(log, "wb")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not come up on {url}; see {log}") from None
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": url,            # boto3/botocore >= 1.31, AWS CLI v1 >= 1.29
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        # never read the developer's own ~/.aws
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return AwsEndpoint(url, proc, env, log)


def stop(endpoint: AwsEndpoint) -> None:
    endpoint.process.terminate()
    try:
        endpoint.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        endpoint.process.kill()
