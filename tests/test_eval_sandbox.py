"""The code sandbox: hostile candidates are contained, reported with their reason, and the harness
goes on. Checked twice: with every layer, and with the in-process Python guard switched off so the
OS layers (namespaces, rlimits, unprivileged uid, process-group kill) must hold on their own."""

import os
import re
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from moonlet.eval.sandbox import Limits, Sandbox, interpreter_under_tmp, isolation_prefix

LIMITS = Limits(timeout=2.0, memory_mb=512, max_processes=24, file_size_mb=4, test_timeout=1.0)


@pytest.fixture
def sbx_tmp(tmp_path, monkeypatch):
    """Sandbox scratch dirs under tmp_path so leftover processes can be found by their command line."""
    d = tmp_path / "sbx"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def leftover_processes(marker: str, wait: float = 3.0) -> list[str]:
    """Sandbox processes still alive (killed processes take a moment to vanish)."""
    end = time.monotonic() + wait
    while True:
        found = _sandbox_processes(marker)
        if not found or time.monotonic() > end:
            return found
        time.sleep(0.05)


def _sandbox_processes(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmd and "_sandbox_child.py" in cmd and state != "Z":
            found.append(f"{pid}: {cmd[:120]}")
    return found


def hostile_programs(nonce: str, port: int, outside: list[str], guard: bool) -> dict[str, str]:
    writes = "\n".join(f"    try:\n        open({p!r}, 'w').write('escaped')\n    except OSError:\n        pass"
                       for p in outside)
    return {
        "loop": "while True:\n    pass\n",
        "memory": "x = bytearray(10 * 1024 ** 3)\nx[-1] = 1\n",
        # swallow EAGAIN and keep forking: only the process limit and the final group kill stop it
        "forkbomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        if not guard else "import os\nwhile True:\n    os.fork()\n",
        "write_outside": f"if True:\n{writes}\nassert False, 'tried'\n",
        "network": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')\n",
        "kill_parent": f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill({os.getpid()}, signal.SIGKILL)\n",
        "good": "def f(x):\n    return 2 * x\nassert f(21) == 42\n",
    }


def run_suite(sandbox: Sandbox, programs: dict[str, str]):
    names = list(programs)
    results = sandbox.run_many([lambda s, p=programs[n]: s.run_check(p) for n in names], workers=3)
    return dict(zip(names, results))


def check_contained(results, listener, outside, marker, guard: bool):
    r = results
    for name, res in r.items():
        assert res.passed == (name == "good"), (name, res)
        assert res.duration < LIMITS.timeout + 3, (name, res.duration)
        assert res.reason, name
    assert r["loop"].status in ("timeout", "killed"), r["loop"]
    assert "timeout" in r["loop"].reason or "CPU" in r["loop"].reason
    assert "memory" in r["memory"].reason.lower(), r["memory"]
    if guard:
        assert "process creation blocked" in r["forkbomb"].reason
        assert "write outside the working directory blocked" in r["write_outside"].reason
        assert "network access blocked" in r["network"].reason
        assert "signal to another process blocked" in r["kill_parent"].reason
    else:
        assert r["forkbomb"].status in ("timeout", "killed"), r["forkbomb"]
        assert re.search(r"unreachable|refused|Errno", r["network"].reason), r["network"]
        assert re.search(r"PermissionError|ProcessLookupError|Operation not permitted", r["kill_parent"].reason), \
            r["kill_parent"]
    for p in outside:
        assert not Path(p).exists(), f"sandbox wrote {p}"
    listener.settimeout(0.05)
    with pytest.raises((socket.timeout, BlockingIOError)):
        listener.accept()
    assert leftover_processes(marker) == []


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    yield s
    s.close()


def test_hostile_candidates_contained(sbx_tmp, tmp_path, listener):
    nonce = uuid.uuid4().hex[:8]
    outside = [str(tmp_path / f"escape-{nonce}.txt"), f"/tmp/moonlet-escape-{nonce}.txt",
               str(Path.home() / f".moonlet-escape-{nonce}")]
    programs = hostile_programs(nonce, listener.getsockname()[1], outside, guard=True)
    results = run_suite(Sandbox(LIMITS), programs)
    check_contained(results, listener, outside, str(sbx_tmp), guard=True)


@pytest.mark.skipif(not isolation_prefix("auto")[0] or os.geteuid() != 0,
                    reason="OS-only containment needs unshare and root (uid drop) on this machine")
def test_os_layers_contain_without_python_guard(sbx_tmp, tmp_path, listener):
    nonce = uuid.uuid4().hex[:8]
    outside = [str(tmp_path / f"escape-{nonce}.txt"), f"/tmp/moonlet-escape-{nonce}.txt",
               f"/var/tmp/moonlet-escape-{nonce}.txt", str(Path.home() / f".moonlet-escape-{nonce}"),
               str(Path(__file__).with_name(f"escape-{nonce}.txt"))]
    programs = hostile_programs(nonce, listener.getsockname()[1], outside, guard=False)
    results = run_suite(Sandbox(LIMITS, guard=False), programs)
    if interpreter_under_tmp():  # no private /tmp then (see interpreter_under_tmp): only check the rest
        for p in [p for p in outside if p.startswith("/tmp/")]:
            Path(p).unlink(missing_ok=True)
        outside = [p for p in outside if not p.startswith("/tmp/")]
    check_contained(results, listener, outside, str(sbx_tmp), guard=False)


def test_early_exit_and_output_flood_are_not_passes(sbx_tmp):
    sb = Sandbox(LIMITS)
    r = sb.run_check("import os\nos._exit(0)\nassert False\n")
    assert not r.passed and "no verdict" in r.reason
    r = sb.run_check("import sys\nsys.exit(0)\nassert False\n")
    assert not r.passed and "exit()" in r.reason
    r = sb.run_check("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    assert not r.passed and ("file size" in r.reason or "File too large" in r.reason or r.status == "timeout"), r
    r = sb.run_check("assert 1 + 1 == 3, 'bad maths'\n")
    assert r.status == "failed" and r.reason.startswith("AssertionError: bad maths")
    r = sb.run_check("def f(:\n")
    assert r.status == "failed" and r.reason.startswith("syntax error")


def test_fresh_working_directory(sbx_tmp):
    sb = Sandbox(LIMITS)
    prog = ("import os\nassert os.listdir('.') == [], os.listdir('.')\n"
            "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n")
    assert sb.run_check(prog).passed
    assert sb.run_check(prog).passed  # the second run does not see the first one's file


def test_stdio_mode(sbx_tmp):
    sb = Sandbox(LIMITS)
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"}]
    assert sb.run_stdio("a, b = map(int, input().split())\nprint(a + b)\n", tests).passed
    r = sb.run_stdio("a, b = map(int, input().split())\nprint(a - b)\n", tests)
    assert not r.passed and r.reason.startswith("wrong answer on test 1") and r.tests_passed == 0
    r = sb.run_stdio("import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\nsys.exit(0)\n", tests)
    assert r.passed  # exit() after printing is how many judges' programs end
    r = sb.run_stdio("a, b = map(int, input().split())\nprint(a + b if a < 5 else 1 // 0)\n", tests)
    assert not r.passed and r.reason.startswith("runtime error on test 2: ZeroDivisionError")
    t = time.monotonic()
    r = sb.run_stdio("import sys\nif sys.stdin.readline() == '1 2\\n':\n    print(3)\nelse:\n    while True: pass\n", tests)
    assert not r.passed and r.reason.startswith("timeout on test 2") and time.monotonic() - t < 5
    # real numbers compare with 1e-6 relative tolerance, tokens otherwise exactly
    assert sb.run_stdio("print('%.7f' % (1/3))\n", [{"input": "", "output": "0.333333333"}]).passed
    assert not sb.run_stdio("print('%.2f' % (1/3))\n", [{"input": "", "output": "0.333333333"}]).passed


def test_fallback_without_namespaces_still_guarded(sbx_tmp, tmp_path, listener):
    """Machines without a working `unshare`: rlimits, process group and the Python guard remain."""
    nonce = uuid.uuid4().hex[:8]
    outside = [str(tmp_path / f"escape-{nonce}.txt")]
    programs = hostile_programs(nonce, listener.getsockname()[1], outside, guard=True)
    programs = {k: programs[k] for k in ("memory", "forkbomb", "write_outside", "network", "kill_parent", "good")}
    results = run_suite(Sandbox(LIMITS, isolation="none"), programs)
    for name, res in results.items():
        assert res.passed == (name == "good"), (name, res)
    assert "memory" in results["memory"].reason.lower()
    assert "process creation blocked" in results["forkbomb"].reason
    assert "write outside the working directory blocked" in results["write_outside"].reason
    assert "network access blocked" in results["network"].reason
    assert "signal to another process blocked" in results["kill_parent"].reason
    assert not Path(outside[0]).exists() and leftover_processes(str(sbx_tmp)) == []
