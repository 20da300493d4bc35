"""The program that runs inside a sandbox process (see sandbox.py). Standard library only: it must
start fast and must not import moonlet or torch.

    python -I -B _sandbox_child.py SPEC.json RESULT.json

Process layout (inside `unshare --pid --fork` this process is pid 1 of a fresh pid namespace):
  supervisor: forks the worker, reaps every child until the worker ends, exits with its status.
              When pid 1 exits the kernel kills everything left in the namespace.
  worker:     private /tmp (mount namespace), work dir, rlimits, drops root to a sandbox uid, installs
              the Python guard (audit hook), runs the candidate, writes RESULT.json, `_exit`s.
The result file is opened before any of that, so the candidate cannot reach the host filesystem to
write it (a candidate that exits early simply leaves no verdict, which the harness reports).
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import sys
import traceback

# ---------------------------------------------------------------------------------------------
# setup (worker, before the candidate runs)


_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC = 2, 4, 4096, 16384


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _mount(libc, src: str, target: str, fstype: str | None, flags: int, data: str | None) -> bool:
    return libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                      data.encode() if data else None) == 0


def _interpreter_paths() -> list[str]:
    paths = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    paths += [p for p in sys.path if p and os.path.isdir(p)]
    return sorted({os.path.realpath(p) for p in paths})


def _closed_ancestor(path: str) -> str | None:
    """The first directory on the way to `path` that other users cannot enter (or, for `path`
    itself, list), or None."""
    import stat

    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        try:
            mode = os.stat(d).st_mode
        except OSError:
            return None
        need = stat.S_IXOTH | (stat.S_IROTH if i == len(parts) else 0)
        if mode & need != need:
            return d
    return None


def _expose_interpreter(libc) -> bool:
    """Make the interpreter readable for an unprivileged uid without touching the host: a closed
    directory on the way (e.g. /root, mode 0700, holding ~/.pyenv) is covered with a 0755 tmpfs into
    which only the needed subdirectories are bind-mounted back (via O_PATH fds, taken before the
    cover hides them). True when every interpreter path is reachable afterwards."""
    needed = _interpreter_paths()
    for _ in range(8):
        blocked = next(((d, p) for p in needed if (d := _closed_ancestor(p))), None)
        if blocked is None:
            return True
        closed, leaf = blocked
        if closed == leaf:
            return False
        kids = sorted({closed + "/" + q[len(closed) + 1:].split("/")[0] for q in needed if q.startswith(closed + "/")})
        fds = {k: os.open(k, os.O_PATH) for k in kids}
        try:
            if not _mount(libc, "tmpfs", closed, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755"):
                return False
            for k, fd in fds.items():
                os.mkdir(k, 0o755)
                if not _mount(libc, f"/proc/self/fd/{fd}", k, None, _MS_BIND | _MS_REC, None):
                    return False
        finally:
            for fd in fds.values():
                os.close(fd)
    return False


def _mount_private_tmp(spec: dict, libc) -> str | None:
    """A fresh tmpfs over /tmp, /var/tmp, /dev/shm (root of a private mount namespace only).
    Returns the new work dir, or None when not possible (the harness' dir is used instead)."""
    size = f"size={int(spec['limits']['tmpfs_mb'])}m,mode=1777"
    roots = _interpreter_paths()
    work = None
    for target in ("/tmp", "/var/tmp", "/dev/shm"):
        if not os.path.isdir(target) or any(r == target or r.startswith(target + "/") for r in roots):
            continue  # never hide the interpreter
        if not _mount(libc, "tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, size):
            if target == "/tmp":
                return None
            continue
        if target == "/tmp":
            work = "/tmp/work"
            os.mkdir(work, 0o700)
    return work


def _set_limits(limits: dict) -> None:
    def lim(res, soft, hard=None):
        hard = soft if hard is None else hard
        try:
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):
            pass

    mb = 1024 * 1024
    lim(resource.RLIMIT_AS, int(limits["memory_mb"]) * mb)
    cpu = max(1, int(limits["cpu_seconds"] + 0.999))
    lim(resource.RLIMIT_CPU, cpu, cpu + 1)
    lim(resource.RLIMIT_FSIZE, int(limits["file_size_mb"]) * mb)
    # RLIMIT_NPROC counts every process of the real uid. A sandbox uid (root) or a fresh user
    # namespace starts near zero; a plain unprivileged user gets headroom over what it already runs.
    nproc = int(limits["max_processes"])
    if os.geteuid() != 0:
        nproc += _processes_of(os.getuid())
    lim(resource.RLIMIT_NPROC, nproc)
    lim(resource.RLIMIT_NOFILE, int(limits["max_open_files"]))
    lim(resource.RLIMIT_CORE, 0)


def _processes_of(uid: int) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _drop_root(spec: dict, work: str, libc) -> None:
    """Real root only (not root of a user namespace): become an unprivileged uid for this sandbox, so
    file permissions protect the host and RLIMIT_NPROC applies (it is not enforced for root)."""
    uid = spec.get("uid")
    if os.geteuid() != 0 or uid is None:
        return
    try:
        with open("/proc/self/uid_map") as f:
            fields = f.read().split()
        if fields != ["0", "0", "4294967295"]:
            return  # inside a user namespace: there are no other ids to switch to
    except OSError:
        pass
    if not _expose_interpreter(libc) if (libc and spec.get("private_tmp")) else \
            any(_closed_ancestor(p) for p in _interpreter_paths()):
        return  # an unprivileged uid could not even import the standard library: stay as we are
    os.chown(work, uid, uid)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


# ---------------------------------------------------------------------------------------------
# the Python guard: an audit hook (cannot be removed once installed)


class SandboxViolation(PermissionError):
    pass


def _install_guard(work: str, violations: list[str], allow_subprocess: bool) -> None:
    work = os.path.realpath(work)
    me = os.getpid()
    busy = [False]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    path_events = {
        "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
        "os.link", "os.symlink", "os.rename", "shutil.rmtree", "shutil.copyfile", "shutil.copymode",
        "shutil.copystat", "shutil.copytree", "shutil.move", "shutil.chown", "os.chflags", "os.lchflags",
        "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr",
    }
    spawn_events = {
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
        "os.startfile", "pty.spawn",
    }

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an fd the process already holds
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return p == work or p.startswith(work + os.sep) or p == "/dev/null"

    def deny(reason: str):
        violations.append(reason)
        raise SandboxViolation(f"sandbox: {reason}")

    def hook(event: str, args: tuple) -> None:
        if busy[0]:
            return
        busy[0] = True
        try:
            if event == "open":
                path, mode, flags = args
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                    (isinstance(flags, int) and flags & write_flags)
                if writing and not inside(path):
                    deny(f"write outside the working directory blocked: {os.fsdecode(path)}")
            elif event in path_events:
                for a in args[:2]:
                    if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                        deny(f"{event} outside the working directory blocked: {os.fsdecode(a)}")
            elif event.startswith("socket."):
                deny(f"network access blocked ({event})")
            elif event in spawn_events and not allow_subprocess:
                deny(f"process creation blocked ({event})")
            elif event == "os.kill":
                if args[0] != me:
                    deny(f"signal to another process blocked (pid {args[0]})")
            elif event == "os.killpg":
                deny("signal to a process group blocked")
            elif event in ("ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle"):
                deny("ctypes blocked")
        finally:
            busy[0] = False

    sys.addaudithook(hook)


# ---------------------------------------------------------------------------------------------
# running the candidate


class _TestTimeout(BaseException):
    pass


def _run_source(source: str, stdin_text: str | None = None) -> tuple[str | None, str]:
    """exec the source as __main__; returns (error or None, captured stdout when stdin_text given)."""
    glb = {"__name__": "__main__", "__builtins__": __builtins__}
    old_in, old_out = sys.stdin, sys.stdout
    out_buf = io.BytesIO()
    if stdin_text is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin_text.encode()), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(out_buf, encoding="utf-8", write_through=True)
    err = None
    try:
        exec(compile(source, "<candidate>", "exec"), glb)  # noqa: S102  (this is the sandbox)
    except SystemExit as e:
        if e.code not in (None, 0):
            err = f"exit status {e.code}"
        elif stdin_text is None:
            err = "the program called exit() before the tests finished"
    except _TestTimeout:
        err = "timeout"
    except MemoryError:
        err = "memory limit exceeded (MemoryError)"
    except SyntaxError as e:
        err = f"syntax error: {e.msg} (line {e.lineno})"
    except RecursionError:
        err = "RecursionError: maximum recursion depth exceeded"
    except BaseException as e:  # noqa: BLE001  (any failure of the candidate is a verdict)
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f" (line {fr.lineno})" for fr in reversed(tb) if fr.filename == "<candidate>"), "")
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        err = f"{type(e).__name__}{': ' + msg if msg else ''}{where}"
    finally:
        captured = b""
        if stdin_text is not None:
            try:
                sys.stdout.flush()
            except Exception:  # noqa: BLE001
                pass
            captured = out_buf.getvalue() if not out_buf.closed else b""
        sys.stdin, sys.stdout = old_in, old_out
    return err, captured.decode("utf-8", "replace")


