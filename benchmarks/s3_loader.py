"""The training loader streaming from object storage against local disk, in one run.

Starts an S3-compatible server (moto's, from the test extra) on 127.0.0.1, copies the training split of SHARDS
into a bucket on it, and runs `distpose bench loader --remote s3://...` as a user would, so the JSON holds the
1-worker rate from both copies, measured alternately, and their ratio:

    python benchmarks/s3_loader.py data/shards --out benchmarks/results/loader-s3-256x192-cpu2.json \
        data.input_size=[256,192] data.heatmap_size=[64,48]

Loopback has no network latency or bandwidth limit: what this measures is the reader's own cost (the S3
client, the server's HTTP, buffering), not a real bucket's distance.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER_START_S = 60
BUCKET = "distpose-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "distpose-bench", "AWS_SECRET_ACCESS_KEY": "distpose-bench",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                sys.exit(f"s3_loader: the S3 server did not start in {SERVER_START_S} s: {log.read_text()[-500:]}")
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="a local shard directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", help="where bench loader also writes its JSON")
    parser.add_argument("overrides", nargs="*", help="bench loader's config overrides: data.input_size=[256,192]")
    args = parser.parse_intermixed_args()
    os.environ.update(CREDENTIALS)
    with tempfile.TemporaryDirectory(prefix="distpose-s3-bench-") as scratch:
        server, endpoint = start_server(Path(scratch) / "server.log")
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        try:
            import boto3

            from distpose.data.shards import manifest_path, read_manifest
            from distpose.files import join, upload

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            remote = f"s3://{BUCKET}/shards"
            for shard in read_manifest(args.shards, args.split)["shards"]:
                upload(Path(args.shards) / shard["name"], join(remote, shard["name"]))
            upload(Path(manifest_path(args.shards, args.split)), manifest_path(remote, args.split))
            command = [sys.executable, "-m", "distpose", "bench", "loader", f"data.shards={args.shards}",
                       f"data.train_split={args.split}", *args.overrides, "--remote", remote]
            command += ["--out", args.out] if args.out else []
            sys.exit(subprocess.run(command, check=False).returncode)
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
