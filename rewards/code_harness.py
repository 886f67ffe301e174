"""The test harness that runs INSIDE the sandbox; rewards/code.py sends it, compiled. Never imported.

code.py appends `main("function")` or `main("stdio")`. The job arrives on stdin (marshal, from the
trusted parent); we write one line per event on stdout, the only channel the parent reads:
`<nonce> start`, `<nonce> case <i> ...`, `<nonce> done` (fields in hex, see `emit`).

Why two processes: untrusted code that shares an interpreter with its tests controls the interpreter
(sys.settrace can jump over an assert, ctypes can rewrite int.__eq__, gc finds any secret). So:
- function mode: the candidate runs in a child forked *before* the job is read (its memory never held
  the tests or the nonce), with stdin on /dev/null, stdout and stderr on our stderr, and no other fd.
  It answers calls over a pipe; its return values cross as a tagged text encoding of exact builtin
  types (`encode` there, `Decoder` here), rebuilt here, so every `==` in the tests runs on objects this
  process made. The test code (the dataset's) runs here, with the entry point bound to a proxy. A
  raise, an exit, a crash, a timeout or garbage on the pipe fails the case: the proxy marks the case
  failed and raises CandidateFailed (ours, a BaseException) to stop it; the candidate's exception is
  never re-raised by type, so StopIteration cannot end a test's loop early and no `except` in the
  test can turn the failure into a pass.
- stdio mode: each test input runs in a fresh child; we report its stdout (capped) and exit status.
  The expected outputs never enter the sandbox: the parent compares.
The sandbox has no /proc, and seccomp blocks ptrace, process_vm_* and pidfd_getfd, so a child can
neither read nor write this process's memory or file descriptors; it can only kill us: fails closed.
Imports are kept to builtin modules (`_signal`, not `signal`, which pulls in enum): startup is
most of a sandboxed run's cost.
"""
import builtins
import marshal
import os
import select
import sys
import time
import _signal

MAX_MSG = 8 << 20  # bytes per message from the candidate
MAX_DEPTH = 100    # nesting of encoded values
SEQ_TAGS = {list: "l", tuple: "t", set: "e", frozenset: "z", dict: "d"}


def encode(x, out, depth=0):
    """Append the encoding of `x` to the list `out`. Exact builtin types only (subclasses, which could
    carry a custom __eq__, raise TypeError). Runs on the candidate's side."""
    t = type(x)
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if x is None or t is bool:
        out.append("N" if x is None else "T" if x else "F")
    elif t is int:
        out.append(f"i{x:x};")  # hex: no 4300-digit limit on int -> str
    elif t is float:
        out.append(f"f{x.hex()};")
    elif t is complex:
        out.append(f"c{x.real.hex()};{x.imag.hex()};")
    elif t is str:
        out.append(f"s{len(x)}:{x}")
    elif t is bytes:
        out.append(f"y{x.hex()};")
    elif t in SEQ_TAGS:
        out.append(f"{SEQ_TAGS[t]}{len(x)}:")
        for v in (y for kv in x.items() for y in kv) if t is dict else x:
            encode(v, out, depth + 1)
    else:
        raise TypeError(f"cannot pass a {t.__name__} out of the sandbox (exact builtin types only)")


class Decoder:
    """Parses `encode`'s output. Runs here, on untrusted text: every malformation is a ValueError."""

    def __init__(self, text):
        self.s, self.i = text, 0

    def _until(self, end):
        j = self.s.index(end, self.i)  # ValueError if absent
        tok, self.i = self.s[self.i:j], j + 1
        return tok

    def value(self, depth=0):
        if depth > MAX_DEPTH:
            raise ValueError("value nested too deeply")
        tag = self.s[self.i]
        self.i += 1
        if tag in "NTF":
            return {"N": None, "T": True, "F": False}[tag]
        if tag == "i":
            return int(self._until(";"), 16)
        if tag == "f":
            return float.fromhex(self._until(";"))
        if tag == "c":
            return complex(float.fromhex(self._until(";")), float.fromhex(self._until(";")))
        if tag == "y":
            return bytes.fromhex(self._until(";"))
        n = int(self._until(":"))
        if n < 0:
            raise ValueError("negative length")
        if tag == "s":
            if self.i + n > len(self.s):
                raise ValueError("truncated string")
            self.i += n
            return self.s[self.i - n:self.i]
        if tag not in "ltezd":
            raise ValueError(f"unknown tag {tag!r}")
        items = [self.value(depth + 1) for _ in range(2 * n if tag == "d" else n)]
        if tag == "d":
            return dict(zip(items[::2], items[1::2]))
        return {"l": list, "t": tuple, "e": set, "z": frozenset}[tag](items)

    def whole(self):
        v = self.value()
        if self.i != len(self.s):
            raise ValueError("trailing data")
        return v


