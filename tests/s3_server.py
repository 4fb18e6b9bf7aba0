"""An S3-compatible server for the tests: moto's server mode (`moto[server]`, the dev extra) in a
process of its own on 127.0.0.1, stopped at the end. Clients find it the usual way: the environment
variables boto and s3fs read (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ACCESS_KEY = "flux-prep-test-access-key"
SECRET_KEY = "flux-prep-test-secret-key-never-written"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's S3 server did not start on port {self.port}")
                time.sleep(0.1)

    def env(self) -> dict:
        """What a client of this server needs in its environment."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def options(self) -> dict:
        """The same as fsspec storage options (for a client whose environment has none of it)."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint}}

    def bucket(self, name: str) -> str:
        """A new, empty bucket; returns its s3:// URL."""
        import s3fs
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.options())
        fs.mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def without_s3_env() -> dict:
    """os.environ without the S3 variables (a process that must get them from storage options)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
