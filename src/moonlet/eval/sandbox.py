"""Run untrusted candidate programs: one process per candidate, contained, with a verdict and a reason.

Layers (each one holds on its own; together they hold when one is missing):
  1. a separate process in its own session, whole process group SIGKILLed at the end, wall-clock limit;
  2. `unshare` when it works here: a fresh network namespace (no interfaces but a down loopback: no
     network at all), a pid namespace (the candidate sees no host process; when its pid-1 supervisor
     exits the kernel kills everything left) and a mount namespace with a private tmpfs /tmp as the
     fresh working directory;
  3. rlimits: CPU seconds, address space, file size, process count, open files, no core dumps;
  4. running as root: the candidate drops to a uid of its own (file permissions protect the host and
     RLIMIT_NPROC, which root ignores, applies per sandbox slot);
  5. a Python audit hook that refuses sockets, writes outside the work dir, process creation, signals
     to other processes and ctypes (see _sandbox_child.py).

Verdict channel: the child writes a JSON verdict to a file opened before the candidate runs; no file
means the process died first, and the harness names why (timeout, CPU limit, memory, signal).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

_CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
_UID_BASE = 1_900_000_000  # sandbox uids (root only): far from any real account


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall clock for the whole process, seconds
    cpu_seconds: float | None = None  # RLIMIT_CPU; default: timeout
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE (also caps stdout/stderr, which go to files)
    max_processes: int = 32  # RLIMIT_NPROC (per sandbox uid / user namespace)
    max_open_files: int = 64
    tmpfs_mb: int = 64  # size of the private /tmp
    test_timeout: float = 5.0  # per stdin/stdout test case
    output_kb: int = 32  # stdout/stderr kept in the result


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "killed" | "error"
    reason: str
    duration: float
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    violations: list[str] = field(default_factory=list)
    tests_passed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# isolation probing


def _unshare_variants() -> list[tuple[list[str], bool]]:
    """(command prefix, has a private mount namespace), strongest first."""
    if not shutil.which("unshare"):
        return []
    base = ["unshare"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user"]
    return [
        (base + ["--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--"], True),
        (base + ["--net", "--pid", "--fork", "--kill-child", "--"], False),
        (base + ["--net", "--"], False),
    ]


@functools.lru_cache(maxsize=None)
def isolation_prefix(mode: str = "auto") -> tuple[tuple[str, ...], bool]:
    """The strongest `unshare` invocation that works on this machine (probed once), or () when none
    does or mode == "none"."""
    if mode == "none":
        return (), False
    for prefix, private in _unshare_variants():
        try:
            r = subprocess.run(prefix + [sys.executable, "-I", "-S", "-c", "pass"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return tuple(prefix), private
    if mode == "require":
        raise RuntimeError("no working `unshare` on this machine (network/pid namespaces unavailable)")
    return (), False


def interpreter_under_tmp() -> bool:
    """The child never mounts its tmpfs over the interpreter: with the venv or the checkout under
    /tmp (a CI clone in a temp dir), /tmp stays the host's, and only the uid drop and the Python
    guard stand between a candidate and it (a world-writable /tmp is open to any uid)."""
    paths = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    paths += [p for p in sys.path if p and os.path.isdir(p)]
    return any(os.path.realpath(p) == "/tmp" or os.path.realpath(p).startswith("/tmp/") for p in paths)


def describe_isolation(mode: str = "auto") -> str:
    prefix, private = isolation_prefix(mode)
    private = private and not interpreter_under_tmp()
    parts = []
    if prefix:
        parts.append("network namespace")
        if "--pid" in prefix:
            parts.append("pid namespace")
        if private:
            parts.append("private /tmp")
    else:
        parts.append("no namespaces")
    if os.geteuid() == 0:
        parts.append("unprivileged uid")
    parts.append("rlimits")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# the sandbox


_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGKILL: "killed (SIGKILL: CPU hard limit or out of memory)",
    signal.SIGSEGV: "crashed (SIGSEGV)",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGBUS: "crashed (SIGBUS)",
}


class Sandbox:
    """Runs programs in contained processes. Thread-safe; `run_many` runs several in parallel.

    guard=False turns off the in-process Python guard (layer 5) to test the OS layers alone.
    isolation: "auto" (namespaces when available), "none", or "require" (error when unavailable).
    """

    def __init__(self, limits: Limits | None = None, *, isolation: str = "auto", guard: bool = True,
                 allow_subprocess: bool = False, python: str | None = None, slots: int = 64):
        self.limits = limits or Limits()
        self.isolation = isolation
        self.guard = guard
        self.allow_subprocess = allow_subprocess
        self.python = python or sys.executable
        self._prefix, self._private_tmp = isolation_prefix(isolation)
        self._slots: queue.Queue[int] = queue.Queue()
        for s in range(slots):
            self._slots.put(s)

    # public entry points ---------------------------------------------------------------------
    def run_check(self, program: str, limits: Limits | None = None) -> SandboxResult:
        """HumanEval style: `program` ends with the tests (e.g. `check(entry_point)`); passes when it
        runs to the end without an exception."""
        return self._run({"mode": "check", "program": program}, limits)

    def run_stdio(self, program: str, tests: Sequence[dict], limits: Limits | None = None) -> SandboxResult:
        """LiveCodeBench style: run `program` once per test with `input` on stdin; stdout must match
        `output` (token-wise per line). Stops at the first failing test."""
        tests = [{"input": str(t["input"]), "output": str(t["output"])} for t in tests]
        lim = limits or self.limits
        # the wall clock must cover every test
        lim = replace(lim, timeout=max(lim.timeout, lim.test_timeout * len(tests) + 1.0))
        return self._run({"mode": "stdio", "program": program, "tests": tests}, lim)

    def run_script(self, program: str, limits: Limits | None = None) -> SandboxResult:
        """Run a program; passes when it ends normally."""
        return self._run({"mode": "script", "program": program}, limits)

    def run_many(self, jobs: Iterable[Callable[["Sandbox"], SandboxResult]], workers: int = 2,
                 on_result: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
        """Run jobs (callables taking this sandbox) in parallel; results in input order."""
        jobs = list(jobs)
        out: list[SandboxResult | None] = [None] * len(jobs)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
            futs = {ex.submit(job, self): i for i, job in enumerate(jobs)}
            for fut in futs:
                i = futs[fut]
                out[i] = fut.result()
                if on_result:
                    on_result(i, out[i])
        return out  # type: ignore[return-value]

    # the process ------------------------------------------------------------------------------
    def _run(self, spec: dict, limits: Limits | None = None) -> SandboxResult:
        lim = limits or self.limits
        slot = self._slots.get()
        tmp = Path(tempfile.mkdtemp(prefix="moonlet-sbx-"))
        try:
            return self._run_in(spec, lim, slot, tmp)
        finally:
            self._slots.put(slot)
            shutil.rmtree(tmp, ignore_errors=True)

    def _run_in(self, spec: dict, lim: Limits, slot: int, tmp: Path) -> SandboxResult:
        os.chmod(tmp, 0o711)  # the dropped uid must reach work/ (and nothing else here)
        work = tmp / "work"
        work.mkdir()
        limits = asdict(lim)
        limits["cpu_seconds"] = lim.cpu_seconds if lim.cpu_seconds is not None else lim.timeout
        spec = dict(spec, workdir=str(work), limits=limits, guard=self.guard,
                    allow_subprocess=self.allow_subprocess, private_tmp=self._private_tmp,
                    uid=_UID_BASE + (os.getpid() % 500_000) * 64 + slot % 64 if os.geteuid() == 0 else None)
        (tmp / "spec.json").write_text(json.dumps(spec))
        result_path = tmp / "result.json"
        result_path.touch()
        cmd = [*self._prefix, self.python, "-I", "-B", _CHILD, str(tmp / "spec.json"), str(result_path)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        t0 = time.monotonic()
        deadline = t0 + lim.timeout + 0.5  # + interpreter start-up
        timed_out = False
        with open(tmp / "stdout", "wb") as out_f, open(tmp / "stderr", "wb") as err_f:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, env=env,
                                        cwd=str(work), start_new_session=True, close_fds=True)
            except OSError as e:
                return SandboxResult(False, "error", f"could not start the sandbox: {e}", 0.0)
            try:
                timed_out = not _wait_no_reap(proc.pid, deadline)
            finally:
                # the whole group, even after a normal exit (background children), before reaping so
                # the group id cannot have been reused
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                _wait_group_gone(proc.pid, 1.0)
        duration = time.monotonic() - t0
        stdout = _read_head(tmp / "stdout", lim.output_kb)
        stderr = _read_head(tmp / "stderr", lim.output_kb)
        code = proc.returncode
        try:
            verdict = json.loads(result_path.read_text() or "null")
        except (json.JSONDecodeError, OSError):
            verdict = None
        if timed_out:
            return SandboxResult(False, "timeout", f"timeout: wall-clock limit of {lim.timeout:g}s exceeded",
                                 duration, code, stdout, stderr)
        if isinstance(verdict, dict) and "passed" in verdict:
            return SandboxResult(bool(verdict["passed"]), "passed" if verdict["passed"] else "failed",
                                 str(verdict.get("reason", "")), duration, code, stdout, stderr,
                                 list(verdict.get("violations", [])), verdict.get("tests_passed"))
        sig = -code if code is not None and code < 0 else (code - 128 if code and code > 128 else None)
        if sig in _SIGNAL_REASONS:
            return SandboxResult(False, "killed", _SIGNAL_REASONS[sig], duration, code, stdout, stderr)
        if sig:
            return SandboxResult(False, "killed", f"killed by signal {sig}", duration, code, stdout, stderr)
        tail = stderr.strip().splitlines()[-1][:200] if stderr.strip() else ""
        if code == 0:
            why = "no verdict: the process ended before the tests finished (os._exit or similar)"
        else:
            why = f"no verdict: sandbox process exited with status {code}" + (f" ({tail})" if tail else "")
        return SandboxResult(False, "error", why, duration, code, stdout, stderr)


def _wait_no_reap(pid: int, deadline: float) -> bool:
    """Wait until the process exits (True) or the deadline passes (False), without reaping it."""
    delay = 0.001
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 1.5, 0.02)


def _wait_group_gone(pgid: int, seconds: float) -> None:
    """SIGKILL is asynchronous: give a killed group (e.g. a fork bomb) a moment to disappear so the
    next candidate does not share the CPU with its remains. Bounded: zombies may linger."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if not _live_members(pgid):
            return  # only zombies left: their new parent reaps them
        time.sleep(0.01)


def _live_members(pgid: int) -> bool:
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _read_head(path: Path, kb: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(kb * 1024).decode("utf-8", "replace")
    except OSError:
        return ""
