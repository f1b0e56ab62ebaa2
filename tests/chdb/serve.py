"""ClickHouse's HTTP interface in front of chdb (a current ClickHouse engine,
in-process), so that weir itself can run against a current release in tests: the
servers Debian ships are 18.16, and chdb has no server of its own.

What weir's ClickHouse client sends is served as ClickHouse serves it: a POST whose
body is the query (`database` and `default_format` in the URL, other URL parameters
are settings), or an INSERT in the `query` parameter with its rows (RowBinary) as the
body; errors answer 500 with ClickHouse's text and `X-ClickHouse-Exception-Code`. Every
statement runs in chdb's engine; only the transport is this file's. An INSERT's rows
reach the engine through the `file()` table function, with the table's own column
types as the structure. Queries run one at a time. Request bodies must not be
compressed (weir's `compression = "none"`).

Usage: serve.py PORT DATA_DIR. Prints "listening" once it serves.
"""

import os
import re
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from chdb import session

# URL parameters that are not settings.
NOT_SETTINGS = {"query", "database", "default_format", "user", "password", "query_id",
                "session_id", "compress", "decompress", "role"}
INSERT = re.compile(r"^\s*INSERT\s+INTO\s+([`\w.]+)\s*\(([^)]*)\)\s*FORMAT\s+(\w+)\s*$",
                    re.IGNORECASE | re.DOTALL)
SETTING = re.compile(r"^\w+$")
CODE = re.compile(r"Code: (\d+)\.")


def quote(value):
    """A setting's value as an SQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Engine:
    def __init__(self, path):
        self.session = session.Session(path)
        self.spool = tempfile.mkdtemp(prefix="rows-", dir=path)
        self.lock = threading.Lock()

    def run(self, sql, fmt, database, settings):
        # A request's settings are its own, as a server's are: the one session takes
        # them for this statement and gets its earlier values back after it (an
        # insert_deduplication_token must not name the next INSERT too).
        with self.lock:
            earlier = {}
            try:
                for name, value in settings.items():
                    if not SETTING.match(name):
                        raise ValueError(f"Code: 115. DB::Exception: Unknown setting {name}")
                    old = self.session.query(
                        f"SELECT value FROM system.settings WHERE name = '{name}'",
                        "TabSeparatedRaw").bytes().decode().rstrip("\n")
                    self.session.query(f"SET {name} = {quote(value)}")
                    earlier[name] = old
                if database:
                    self.session.query(f"USE `{database}`")
                return self.session.query(sql, fmt).bytes()
            finally:
                for name, value in earlier.items():
                    self.session.query(f"SET {name} = {quote(value)}")

    def insert(self, match, rows, database, settings):
        table = match.group(1).replace("`", "")
        db, _, name = table.rpartition(".")
        db = db or database or "default"
        columns = [c.strip().strip("`") for c in match.group(2).split(",")]
        types = self.run(
            f"SELECT name, type FROM system.columns WHERE database = '{db}' AND table = '{name}'",
            "TabSeparated", None, {}).decode()
        known = dict(line.split("\t", 1) for line in types.splitlines() if line)
        if not known:
            raise ValueError(
                f"Code: 60. DB::Exception: Table {db}.{name} does not exist. (UNKNOWN_TABLE)")
        missing = [c for c in columns if c not in known]
        if missing:
            raise ValueError(
                f"Code: 16. DB::Exception: No such column {missing[0]} in table {db}.{name}. (NO_SUCH_COLUMN_IN_TABLE)")
        structure = ", ".join(f"`{c}` {known[c]}" for c in columns)
        fd, path = tempfile.mkstemp(dir=self.spool)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(rows)
            cols = ", ".join(f"`{c}`" for c in columns)
            sql = (f"INSERT INTO `{db}`.`{name}` ({cols}) "
                   f"SELECT * FROM file('{path}', '{match.group(3)}', '{structure}')")
            self.run(sql, "TabSeparated", None, settings)
        finally:
            os.unlink(path)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine = None

    def log_message(self, *args):
        pass

    def answer(self, status, body, code=None):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        if code is not None:
            self.send_header("X-ClickHouse-Exception-Code", code)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(200, b"Ok.\n")

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self):
        params = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        body = self.body()
        database = params.get("database")
        fmt = params.get("default_format", "TabSeparated")
        settings = {k: v for k, v in params.items() if k not in NOT_SETTINGS}
        try:
            if "query" in params:
                match = INSERT.match(params["query"])
                if match and body:
                    self.engine.insert(match, body, database, settings)
                    out = b""
                else:
                    sql = params["query"] + ("\n" + body.decode() if body else "")
                    out = self.engine.run(sql, fmt, database, settings)
            else:
                out = self.engine.run(body.decode(), fmt, database, settings)
        except Exception as e:  # chdb raises its own error type per failure
            text = str(e)
            code = CODE.search(text)
            self.answer(500, (text + "\n").encode(), code.group(1) if code else "1001")
            return
        self.answer(200, out)


def main():
    port, path = int(sys.argv[1]), sys.argv[2]
    Handler.engine = Engine(path)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
