"""EC2 test helpers: configs, and a local HTTP proxy in front of moto that refuses spot requests.

moto launches every spot request it gets. The proxy answers a RunInstances that asks for spot
with EC2's own XML error (InsufficientInstanceCapacity, HTTP 500 as EC2 sends it) and forwards
everything else to moto unchanged, so bpcp's on-demand fallback runs against a real endpoint.
"""
from __future__ import annotations

import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

BASE_CONFIG = {"run": "test-run", "region": "us-east-1", "ami": "ami-12c6146b", "instance_type": "c6i.large",
               "market": "spot", "key_name": "bpcp-test",
               "iam_instance_profile": "bpcp-worker", "root_volume_gb": 20, "user_data": "prepare",
               "tags": {"project": "bpcp-tests"}}

SPOT_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>InsufficientInstanceCapacity'
              b'</Code><Message>There is no Spot capacity available that matches your request.</Message></Error>'
              b'</Errors><RequestID>bpcp-test-proxy</RequestID></Response>')


def write_config(path: Path, **changes) -> Path:
    doc = {**BASE_CONFIG, **changes}
    path.write_text(yaml.safe_dump({k: v for k, v in doc.items() if v is not None}))
    return path


class SpotRefusingProxy:
    """http://127.0.0.1:PORT -> moto; spot RunInstances refused. `refused` counts the refusals."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                form = urllib.parse.parse_qs(body.decode(errors="replace"))
                if form.get("Action") == ["RunInstances"] and form.get("InstanceMarketOptions.MarketType") == ["spot"]:
                    proxy.refused += 1
                    return self._answer(500, {"Content-Type": "text/xml"}, SPOT_ERROR)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                req = urllib.request.Request(proxy.upstream + self.path, data=body or None, headers=headers,
                                             method=self.command)
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        self._answer(resp.status, dict(resp.headers), resp.read())
                except urllib.error.HTTPError as exc:
                    self._answer(exc.code, dict(exc.headers), exc.read())

            def _answer(self, status: int, headers: dict, body: bytes):
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