class CandidateError(Exception):
    """The candidate died, timed out, or spoke garbage (raised inside this harness, never into tests)."""


class CandidateFailed(BaseException):
    """Raised into the test code where a call of the candidate failed (it raised, died, timed out or
    spoke garbage), to stop the case. A BaseException of our own, so `except Exception` and the
    generator and loop protocols (StopIteration, GeneratorExit) never see it as theirs. The case has
    failed already when it is raised: test code that catches it changes nothing."""


def send(fd, data):
    data = b"%d\n" % len(data) + data
    while data:
        data = data[os.write(fd, data):]


class Reader:
    """Length-prefixed messages from a pipe, with a size cap and an optional deadline."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def _fill(self, deadline):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError("timeout")
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            raise CandidateError("candidate exited")
        self.buf += chunk

    def recv(self, deadline=None):
        while b"\n" not in self.buf[:16]:
            if len(self.buf) >= 16:
                raise CandidateError("malformed message")
            self._fill(deadline)
        head, rest = self.buf.split(b"\n", 1)
        if not head.isdigit() or int(head) > MAX_MSG:
            raise CandidateError("malformed or oversized message")
        n, self.buf = int(head), rest
        while len(self.buf) < n:
            self._fill(deadline)
        msg, self.buf = self.buf[:n], self.buf[n:]
        return msg


def read_job():
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    return marshal.loads(b"".join(chunks))


def emit(nonce, *fields):
    line = " ".join([nonce, *map(str, fields)]).encode() + b"\n"
    while line:
        line = line[os.write(1, line):]


def close_fds_except(keep):
    """Close every fd >= 3 not in `keep`. (os.closerange(3, 0) would close them all: high-1 wraps.)"""
    bounds = sorted({2, *keep}) + [1 << 16]
    for lo, hi in zip(bounds, bounds[1:]):
        if hi > max(lo + 1, 3):
            os.closerange(max(lo + 1, 3), hi)


def kill(pid):
    try:
        os.kill(pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


# --- function mode ----------------------------------------------------------------------------------

def serve_candidate(rfd, wfd):
    """Child side, forked before the job was read. Trusted only until the program runs."""
    os.dup2(2, 1)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    close_fds_except([0, 1, 2, rfd, wfd])
    reader = Reader(rfd)
    program, entry_point = marshal.loads(reader.recv())
    scope = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(program, "<candidate>", "exec"), scope)
        fn = scope[entry_point]
        if not callable(fn):
            raise TypeError(f"{entry_point} is not a function")
    except BaseException as e:  # SystemExit included: exiting early is a failed load
        send(wfd, b"E" + f"{type(e).__name__}: {e}"[:500].encode(errors="replace"))
        return
    send(wfd, b"L")
    while True:
        try:
            args, kwargs = marshal.loads(reader.recv())
        except CandidateError:  # the harness is done with us
            return
        out = ["O"]
        try:
            encode(fn(*args, **kwargs), out)
        except BaseException as e:
            out = ["R", type(e).__name__, "\n", str(e)[:500]]
        try:
            sys.stdout.flush()  # its prints (on our stderr) before its answer
        except BaseException:
            pass
        send(wfd, "".join(out).encode(errors="surrogatepass"))


def run_function():
    h2c_r, h2c_w = os.pipe()
    c2h_r, c2h_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(h2c_w)
            os.close(c2h_r)
            serve_candidate(h2c_r, c2h_w)
        except BaseException as e:  # our own bug, or the candidate breaking the loop: say so on stderr
            os.write(2, f"candidate process: {type(e).__name__}: {e}\n".encode(errors="replace"))
        finally:
            os._exit(1)
    os.close(h2c_r)
    os.close(c2h_w)
    job = read_job()
    nonce, timeout = job["nonce"], job["case_timeout"]
    emit(nonce, "start")
    reader = Reader(c2h_r)
    # The deadline is per case; `failed` is why a call of the candidate in the current case failed.
    state = {"dead": None, "deadline": time.monotonic() + timeout, "failed": None}

    def die(why):
        state["dead"] = state["dead"] or why
        kill(pid)
        return CandidateError(state["dead"])

    def fail(why):
        """The current case has failed, whatever the test code does next: stop it."""
        state["failed"] = state["failed"] or why
        return CandidateFailed(why)

    def call(*args, **kwargs):
        if state["dead"]:
            raise fail(state["dead"])
        message = marshal.dumps((args, kwargs))  # ValueError: an argument marshal cannot carry (the test's)
        try:
            send(h2c_w, message)
            reply = reader.recv(state["deadline"]).decode(errors="surrogatepass")
            if reply[:1] == "O":
                return Decoder(reply[1:]).whole()
        except TimeoutError:
            raise fail(str(die("timeout"))) from None
        except BaseException as e:  # it died, spoke garbage, sent a value too big to rebuild...
            raise fail(str(die(f"candidate died or spoke garbage ({type(e).__name__}: {e})"))) from None
        name, _, msg = reply[1:].partition("\n")
        # Only the fact crosses, with its name for the log: the candidate's exception is this case's
        # failure and is never re-raised, by type, inside the test's own code.
        raise fail(f"candidate raised {name}: {msg}" if reply[:1] == "R" else f"malformed reply {reply[:40]!r}")

    try:
        send(h2c_w, marshal.dumps((job["program"], job["entry_point"])))
        loaded = reader.recv(state["deadline"])
        if loaded != b"L":
            die(f"load failed: {loaded[1:].decode(errors='replace')}")
    except TimeoutError:
        die("timeout")
    except (CandidateError, OSError) as e:
        die(f"load failed: {e}")
    scope = {"__name__": "__tests__"}
    try:
        exec(compile(job["setup"], "<tests>", "exec"), scope)
    except BaseException as e:
        emit(nonce, "setup_error", f"{type(e).__name__}: {e}"[:500].encode().hex())
        return
    scope[job["entry_point"]] = call
    for i, case in enumerate(job["cases"]):
        passed, error = False, ""
        try:
            if state["dead"]:
                raise fail(state["dead"])
            state["deadline"] = time.monotonic() + timeout
            exec(compile(case, f"<case {i}>", "exec"), scope)
            passed = state["failed"] is None  # a failed call fails the case even if the test caught it
            error = "" if passed else f"CandidateFailed: {state['failed']}"
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
        state["failed"] = None
        emit(nonce, "case", i, int(passed), int(state["dead"] == "timeout"), error[:300].encode(errors="replace").hex())
        if not passed and job["stop_on_fail"]:
            break
    emit(nonce, "done")


# --- stdio mode -------------------------------------------------------------------------------------

def run_program(program, stdin, timeout, cap):
    """One fresh child per input: (stdout, exit status, timed_out, capped)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            close_fds_except([0, 1, 2])
            code = 0
            try:
                exec(compile(program, "<candidate>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
            except SystemExit as e:
                code = e.code if type(e.code) is int else int(e.code is not None)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            os._exit(code & 255)
        finally:
            os._exit(1)
    os.close(in_r)
    os.close(out_w)
    os.set_blocking(in_w, False)
    out, view, deadline = bytearray(), memoryview(stdin), time.monotonic() + timeout
    timed_out = capped = False
    writers = [in_w] if view else []
    if not view:
        os.close(in_w)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        r, w, _ = select.select([out_r], writers, [], left)
        if w:
            try:
                view = view[os.write(in_w, view[:1 << 16]):]
            except BrokenPipeError:  # it stopped reading: its business
                view = view[:0]
            if not view:
                os.close(in_w)
                writers = []
        if r:
            chunk = os.read(out_r, 1 << 16)
            if not chunk:
                break
            out += chunk
            if len(out) > cap:
                del out[cap:]
                capped = True
                break
    status = None
    while not (timed_out or capped):  # stdout closed: give it until the deadline to exit
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        if time.monotonic() > deadline:
            timed_out = True
        time.sleep(0.001)
    kill(-pid)  # its process group: children it left behind
    if status is None:
        kill(pid)
        status = os.waitpid(pid, 0)[1]
    os.close(out_r)
    if writers:
        os.close(in_w)
    return bytes(out), os.waitstatus_to_exitcode(status), timed_out, capped


def run_stdio():
    job = read_job()
    nonce = job["nonce"]
    emit(nonce, "start")
    for i, stdin in enumerate(job["inputs"]):
        out, code, timed_out, capped = run_program(job["program"], stdin.encode(), job["case_timeout"],
                                                   job["max_output"])
        emit(nonce, "case", i, code, int(timed_out), int(capped), out.hex() or "-")
        if job["stop_on_fail"] and (timed_out or capped or code != 0):
            break
    emit(nonce, "done")


def main(mode):
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)  # the parent went away: just die
    # The candidate may signal us (same uid). SIGINT would raise KeyboardInterrupt wherever we are,
    # test code included, which could catch it; every other signal just kills us, which fails closed.
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    (run_function if mode == "function" else run_stdio)()
    os._exit(0)  # everything is written: skip the interpreter's teardown
