"""Copy an s3:// model repository to a local folder (the chart's init container): the API and
workers read each model's config.pbtxt, rules and gate files from the versions Triton serves.

    python fetch_model_repository.py s3://bucket/prefix /models

Credentials as boto3 finds them (AWS_* variables, the pod's identity); an S3-compatible
server through MEDTRIAGE_S3_ENDPOINT_URL. Exits non-zero, naming the URL, on any failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import boto3


def fetch(url: str, dest: Path) -> int:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SystemExit(f"not an s3://bucket/prefix URL: {url!r}")
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    endpoint = os.environ.get("MEDTRIAGE_S3_ENDPOINT_URL") or None
    s3 = boto3.client("s3", endpoint_url=endpoint)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=parsed.netloc, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) :]
            if not relative or relative.endswith("/"):
                continue
            target = (dest / relative).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise SystemExit(f"refusing key outside the repository: {item['Key']!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(parsed.netloc, item["Key"], str(target))
            count += 1
    if count == 0:
        raise SystemExit(f"no objects under {url}: is the model repository uploaded there?")
    return count


if __name__ == "__main__":
    n = fetch(sys.argv[1], Path(sys.argv[2]))
    print(f"{n} files from {sys.argv[1]} in {sys.argv[2]}")
