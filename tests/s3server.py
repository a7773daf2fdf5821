"""moto's S3 server on 127.0.0.1 in its own process, logging every request it serves.

Run: ``python tests/s3server.py --log FILE`` prints ``PORT <n>`` once it listens. Each request is
appended to FILE as one JSON line (method, path, query, Range, If-Match, status), so tests can
assert exactly which bytes a load asked for, as seen on the wire by the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server


class RequestLog:
    def __init__(self, app: Any, path: str) -> None:
        self.app = app
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        record = {
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO"),
            "query": environ.get("QUERY_STRING", ""),
            "range": environ.get("HTTP_RANGE"),
            "if_match": environ.get("HTTP_IF_MATCH"),
        }

        def logging_start_response(status: str, headers: Any, *args: Any) -> Any:
            record["status"] = int(status.split()[0])
            with self.lock, open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            return start_response(status, headers, *args)

        return self.app(environ, logging_start_response)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    app = RequestLog(DomainDispatcherApplication(create_backend_app), args.log)
    server = make_server(
        "127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler
    )
    sys.stdout.write(f"PORT {server.server_address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
