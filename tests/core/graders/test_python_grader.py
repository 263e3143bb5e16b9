"""The python grader's sandbox: each escape attempt is stopped and reported on its own sample, the others graded."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from unsloth_core.graders import GradeResult, GraderUnavailableError, SandboxConfig, SandboxLimits, grade, grade_batch
from unsloth_core.graders.sandbox import run_python

SECRET = "UNSLOTH_TEST_SECRET"
FAST = SandboxLimits(seconds_per_sample=1.0, startup_seconds=10.0, batch_seconds=60.0)

# One source, one behaviour per item["case"]: a batch exercises them all in as few processes as the kills allow.
SOURCE = r'''
import os, sys

def grade(sample, item):
    case = item["case"]
    if case == "length":
        return len(sample["output_text"]) / 10
    if case == "socket":
        import socket
        socket.create_connection(("93.184.216.34", 80), timeout=1)
    if case == "raw_socket":
        import _socket
        _socket.socket()
    if case == "env":
        return 0.0 if os.environ.get("UNSLOTH_TEST_SECRET") else 1.0
    if case == "parent_environ":
        return float(len(open(f"/proc/{os.getppid()}/environ", "rb").read()))
    if case == "write_outside":
        open(item["path"], "w").write("escaped")
    if case == "write_venv":
        open(os.path.join(sys.prefix, "escaped.txt"), "w").write("escaped")
    if case == "write_inside":
        open("scratch.txt", "w").write("fine")
        return float(open("scratch.txt").read() == "fine")
    if case == "data_dir":
        return float(len(os.listdir(item["path"])))
    if case == "subprocess":
        import subprocess
        subprocess.run(["true"])
    if case == "fork":
        os.fork()
    if case == "ctypes":
        import ctypes
        ctypes.CDLL("libc.so.6")
    if case == "kill_parent":
        os.kill(os.getppid(), 9)
    if case == "loop":
        while True:
            pass
    if case == "memory":
        block = bytearray(10 * 1024**3)
        return float(len(block))
    if case == "exit":
        os._exit(7)
    if case == "not_a_number":
        return "1.0"
    if case == "nan":
        return float("nan")
    raise ValueError(f"unknown case {case}")
'''


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GradeResult]:
    secret_dir = tmp_path_factory.mktemp("data")
    (secret_dir / "jobs.sqlite").write_text("secret")
    outside = tmp_path_factory.mktemp("outside") / "escaped.txt"
    cases = ["length", "socket", "raw_socket", "env", "parent_environ", "write_outside", "write_venv", "write_inside",
             "data_dir",
             "subprocess", "fork", "ctypes", "kill_parent", "loop", "length", "memory", "exit", "not_a_number", "nan",
             "length"]
    items = [{"case": case, "path": str(outside if case == "write_outside" else secret_dir)} for case in cases]
    os.environ[SECRET] = "hunter2"  # in the parent's environment while the sandbox runs
    try:
        results = grade_batch({"type": "python", "name": "p", "source": SOURCE}, ["abcde"] * len(cases), items,
                              allow_python=True, sandbox=SandboxConfig(limits=FAST, deny_paths=(str(secret_dir),)))
    finally:
        del os.environ[SECRET]
    assert not outside.exists() and not (Path(sys.prefix) / "escaped.txt").exists()
    by_case = dict(zip(cases, results))
    by_case["length_after_kills"] = results[-1]
    return by_case


def error(result: GradeResult) -> str:
    assert result.score == 0.0 and len(result.errors) == 1, result
    assert result.errors[0].code == "python_grader_runtime_error"
    return result.errors[0].message


def test_plain_grades(outcomes: dict[str, GradeResult]) -> None:
    assert outcomes["length"].score == 0.5 and not outcomes["length"].errors
    assert outcomes["write_inside"].score == 1.0  # its working directory is writable
    # Samples after a sample that killed its process (the loop, the exit) are graded by a fresh one.
    assert outcomes["length_after_kills"].score == 0.5


def test_no_network(outcomes: dict[str, GradeResult]) -> None:
    assert "sandbox: socket" in error(outcomes["socket"]) and "network access" in error(outcomes["socket"])
    assert "PermissionError" in error(outcomes["raw_socket"])


def test_no_secrets_no_data_dir(outcomes: dict[str, GradeResult]) -> None:
    assert outcomes["env"].score == 1.0  # the secret set in the parent's environment is not there
    # No /proc in the sandbox's root (the weak mode's audit hook refuses it instead).
    assert "/environ" in error(outcomes["parent_environ"])
    assert "jobs.sqlite" not in error(outcomes["data_dir"])
    assert "No such file or directory" in error(outcomes["data_dir"]) or "reading" in error(outcomes["data_dir"])


def test_no_writes_outside_no_processes(outcomes: dict[str, GradeResult]) -> None:
    # The test's directory is not in the sandbox's filesystem (its /tmp is its own); the interpreter's is, read-only.
    assert "No such file or directory" in error(outcomes["write_outside"])
    assert "PermissionError: sandbox: writing" in error(outcomes["write_venv"])
    assert "subprocess.Popen" in error(outcomes["subprocess"])
    assert "os.fork" in error(outcomes["fork"])
    assert "ctypes.dlopen" in error(outcomes["ctypes"])
    assert "os.kill" in error(outcomes["kill_parent"])


def test_limits(outcomes: dict[str, GradeResult]) -> None:
    assert error(outcomes["loop"]) == "timed out: grade() ran past 1 s"
    assert error(outcomes["memory"]).rstrip().endswith("MemoryError")
    assert "exited (code 7)" in error(outcomes["exit"])
    assert "returned str '1.0', not a float" in error(outcomes["not_a_number"])
    assert "returned nan, not a finite float" in error(outcomes["nan"])


def test_off_unless_allowed() -> None:
    with pytest.raises(GraderUnavailableError, match="UNSLOTH_ALLOW_PYTHON_GRADERS"):
        grade({"type": "python", "source": "def grade(s, i):\n    return 1.0"}, "x", {})


def test_top_level_failure_fails_every_sample() -> None:
    source = "import not_a_module_anywhere\ndef grade(s, i):\n    return 1.0"
    results = grade_batch({"type": "python", "source": source}, ["a", "b"], [{}, {}], allow_python=True,
                          sandbox=SandboxConfig(limits=FAST))
    assert [r.score for r in results] == [0.0, 0.0]
    assert all("ModuleNotFoundError" in error(r) for r in results)


def test_output_limit() -> None:
    source = "def grade(s, i):\n    raise ValueError('x' * 100_000)"
    limits = SandboxLimits(seconds_per_sample=5, output_bytes=2000)
    results = run_python(source, [({}, {}), ({}, {})], SandboxConfig(limits=limits))
    # The child truncates a traceback to 4,000 characters; that is still over 2,000 bytes of results.
    assert results[0].error == "the grader wrote more than 2000 bytes of results"


def test_weak_mode_still_refuses(tmp_path: Path) -> None:
    # Without namespaces (isolation "weak"), the audit hook, the empty environment and the rlimits remain.
    source = r'''
import os
def grade(sample, item):
    if item["case"] == "env":
        return float(len(os.environ.get("UNSLOTH_TEST_SECRET", "")))
    if item["case"] == "proc":
        return float(len(open(f"/proc/{os.getppid()}/environ", "rb").read()))
    if item["case"] == "socket":
        import socket
        socket.socket()
    if item["case"] == "write":
        open(item["path"], "w").write("x")
    return 1.0
'''
    items = [{"case": c, "path": str(tmp_path / "x")} for c in ("env", "proc", "socket", "write", "ok")]
    os.environ[SECRET] = "hunter2"
    try:
        outcomes = run_python(source, [({}, item) for item in items], SandboxConfig(limits=FAST, isolation="weak"))
    finally:
        del os.environ[SECRET]
    assert outcomes[0].score == 0.0 and outcomes[4].score == 1.0
    assert "sandbox: reading /proc/" in (outcomes[1].error or "")
    assert "sandbox: socket" in (outcomes[2].error or "")
    assert "sandbox: writing" in (outcomes[3].error or "") and not (tmp_path / "x").exists()


@pytest.mark.skipif(not Path("/proc/self/ns/net").exists(), reason="needs Linux namespaces")
def test_the_process_is_in_its_own_namespaces_and_root() -> None:
    # Checked from outside, by the kernel's view of the child, not by what its audit hook refuses.
    seen: dict[str, str] = {}

    def inspect() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not seen:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    status = Path(f"/proc/{pid}/status").read_text()
                    if b"stage2" in cmdline.split(b"\0") and f"PPid:\t{os.getpid()}\n" in status:
                        seen.update(net=os.readlink(f"/proc/{pid}/ns/net"), mnt=os.readlink(f"/proc/{pid}/ns/mnt"),
                                    uid=status.split("Uid:\t")[1].split()[0], root=os.readlink(f"/proc/{pid}/root"))
                except OSError:
                    continue
            time.sleep(0.02)

    watcher = threading.Thread(target=inspect)
    watcher.start()
    try:
        result = run_python("import time\ndef grade(s, i):\n    time.sleep(1)\n    return 1.0", [({}, {})],
                            SandboxConfig(limits=SandboxLimits(seconds_per_sample=5)))
    except GraderUnavailableError:
        pytest.skip("no namespaces on this machine")
    finally:
        watcher.join()
    assert result[0].score == 1.0
    assert seen["net"] != os.readlink("/proc/self/ns/net") and seen["mnt"] != os.readlink("/proc/self/ns/mnt")
    assert seen["root"].endswith("/root") and seen["root"] != "/"  # its own root: a tmpfs with only what Python needs
    if os.geteuid() == 0:
        assert seen["uid"] == "65534"  # root's child runs as nobody, without capabilities
