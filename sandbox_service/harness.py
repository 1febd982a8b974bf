"""The test harness that runs INSIDE the jail (standard library only; the service passes this file's text to
`python3 -c`, so it never runs in the service process).

It reads its spec (a Python literal written by the service) from stdin, loads the solution once, then runs
every test step separately under its own SIGALRM timeout and reports each step (setup steps too, so the
service can tell a stalled step from a slow run) as one JSON line on the channel fd, so a failing or hanging
test never hides the tests after it. Records carry the run's nonce, which
the solution is never given: a program that merely writes to the channel cannot forge a result.

Modes:
* "function": prelude (imports) and solution run in one module namespace ("solution", so an
  `if __name__ == "__main__":` block does not run); then the steps in order: "setup" steps (test setup code,
  a HumanEval test module, statements of check() that contain no assert) and "test" steps (one assert each,
  or a whole check(candidate) call). A failed setup step is noted in the messages of the tests that then fail.
* "stdio": the solution runs as __main__ once per case, with the case's input on fd 0 / sys.stdin and
  sys.stdout captured (capped); the output passes if it equals the expected one up to trailing whitespace
  on each line and trailing blank lines.
Heavy modules (json, signal, re) are avoided: every import here is paid on every evaluation.
"""

import _json
import _signal
import io
import os
import sys
import time


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so that `except Exception` in the solution does not swallow it."""


class _OutputLimit(BaseException):
    pass


def _json_value(value):
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    return repr(value)


class _Reporter:
    def __init__(self, fd, nonce):
        self.fd, self.nonce = fd, nonce

    def send(self, event, **fields):
        fields["n"], fields["e"] = self.nonce, event
        line = "{" + ",".join(f'"{k}":{_json_value(v)}' for k, v in fields.items()) + "}\n"
        data = line.encode()
        while data:
            data = data[os.write(self.fd, data) :]


def _on_alarm(signum, frame):
    raise _Timeout


def _arm(timeout):
    # Keeps firing every 50 ms until disarmed, in case the solution catches the first one.
    _signal.setitimer(_signal.ITIMER_REAL, timeout, 0.05)


def _disarm():
    _signal.setitimer(_signal.ITIMER_REAL, 0, 0)


def _describe(exc, limit=500):
    """(status, error type, message) for an exception raised by a step."""
    if isinstance(exc, _Timeout):
        return "TimeLimitExceeded", "TimeoutError", "the test exceeded its time limit"
    if isinstance(exc, _OutputLimit):
        return "OutputLimitExceeded", "OutputLimitExceeded", "the program's output exceeded its limit"
    if isinstance(exc, MemoryError):
        return "MemoryLimitExceeded", "MemoryError", "the memory limit was exceeded"
    message, line = str(exc) or ("assertion failed" if isinstance(exc, AssertionError) else ""), None
    if isinstance(exc, SyntaxError):
        message, line = exc.msg, exc.lineno if exc.filename == "<solution>" else None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<solution>":
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is not None:
        message = f"{message} (solution line {line})"
    status = "Failed" if isinstance(exc, AssertionError) else "Error"
    return status, type(exc).__name__, message[:limit]


def _timed(function, timeout):
    """Run function() under a timeout: (exception or None, milliseconds)."""
    started = time.perf_counter()
    error = None
    try:
        try:
            _arm(timeout)
            function()
        finally:
            _disarm()
    except BaseException as e:  # noqa: BLE001 - every outcome of untrusted code is a result
        _disarm()
        error = e
    return error, (time.perf_counter() - started) * 1000.0


def _run_function_mode(spec, report):
    module = type(sys)("solution")
    sys.modules["solution"] = module
    namespace = module.__dict__
    timeout = spec["timeout"]
    for name, code in spec["prelude"] + [("<solution>", spec["solution"])]:
        error, _ = _timed(lambda code=code, name=name: exec(compile(code, name, "exec"), namespace), timeout)
        if error is not None:
            _, error_type, message = _describe(error)
            report.send("load_error", step=name, type=error_type, message=message)
            return
        report.send("setup", step=name)
    report.send("loaded")
    index, broken = 0, None
    for kind, name, code in spec["steps"]:
        if kind == "test" and index < spec["start"]:
            index += 1
            continue
        error, ms = _timed(lambda code=code, name=name: exec(compile(code, name, "exec"), namespace), timeout)
        if kind == "setup":
            if error is not None and broken is None:
                broken = f" (after setup step {name!r} failed: {type(error).__name__}: {str(error)[:200]})"
            report.send("setup", step=name)
            continue
        if error is None:
            report.send("test", i=index, status="Passed", type=None, message=None, ms=ms)
        else:
            status, error_type, message = _describe(error)
            report.send("test", i=index, status=status, type=error_type, message=message + (broken or ""), ms=ms)
        index += 1


class _CappedSink(io.RawIOBase):
    def __init__(self, cap):
        self.cap, self.parts, self.size = cap, [], 0

    def writable(self):
        return True

    def write(self, data):
        if self.size + len(data) > self.cap:
            raise _OutputLimit
        self.parts.append(bytes(data))
        self.size += len(data)
        return len(data)


def _normalized(text):
    return [line.rstrip() for line in text.rstrip().splitlines()]


def _run_case(code, stdin, cap, timeout):
    """Run the compiled program as __main__ with `stdin` on fd 0: (error or None, stdout text, milliseconds)."""
    fd = os.memfd_create("case-stdin")
    os.write(fd, stdin.encode())
    os.lseek(fd, 0, 0)
    os.dup2(fd, 0)
    os.close(fd)
    sink = _CappedSink(cap)
    saved = sys.stdin, sys.stdout
    sys.stdin = open(0, closefd=False)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(sink), encoding="utf-8", write_through=True)
    error = None

    def program():
        try:
            exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        sys.stdout.flush()

    try:
        error, ms = _timed(program, timeout)
    finally:
        sys.stdin, sys.stdout = saved
    return error, b"".join(sink.parts).decode("utf-8", "replace"), ms


def _run_stdio_mode(spec, report):
    compiled = []
    error, _ = _timed(lambda: compiled.append(compile(spec["solution"], "<solution>", "exec")), spec["timeout"])
    if error is not None:
        _, error_type, message = _describe(error)
        report.send("load_error", step="<solution>", type=error_type, message=message)
        return
    report.send("loaded")
    for index, (stdin, expected) in enumerate(spec["cases"]):
        if index < spec["start"]:
            continue
        error, output, ms = _run_case(compiled[0], stdin, spec["output_cap"], spec["timeout"])
        if error is None and _normalized(output) == _normalized(expected):
            report.send("test", i=index, status="Passed", type=None, message=None, ms=ms)
        elif error is None:
            message = f"expected {expected[:200]!r}, got {output[:200]!r}"
            report.send("test", i=index, status="Failed", type="WrongAnswer", message=message, ms=ms)
        else:
            status, error_type, message = _describe(error)
            if isinstance(error, SystemExit):
                message = f"the program exited with code {error.code!r}"
            report.send("test", i=index, status=status, type=error_type, message=message, ms=ms)


def main():
    channel = int(os.environ.pop("SANDBOX_CHANNEL_FD"))
    spec = eval(sys.stdin.buffer.read().decode(), {"__builtins__": {}})  # a literal written by the service
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    report = _Reporter(channel, spec["nonce"])
    _signal.signal(_signal.SIGALRM, _on_alarm)
    if spec["mode"] == "stdio":
        _run_stdio_mode(spec, report)
    else:
        _run_function_mode(spec, report)
    report.send("done")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # do not wait for threads the solution left running


if __name__ == "__main__":
    main()