def _same_output(got: str, want: str) -> bool:
    """Token-wise per line, trailing whitespace and blank trailing lines ignored (as judges do);
    numbers that are not integers compare with 1e-6 tolerance."""
    g = [ln.split() for ln in got.strip().splitlines()]
    w = [ln.split() for ln in want.strip().splitlines()]
    g = [x for x in g if x] if len(g) != len(w) else g
    w = [x for x in w if x] if len(g) != len(w) else w
    if len(g) != len(w):
        return False
    for lg, lw in zip(g, w):
        if len(lg) != len(lw):
            return False
        for a, b in zip(lg, lw):
            if a == b:
                continue
            try:
                if "." not in a + b:
                    return False
                fa, fb = float(a), float(b)
            except ValueError:
                return False
            if abs(fa - fb) > 1e-6 * max(1.0, abs(fb)):
                return False
    return True


def _short(s: str, n: int = 120) -> str:
    s = s.strip()
    return repr(s if len(s) <= n else s[:n] + "...")


def _run_stdio(spec: dict) -> dict:
    tests = spec["tests"]
    per_test = float(spec["limits"]["test_timeout"])

    def on_alarm(signum, frame):
        raise _TestTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    for i, t in enumerate(tests):
        signal.setitimer(signal.ITIMER_REAL, per_test)
        try:
            err, out = _run_source(spec["program"], t["input"])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if err == "timeout":
            return {"passed": False, "reason": f"timeout on test {i + 1} ({per_test:g}s)", "tests_passed": i}
        if err:
            return {"passed": False, "reason": f"runtime error on test {i + 1}: {err}", "tests_passed": i}
        if not _same_output(out, t["output"]):
            return {"passed": False, "tests_passed": i,
                    "reason": f"wrong answer on test {i + 1}: expected {_short(t['output'])}, got {_short(out)}"}
    return {"passed": True, "reason": "passed", "tests_passed": len(tests)}


