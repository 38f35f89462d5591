"""A real S3 API on loopback for the tests: moto's standalone server (`python -m moto.server`), an HTTP
server that speaks S3's REST protocol, in its own process.

Helio reaches it the way it reaches AWS: through the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), which pyarrow's S3
filesystem, and so Ray Train and Ray Data, read. Nothing in a Helio config names the endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from tiny_data import free_port


class S3Server:
    def __init__(self, authenticate: bool = False) -> None:
        """`authenticate`: check every request's credentials (moto's IAM), so unknown keys are refused."""
        self.port, self.authenticate = free_port(), authenticate
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "AKIAHELIOTESTS3KEY00",
                "AWS_SECRET_ACCESS_KEY": "helio-test-secret-never-written", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout_s: float = 60) -> "S3Server":
        env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if self.authenticate else {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/moto-api/data.json", timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{self.port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    @staticmethod
    def create_bucket(name: str) -> str:
        """A new bucket (through the environment's endpoint and credentials); its s3:// URI."""
        import pyarrow.fs as pafs

        fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")  # reads AWS_ENDPOINT_URL
        fs.create_dir(name)
        return f"s3://{name}"
