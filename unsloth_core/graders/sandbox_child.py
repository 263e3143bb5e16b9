"""The python grader's child process. Runs as a script (`python -c <this file's text>`), standard library only: the
sandbox sees none of our package, and its imports cost nothing before the user's code starts.

Stage 1 (`python -I -S`, the parent's user) locks the process in, then execs stage 2:
  - new network, mount, IPC and UTS namespaces (with a user namespace first when not root): no network device
    but a loopback that is down;
  - a new root: a tmpfs of `disk_bytes` holding read-only binds of what Python needs (its prefixes, /usr, /lib*, a
    few /dev nodes) and nothing else: no data dir, no /proc (no other process's environment or open files), no
    /home or /root, no /etc but the loader's cache; `/grader` (the working directory) and `/tmp` are the only
    writable places;
  - then root drops to nobody (65534), which clears its capabilities; a user namespace's capabilities end at the
    exec (its uid is not 0).
Stage 2 (`python -I`) reads its job from a memfd, sets rlimits (address space, CPU, file size, open files, no new
processes or threads), asks for SIGKILL when the parent dies, installs an audit hook (no sockets, subprocesses,
forks, threads, ctypes, signals to other processes, file writes outside /grader and /tmp, reads outside the
allowed roots: defence in depth inside the namespaces, and the only guard in the weak mode), compiles the source
and calls grade(sample, item) for each input in turn. Each result is one JSON line on a private descriptor:
{"i": n, "score": x} or {"i": n, "error": "..."}; the user's prints go to stderr.

Weak mode (when the caller asks for it, or for best effort and namespaces cannot be made): no namespaces, no new root,
same user; rlimits, an empty environment, the audit hook and a private working directory only.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, \
    0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, \
    1 << 18
KEPT_MOUNT_FLAGS = 2 | 4 | 8 | 1024 | 2048 | 4096  # nosuid nodev noexec noatime nodiratime relatime (statvfs bits)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
NOBODY = 65534
WORKDIR = "/grader"
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


def emit(fd: int, record: dict[str, Any]) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def stage1(job_path: str) -> None:
    with open(job_path, "rb") as f:
        raw = f.read()
    job = json.loads(raw)
    memfd = os.memfd_create("grader-job", 0)
    os.write(memfd, raw)
    os.lseek(memfd, 0, os.SEEK_SET)
    os.set_inheritable(memfd, True)
    try:
        if job["isolation"] == "weak":
            raise OSError("weak isolation asked for")
        isolate(job)
        mode = "namespaces"
    except OSError as e:
        if job["isolation"] == "strict":
            emit(1, {"fatal": "isolation", "error": f"cannot isolate the python grader: {e}"})
            sys.exit(3)
        os.chdir(job["weak_workdir"])
        mode = "weak"
    env = dict(job["env"], GRADER_SANDBOX=mode)
    if mode == "weak":
        env.update(HOME=job["weak_workdir"], TMPDIR=job["weak_workdir"])
    argv = [job["python"], "-I", "-B", "-X", "utf8", "-c", job["child_code"], "stage2", str(memfd)]
    os.execve(job["python"], argv, env)


def isolate(job: dict[str, Any]) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
        check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")

    root_user = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | (0 if root_user else CLONE_NEWUSER)
    check(libc.unshare(ctypes.c_int(flags)), "unshare")
    if not root_user:  # map our own ids, so that files keep their owners as seen from inside
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    new_root = job["root"]
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={job['disk_bytes']},mode=755")
    for src in job["binds"]:
        if not os.path.lexists(src):
            continue
        dst = new_root + src
        if os.path.islink(src) and os.path.dirname(src) == "/":  # /lib -> usr/lib on a merged /usr
            os.symlink(os.readlink(src), dst)
            continue
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "w").close()
        mount(src, dst, None, MS_BIND | MS_REC)
        if src not in DEVICES:
            kept = os.statvfs(src).f_flag & KEPT_MOUNT_FLAGS
            mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
    for path in job["deny"]:  # a denied path that a bind brought in is covered by an empty read-only tmpfs
        if os.path.isdir(new_root + path):
            mount("tmpfs", new_root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
    owner = NOBODY if root_user else uid
    for path, mode in ((WORKDIR, 0o700), ("/tmp", 0o1777)):
        os.makedirs(new_root + path, exist_ok=True)
        os.chmod(new_root + path, mode)
    os.chown(new_root + WORKDIR, owner, owner if root_user else gid)
    os.chroot(new_root)
    os.chdir(WORKDIR)
    if root_user:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # from root to another uid: every capability is dropped


def stage2(memfd: int) -> None:
    with os.fdopen(memfd, "rb") as f:
        job = json.loads(f.read())
    limit_resources(job)
    result_fd = os.dup(1)
    os.dup2(2, 1)  # the user's prints go to stderr; results go to result_fd only
    install_audit_hook(job, os.environ.get("GRADER_SANDBOX") == "namespaces")
    run(job, result_fd)


def limit_resources(job: dict[str, Any]) -> None:
    import ctypes
    import resource

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL when the parent dies (set after every credential change)
    if os.getppid() != job["parent_pid"]:  # the parent died before that: nobody would read or stop us
        os._exit(1)
    cpu = job["cpu_seconds"]
    for name, value in (("RLIMIT_AS", job["memory_bytes"]), ("RLIMIT_CPU", (cpu, cpu + 1)),
                        ("RLIMIT_FSIZE", job["disk_bytes"]), ("RLIMIT_NOFILE", 256), ("RLIMIT_CORE", 0),
                        ("RLIMIT_NPROC", 0)):
        soft, hard = value if isinstance(value, tuple) else (value, value)
        with contextlib.suppress(ValueError, OSError):  # a hard limit already lower than ours stays
            resource.setrlimit(getattr(resource, name), (soft, hard))


def install_audit_hook(job: dict[str, Any], namespaces: bool) -> None:
    blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
               "os.forkpty", "os.kill", "os.killpg", "os.setns", "os.unshare", "pty.", "ctypes.", "_thread.",
               "urllib.", "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.",
               "webbrowser.", "sys.remote_exec", "os.chroot")
    writable = tuple(os.path.realpath(p) for p in ([WORKDIR, "/tmp"] if namespaces else [job["weak_workdir"]]))
    # In the new root everything visible may be read; without it, reads are limited to the binds' paths.
    readable = ("/",) if namespaces else tuple(os.path.realpath(p) for p in job["binds"]) + writable
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                   "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
    write_bits = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, fspath, startswith = os.path.realpath, os.fsdecode, str.startswith
    busy: list[int] = []

    def under(path: str, roots: tuple[str, ...]) -> bool:
        return any(path == root or startswith(path, root.rstrip("/") + "/") for root in roots)

    def deny(what: str) -> None:
        raise PermissionError(f"sandbox: {what} is not allowed in a python grader")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if busy:  # realpath below raises no event we refuse; this guards against re-entry all the same
            return
        if event.startswith(blocked):
            deny(f"{event} ({'network access' if event.startswith('socket.') else 'this operation'})")
        if event in ("open", "os.listdir", "os.scandir", "glob.glob") or event in path_events:
            target = args[0] if args else None
            if target is None or isinstance(target, int):
                return
            busy.append(1)
            try:
                path = realpath(fspath(target))
            finally:
                busy.pop()
            mode, flags = (args[1], args[2]) if event == "open" and len(args) >= 3 else (None, 0)
            writes = event in path_events or (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (mode is None and event == "open" and bool((flags or 0) & write_bits))
            if writes and not under(path, writable):
                deny(f"writing {path} (only the working directory and the temp directory are writable)")
            if not writes and not under(path, readable) and path not in ("/dev/null", "/dev/urandom"):
                deny(f"reading {path}")

    sys.addaudithook(hook)


def run(job: dict[str, Any], result_fd: int) -> None:
    import math
    import numbers
    import traceback

    def failure(limit: int = 4000) -> str:
        # The traceback without this script's frames (the runner, the audit hook): the user's code and libraries.
        error = sys.exc_info()[1]
        assert error is not None
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename != "<string>"]
        text = "".join(traceback.format_list(frames) + traceback.format_exception_only(type(error), error))
        return text if len(text) <= limit else "...\n" + text[-limit:]

    try:
        namespace: dict[str, Any] = {"__name__": "grader"}
        exec(compile(job["source"], "<grader>", "exec"), namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            raise TypeError("the source defines no function grade(sample, item)")
    except BaseException:
        emit(result_fd, {"fatal": "source", "error": failure()})
        return
    for i, (sample, item) in enumerate(job["inputs"]):
        try:
            value = grade(sample, item)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"grade() returned {type(value).__name__} {value!r:.100}, not a float")
            score = float(value)
            if not math.isfinite(score):
                raise ValueError(f"grade() returned {score}, not a finite float")
        except BaseException:  # SystemExit and KeyboardInterrupt included: they end this sample only
            emit(result_fd, {"i": i, "error": failure()})
        else:
            emit(result_fd, {"i": i, "score": score})


if __name__ == "__main__":
    if sys.argv[1] == "stage1":
        stage1(sys.argv[2])
    else:
        stage2(int(sys.argv[2]))
