"""The one AWS client maker and the one botocore-error translator of bpcp (the controller's side).

- `client(service, region)`: a boto3 client from a session of its own, so credentials, region and
  endpoint are what the environment says now (boto3's normal chain: environment, ~/.aws, the EC2
  instance profile; AWS_ENDPOINT_URL points every client at another endpoint, e.g. moto in the
  tests). Retries are configured here and nowhere else: botocore's standard mode (exponential
  backoff with jitter, throttling and transient errors only), MAX_ATTEMPTS per service.
- `call(fn, what, action)`: fn() with any botocore/boto3 failure raised as one BpcpError line.
- `explain(exc, what, action)`: that line. `what` starts it (an s3:// URL, or what was being done:
  "launch 2 x c6i.large"); `action` is the IAM action the call needs ("s3:GetObject",
  "ec2:RunInstances"): its prefix picks the service's wording, and a refusal names it. No line
  ever echoes a credential.

The job runner downloads S3 images on workers with botocore alone (it is stdlib-only and ships
without bpcp): its client is built in bpcp.jobs.runner.fetch.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from bpcp.errors import BpcpError

T = TypeVar("T")

# Attempts per call, the first one included (botocore's total_max_attempts). S3 moves many objects
# from 8 threads and may answer SlowDown: generous (the first try and 10 retries). EC2 sends
# capacity refusals (spot InsufficientInstanceCapacity) as server errors (HTTP 500), which standard
# mode retries: few, so the on-demand fallback comes soon.
MAX_ATTEMPTS = {"s3": 11, "ec2": 5}
DEFAULT_ATTEMPTS = 5
POOL_CONNECTIONS = 32      # >= the 8 upload/download threads of bpcp.aws.s3, with room

NAMES = {"s3": "S3", "ec2": "EC2"}
NO_CREDENTIALS = {
    "s3": ("no AWS credentials found (looked in the environment, ~/.aws and the EC2 instance profile); "
           "on EC2 attach an instance profile with S3 access, elsewhere run `aws configure` or set AWS_PROFILE"),
    "ec2": "no AWS credentials found; set AWS_PROFILE (or run on a host with an instance role); see docs/aws.md",
}
REJECTED_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                        "InvalidClientTokenId", "AuthFailure")
S3_MISSING_KEY = ("NoSuchKey", "404", "NotFound")
S3_DENIED = ("AccessDenied", "403", "AllAccessDisabled", "AccountProblem")
S3_WRITE = "s3:PutObject"
S3_READ_NEEDS = "s3:GetObject and s3:ListBucket"     # every S3 read bpcp does needs both


def client(service: str, region: str | None = None) -> Any:
    """A boto3 client for service ("s3", "ec2") with bpcp's retries."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS.get(service, DEFAULT_ATTEMPTS)},
                    max_pool_connections=POOL_CONNECTIONS)
    return boto3.session.Session(region_name=region).client(service, config=config)


def call(fn: Callable[[], T], what: str, action: str) -> T:
    """fn(), its AWS failures raised as explain()'s line."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn()
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        raise explain(exc, what, action) from None


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError ('' for anything else)."""
    from botocore.exceptions import ClientError

    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""


def explain(exc: BaseException, what: str, action: str) -> BpcpError:
    """One line for an AWS failure: what, where, and how to fix it."""
    return BpcpError(f"{what}: {_reason(exc, what, action)}")


def _reason(exc: BaseException, what: str, action: str) -> str:
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    service = action.partition(":")[0]
    name = NAMES.get(service, service.upper())
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return NO_CREDENTIALS.get(service, NO_CREDENTIALS["ec2"])
    if isinstance(exc, NoRegionError):
        return "no region; set region: in the config or AWS_REGION"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach the {name} endpoint ({exc}); check the network, the region and AWS_ENDPOINT_URL"
    if type(exc).__name__ == "S3UploadFailedError":     # boto3's upload_file wraps the ClientError
        code = re.search(r"\((\w+)\)", str(exc))
        if code:
            exc = ClientError({"Error": {"Code": code.group(1), "Message": str(exc)}}, "PutObject")
    if not isinstance(exc, ClientError):
        return f"{action} failed ({type(exc).__name__}: {exc})"
    code, message = error_code(exc), str(exc.response.get("Error", {}).get("Message", ""))
    if code in REJECTED_CREDENTIALS:
        return (f"{name} rejected the AWS credentials ({code}); renew or fix them "
                "(`aws configure`, AWS_PROFILE, or the instance profile)")
    if service == "s3":
        return _s3_refusal(code, message, what, action)
    hint = f"; the controller policy in docs/aws.md lists what bpcp needs (here {action})" \
        if "Unauthorized" in code else ""
    return f"AWS refused: {code}: {message}{hint}"


def _s3_refusal(code: str, message: str, url: str, action: str) -> str:
    bucket = url.removeprefix("s3://").partition("/")[0]
    if code == "NoSuchBucket":
        return f"bucket {bucket} does not exist; check the bucket name"
    if code in S3_MISSING_KEY:
        return f"no such object in bucket {bucket}; check the key (S3 keys are case-sensitive)"
    if code in S3_DENIED:
        need = S3_WRITE if action == S3_WRITE else S3_READ_NEEDS
        return f"access denied to these AWS credentials; grant them {need} on bucket {bucket} " \
               "(on EC2: in the instance profile's policy)"
    return f"S3 said {code or 'error'} ({message}); check the URL and your access"
