#!/usr/bin/env python3
"""moat's git front inside the git service VM: smart HTTP (git http-backend) for the VMs on this
network. Every request carries a VM's own credentials (HTTP basic: the VM id and the token moat
installed in that VM); it must come from that VM's address, and it may touch only repositories
of the VM's owner. Anything else is refused here, whatever the client is.

moat rewrites ACCESS whole (atomically) when repositories, VMs or tokens change; it is read on
every request, so a revoked VM is refused at once. Logs go to stderr (the VM's console): the
request line and status, never a header or a credential.
"""
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.environ.get("MOAT_GIT_ROOT", "/workspaces/repos")
REPOS = os.path.join(ROOT, "git")
ACCESS = os.path.join(ROOT, "access.json")
PORT = int(os.environ.get("MOAT_GIT_PORT", "80"))
MAX_BODY = 1 << 30
PATH = re.compile(
    r"^/([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)\.git(/(?:info/refs|git-upload-pack|git-receive-pack|HEAD))$"
)


def access():
    try:
        with open(ACCESS, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {"repos": {}, "users": {}}


class Handler(BaseHTTPRequestHandler):
    server_version = "moat-git"
    # One response per connection: the CGI's output is copied until it ends.
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):
        sys.stderr.write("moat-git: %s %s\n" % (self.client_address[0], fmt % args))

    def refuse(self, code, text, challenge=False):
        body = (text + "\n").encode()
        self.send_response(code)
        if challenge:
            self.send_header("WWW-Authenticate", 'Basic realm="moat git"')
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def caller(self, table):
        """(vm id, its entry) when the request's credentials are a VM's and come from its address."""
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        try:
            name, _, secret = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except ValueError:
            return None
        entry = table.get("users", {}).get(name)
        if not entry:
            return None
        digest = hashlib.sha256(secret.encode()).hexdigest()
        if not hmac.compare_digest(digest, entry.get("sha256", "")):
            return None
        if entry.get("ip") != self.client_address[0]:
            return None
        return name, entry

    def body(self):
        """The request body in a file, de-chunked; None (after answering) when it is too large."""
        spool = tempfile.TemporaryFile()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    break
                total += size
                if total > MAX_BODY:
                    self.refuse(413, "request too large")
                    return None
                spool.write(self.rfile.read(size))
                self.rfile.readline()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.refuse(413, "request too large")
                return None
            left = length
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                spool.write(chunk)
                left -= len(chunk)
        spool.seek(0)
        return spool

    def do_GET(self):
        self.serve()

    def do_POST(self):
        self.serve()

    def serve(self):
        path, _, query = self.path.partition("?")
        match = PATH.match(path)
        if not match:
            return self.refuse(404, "not a repository path")
        repo = match.group(1)
        table = access()
        who = self.caller(table)
        if who is None:
            return self.refuse(401, "credentials required", challenge=True)
        vm, entry = who
        owner = table.get("repos", {}).get(repo)
        # Someone else's repository reads exactly as a missing one.
        if owner is None or owner != entry.get("owner") or not os.path.isdir(os.path.join(REPOS, repo + ".git")):
            return self.refuse(404, "repository not found")
        spool = self.body()
        if spool is None:
            return
        size = os.fstat(spool.fileno()).st_size
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/root",
            "GIT_PROJECT_ROOT": REPOS,
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(size),
            "REMOTE_USER": vm,
            "REMOTE_ADDR": self.client_address[0],
            "GIT_HTTP_MAX_REQUEST_BUFFER": str(MAX_BODY),
        }
        for header in ("Git-Protocol", "Content-Encoding"):
            if self.headers.get(header):
                env["HTTP_" + header.upper().replace("-", "_")] = self.headers[header]
        proc = subprocess.Popen(["git", "http-backend"], stdin=spool, stdout=subprocess.PIPE, env=env)
        status, headers = 200, []
        while True:
            line = proc.stdout.readline().decode("latin-1").rstrip("\r\n")
            if not line:
                break
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            else:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        shutil.copyfileobj(proc.stdout, self.wfile)
        proc.wait()
        spool.close()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        import socket

        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


def main():
    os.makedirs(REPOS, exist_ok=True)
    server = Server(("0.0.0.0", PORT), Handler)
    sys.stderr.write("moat-git: serving %s on port %d\n" % (REPOS, PORT))
    server.serve_forever()


if __name__ == "__main__":
    main()
