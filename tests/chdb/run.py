"""Runs SQL statements on chdb (a current ClickHouse engine, in-process) and checks
answers: the current-release half of tests/chdb.rs.

Reads a JSON array from stdin: {"what": label, "sql": statement, "expect": text or
null}. Runs each in order in one session (a fresh directory), prints one line per
statement ("ok", its label, and its answer when one is expected), and exits 1 at the
first statement that fails or answers otherwise than expected.
"""

import json
import sys
import tempfile

from chdb import session


def main() -> int:
    statements = json.load(sys.stdin)
    with tempfile.TemporaryDirectory(prefix="weir-chdb-") as path:
        s = session.Session(path)
        version = str(s.query("SELECT version()", "TabSeparated")).strip()
        print(f"chdb {version}: {len(statements)} statements", flush=True)
        for n, st in enumerate(statements, 1):
            try:
                answer = str(s.query(st["sql"], "TabSeparated")).strip()
            except Exception as e:  # chdb raises its own error type per failure
                print(f"FAILED {n} {st['what']}: {e}\n{st['sql']}", flush=True)
                return 1
            expect = st.get("expect")
            if expect is not None and answer != expect:
                print(
                    f"FAILED {n} {st['what']}: answered {answer!r}, want {expect!r}\n{st['sql']}",
                    flush=True,
                )
                return 1
            shown = f" -> {answer}" if expect is not None else ""
            print(f"ok {n} {st['what']}{shown}", flush=True)
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