def _run_worker(spec: dict, result_fd: int) -> None:
    violations: list[str] = []
    libc = _libc() if os.geteuid() == 0 else None
    work = (_mount_private_tmp(spec, libc) if libc and spec.get("private_tmp") else None) or spec["workdir"]
    os.chdir(work)
    os.environ.clear()
    os.environ.update({"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    _set_limits(spec["limits"])
    _drop_root(spec, work, libc)
    sys.path[:0] = [work]
    if spec.get("guard", True):
        _install_guard(work, violations, bool(spec.get("allow_subprocess")))
    me = os.getpid()
    if spec["mode"] == "stdio":
        res = _run_stdio(spec)
    else:  # "check" (HumanEval style: the program ends with the tests) or "script"
        err, _ = _run_source(spec["program"])
        res = {"passed": err is None, "reason": "passed" if err is None else err}
    if os.getpid() != me:  # a process the candidate forked: only the worker itself reports
        os._exit(0)
    if violations:
        res["violations"] = violations[:5]
        if not res["passed"]:
            res["reason"] = f"{violations[0]} ({res['reason']})"
    os.write(result_fd, json.dumps(res).encode())
    os.fsync(result_fd)


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    result_fd = os.open(result_path, os.O_WRONLY | os.O_TRUNC)
    pid = os.fork()
    if pid == 0:
        worker = os.getpid()
        code = 0
        try:
            _run_worker(spec, result_fd)
        except MemoryError:
            if os.getpid() != worker:
                os._exit(0)
            os.write(result_fd, json.dumps({"passed": False, "reason": "memory limit exceeded (MemoryError)"}).encode())
        except BaseException as e:  # noqa: BLE001
            code = 3
            try:
                os.write(2, f"sandbox worker error: {type(e).__name__}: {e}\n".encode())
            except OSError:
                pass
        os._exit(code)
    os.close(result_fd)
    while True:  # as pid 1 we also reap orphans; stop when the worker is done
        try:
            wpid, status = os.wait()
        except ChildProcessError:
            os._exit(3)
        if wpid == pid:
            break
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
