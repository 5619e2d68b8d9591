#!/usr/bin/env python3
"""A cloud's instance metadata service, as much of it as a pod VM reads: its user data.

Listens on 169.254.169.254:80 inside the test's own network namespace. Each flavour answers as
its cloud documents it and refuses a request without what that cloud requires:

- aws: IMDSv2. PUT /latest/api/token with X-aws-ec2-metadata-token-ttl-seconds (1 to 21600)
  gives a session token; GET /latest/user-data needs it in X-aws-ec2-metadata-token (401
  otherwise); IMDSv1 (no token) is refused, as on an instance that requires IMDSv2.
- azure: GET /metadata/instance/compute/userData?api-version=2021-01-01&format=text with
  `Metadata: true` (400 otherwise) answers the user data in base64.

Every request is appended to --log as a JSON line (method, path, the headers that matter).
"""

import argparse
import base64
import json
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    args = None
    tokens = set()
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def reply(self, status, body=b"", ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def record(self):
        keep = ("Metadata", "X-aws-ec2-metadata-token", "X-aws-ec2-metadata-token-ttl-seconds")
        # Header names are case-insensitive: recorded as `keep` spells them.
        entry = {"method": self.command, "path": self.path, "headers": {k: self.headers[k] for k in keep if k in self.headers}}
        with self.lock, open(self.args.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def user_data(self):
        with open(self.args.user_data, "rb") as f:
            return f.read()

    def do_PUT(self):
        self.record()
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        url = urllib.parse.urlsplit(self.path)
        flavour = self.args.flavour
        if flavour == "aws" and url.path == "/latest/api/token":
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return self.reply(400, b"missing or bad X-aws-ec2-metadata-token-ttl-seconds")
            token = uuid.uuid4().hex
            self.tokens.add(token)
            return self.reply(200, token.encode())
        self.reply(404, b"not found")

    def do_GET(self):
        self.record()
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query)
        flavour = self.args.flavour
        if flavour == "aws" and url.path == "/latest/user-data":
            if self.headers.get("X-aws-ec2-metadata-token") not in self.tokens:
                return self.reply(401, b"")
            return self.reply(200, self.user_data(), "application/octet-stream")
        if flavour == "azure" and url.path == "/metadata/instance/compute/userData":
            if self.headers.get("Metadata") != "true":
                return self.reply(400, b'{"error": "Bad request. Required metadata header not specified"}', "application/json")
            if q.get("api-version") != ["2021-01-01"] or q.get("format") != ["text"]:
                return self.reply(400, b'{"error": "Bad request. api-version or format invalid"}', "application/json")
            return self.reply(200, base64.b64encode(self.user_data()))
        self.reply(404, b"not found")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavour", choices=["aws", "azure"], required=True)
    p.add_argument("--user-data", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--listen", default="169.254.169.254")
    Handler.args = p.parse_args()
    server = ThreadingHTTPServer((Handler.args.listen, 80), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
