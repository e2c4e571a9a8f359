"""A controllable process tree for the real-kernel tests.

Run as a program, it reads one command per line on stdin and answers one JSON
line on stdout, so a test can make the tree grow at exactly the moment it
wants (e.g. while elsad is down). ``Tree`` drives it from a test and kills
every pid it created, by pid, at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

PROGRAM = os.path.abspath(__file__)


def _sleep_forever() -> None:
    # Die with the test even if teardown is skipped: poll for the root's death.
    root = int(os.environ.get("TREE_ROOT", "0"))
    for _ in range(6000):
        time.sleep(0.1)
        if root and not os.path.exists(f"/proc/{root}"):
            break
    os._exit(0)


def _fork(body) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def serve() -> None:
    os.environ["TREE_ROOT"] = str(os.getpid())
    out = sys.stdout

    def reply(**kw) -> None:
        out.write(json.dumps(kw) + "\n")
        out.flush()

    reply(ready=os.getpid())
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "child":
            reply(pids=[_fork(_sleep_forever)])
        elif cmd == "grandchild":
            r, w = os.pipe()

            def middle(w: int = w) -> None:
                gc = _fork(_sleep_forever)
                os.write(w, f"{gc}\n".encode())
                _sleep_forever()

            mid = _fork(middle)
            gc = int(os.read(r, 64))
            os.close(r)
            os.close(w)
            reply(pids=[mid, gc])
        elif cmd == "daemon":
            # Classic double fork + setsid: the daemon is re-parented to init.
            r, w = os.pipe()

            def first(w: int = w) -> None:
                os.setsid()
                d = _fork(_sleep_forever)
                os.write(w, f"{d}\n".encode())
                os._exit(0)

            f = _fork(first)
            d = int(os.read(r, 64))
            os.waitpid(f, 0)
            os.close(r)
            os.close(w)
            reply(pids=[d], exited=[f])
        elif cmd == "exec":
            p = subprocess.Popen(["sh", "-c", "exec sh -c 'exec sleep 600'"])
            reply(pids=[p.pid])
        elif cmd == "threads":
            n = int(args[0])
            r, w = os.pipe()

            def threaded(w: int = w, n: int = n) -> None:
                ts = [threading.Thread(target=time.sleep, args=(600,), daemon=True)
                      for _ in range(n)]
                for t in ts:
                    t.start()
                os.write(w, b"x")
                _sleep_forever()

            pid = _fork(threaded)
            os.read(r, 1)
            reply(pids=[pid])
        elif cmd == "exit":
            code = int(args[0])
            pid = _fork(lambda code=code: os._exit(code))
            _, status = os.waitpid(pid, 0)
            reply(exited=[pid], status=status)
        elif cmd == "storm":
            n = int(args[0])
            for _ in range(n):
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
            reply(done=n)
        elif cmd == "reap":
            reaped = []
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                reaped.append(pid)
            reply(reaped=reaped)
        elif cmd == "quit":
            reply(bye=True)
            return
        else:
            reply(error=f"unknown command {cmd}")


class Tree:
    """Drives a tree.py process from a test."""

    def __init__(self, start_new_session: bool = True) -> None:
        self.proc = subprocess.Popen([sys.executable, PROGRAM], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     start_new_session=start_new_session)
        self.pid = self.proc.pid
        self.created: List[int] = [self.pid]
        hello = self._read()
        assert hello["ready"] == self.pid

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("tree process died")
        return json.loads(line)

    def cmd(self, line: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        res = self._read()
        self.created += res.get("pids", [])
        return res

    def close(self, extra: Optional[List[int]] = None) -> None:
        for pid in list(self.created) + list(extra or []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)


def live_descendants(root: int, proc_root: str = "/proc") -> List[int]:
    """Every live (non-zombie) descendant of *root* by ppid, from /proc."""
    children = {}
    for name in os.listdir(proc_root):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc_root}/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()
        if rest[0] == b"Z":
            continue
        children.setdefault(int(rest[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return sorted(out)


if __name__ == "__main__":
    serve()
