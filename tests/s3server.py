"""An S3 server for the storage tests: moto's standalone server, in its own process on 127.0.0.1.

    python tests/s3server.py PORT STATE_DIR

On top of moto's server (the one the s3fs project tests against), for what the tests need to observe:
- credentials are checked (moto's IAM authorisation): user "admin" may do anything, "reader" only read and list;
  their keys are fixed (KEYS), so a restarted server accepts the same clients;
- completed objects are kept in STATE_DIR/objects, so a server killed with SIGKILL and started again still holds
  what S3 would (an unfinished upload is lost, as on S3);
- every request is appended to STATE_DIR/requests.log as "METHOD PATH?QUERY STATUS";
- with $S3_STALL_SUFFIX set, a PUT of a key ending in it touches STATE_DIR/stalled and waits, so that a test can
  kill the server in the middle of that upload.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # read by moto.settings at import: every request authorised
os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")

KEYS = {"admin": {"key": "AKIASTOPSIGNADMIN000", "secret": "admin-secret-for-tests"},
        "reader": {"key": "AKIASTOPSIGNREADER00", "secret": "reader-secret-for-tests"}}
POLICIES = {"admin": ["*"], "reader": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"]}


def main(port: int, state: Path) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from moto.s3.models import s3_backends
    from werkzeug.serving import run_simple

    iam = iam_backends[DEFAULT_ACCOUNT_ID]["global"]
    for user, actions in POLICIES.items():
        iam.create_user("us-east-1", user)
        iam.put_user_policy(user, "access", json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        access_key = iam.create_access_key(user)
        access_key.access_key_id, access_key.secret_access_key = KEYS[user]["key"], KEYS[user]["secret"]
    s3 = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    objects = state / "objects"
    saved: dict[tuple[str, str], str] = {}
    for bucket_dir in sorted(objects.glob("*")) if objects.is_dir() else []:
        s3.create_bucket(bucket_dir.name, "us-east-1")
        for file in sorted(p for p in bucket_dir.iterdir() if not p.name.endswith(".etag")):
            etag = (file.parent / (file.name + ".etag")).read_text()
            s3.put_object(bucket_dir.name, unquote(file.name), file.read_bytes(), etag=etag)
            saved[(bucket_dir.name, unquote(file.name))] = etag
    lock = threading.Lock()

    def persist(bucket_name: str, key_name: str | None) -> None:
        """Keep the state of one key (a PUT, a completed upload, a DELETE) or of one bucket (a bulk delete, a
        new bucket) on disk, each file written atomically."""
        with lock:
            bucket = s3.buckets.get(bucket_name)
            if bucket is None:
                return
            (objects / bucket_name).mkdir(parents=True, exist_ok=True)
            names = [key_name] if key_name else list(bucket.keys.keys())
            gone = [name for (b, name) in saved if b == bucket_name and name not in bucket.keys] if not key_name \
                else ([key_name] if key_name not in bucket.keys else [])
            for name in names:
                if name not in bucket.keys:
                    continue
                key = bucket.keys[name]
                if saved.get((bucket_name, name)) != key.etag:
                    target = objects / bucket_name / quote(name, safe="")
                    for path, data in ((target, key.value), (target.with_name(target.name + ".etag"),
                                                             key.etag.encode())):
                        partial = path.with_name(path.name + ".partial")
                        partial.write_bytes(data)
                        os.replace(partial, path)
                    saved[(bucket_name, name)] = key.etag
            for name in gone:
                target = objects / bucket_name / quote(name, safe="")
                target.unlink(missing_ok=True)
                target.with_name(target.name + ".etag").unlink(missing_ok=True)
                saved.pop((bucket_name, name), None)

    moto_app = DomainDispatcherApplication(create_backend_app)
    stall = os.environ.get("S3_STALL_SUFFIX")
    log_path = state / "requests.log"

    def app(environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        if stall and method == "PUT" and path.endswith(stall):
            (state / "stalled").write_text(path)
            time.sleep(600)  # until the test kills this process
        statuses = []

        def record(status, headers, exc_info=None):
            statuses.append(status)
            return start_response(status, headers, exc_info)

        body = moto_app(environ, record)
        status = statuses[0].split()[0] if statuses else "?"
        if method in ("PUT", "POST", "DELETE") and status.startswith("2"):
            bucket_name, _, key_name = unquote(path).lstrip("/").partition("/")
            persist(bucket_name, key_name if key_name and "delete" not in query else None)
        with lock, open(log_path, "a") as log:
            log.write(f"{method} {path}{'?' + query if query else ''} {status}\n")
        return body

    state.mkdir(parents=True, exist_ok=True)
    (state / "ready").write_text(str(os.getpid()))
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
