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
* "unittest": prelude and solution as in "function" mode, then the test module runs in the same namespace
  (as BigCodeBench's harness runs solution and tests as one module); its TestCases class is the suite. Each test
  method is one test, run as unittest runs it (setUp/tearDown around it, setUpClass before the first and
  tearDownClass after the last, module fixtures likewise) but under its own timeout: the first test's time
  includes the class set-up, the last one's the tear-down, and a failing class fixture is that test's error.
  The test names (unittest's order) are reported before the first test runs.
* "stdio": the solution runs as __main__ once per case, with the case's input on fd 0 / sys.stdin and
  sys.stdout captured (capped); the output passes if it equals the expected one up to trailing whitespace
  on each line and trailing blank lines.
Heavy modules (json, signal, re, unittest unless needed) are avoided: every import here is paid on every evaluation.
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
    if isinstance(value, list):
        return "[" + ",".join(_json_value(item) for item in value) + "]"
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


def _load(spec, report, parts):
    """Run `parts` ((name, code) pairs: imports, the solution, ...) in order in one module namespace ("solution",
    so an `if __name__ == "__main__":` block does not run); None after reporting the part that failed."""
    module = type(sys)("solution")
    sys.modules["solution"] = module
    namespace = module.__dict__
    for name, code in parts:
        error, _ = _timed(lambda code=code, name=name: exec(compile(code, name, "exec"), namespace), spec["timeout"])
        if error is not None:
            _, error_type, message = _describe(error)
            report.send("load_error", step=name, type=error_type, message=message)
            return None
        report.send("setup", step=name)
    return namespace


def _run_function_mode(spec, report):
    namespace = _load(spec, report, spec["prelude"] + [("<solution>", spec["solution"])])
    if namespace is None:
        return
    report.send("loaded")
    timeout = spec["timeout"]
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


def _verdicts(unittest):
    """A unittest result that keeps the verdict of the test running now (the first problem seen wins)."""

    class Verdicts(unittest.TestResult):
        fixture_failure = None  # a failed setUpClass/setUpModule: the verdict of every test it keeps from running

        def begin(self):
            self.problem, self.started, self.succeeded = None, False, False

        def startTest(self, test):
            self.started = True

        def stopTest(self, test):
            pass

        def _note(self, verdict):
            if self.problem is None:
                self.problem = verdict

        def addError(self, test, err):
            status, error_type, message = _describe(err[1])
            if not isinstance(test, unittest.TestCase):  # a class or module fixture (unittest's _ErrorHolder)
                self.fixture_failure = (status, error_type, f"{test.description}: {message}")
                self._note(self.fixture_failure)
            else:
                self._note((status, error_type, message))

        def addFailure(self, test, err):
            self._note(_describe(err[1]))

        def addSubTest(self, test, subtest, err):
            if err is not None:
                status, error_type, message = _describe(err[1])
                self._note((status, error_type, f"{subtest}: {message}"))

        def addSkip(self, test, reason):
            self._note(("Failed", "SkipTest", f"skipped ({reason}): a test that did not run does not pass"))

        def addExpectedFailure(self, test, err):
            self.succeeded = True

        def addUnexpectedSuccess(self, test):
            self._note(("Failed", "UnexpectedSuccess", "the test is marked expectedFailure but passed"))

        def addSuccess(self, test):
            self.succeeded = True

        def verdict(self, escaped):
            """(status, error type, message); `escaped`: what the test's run raised past unittest, if anything."""
            if self.problem is not None:
                return self.problem
            if escaped is not None:
                return _describe(escaped)
            if self.succeeded:
                return "Passed", None, None
            if not self.started and self.fixture_failure is not None:
                return self.fixture_failure
            return "Error", "NotRun", "unittest reported no outcome for this test"

    return Verdicts


def _run_unittest_mode(spec, report):
    import unittest

    parts = spec["prelude"] + [("<solution>", spec["solution"])] + [(name, code) for _, name, code in spec["steps"]]
    namespace = _load(spec, report, parts)
    if namespace is None:
        return
    suite_class = namespace.get("TestCases")
    names = []
    if isinstance(suite_class, type) and issubclass(suite_class, unittest.TestCase):
        names = list(unittest.TestLoader().getTestCaseNames(suite_class))
    if not names or len(names) > spec["max_tests"]:
        problem = (
            f"has {len(names)} test methods, over the limit of {spec['max_tests']}"
            if names
            else "defines no unittest.TestCase class TestCases with test methods"
        )
        report.send("load_error", step="test module", type="TestModuleError", message=f"the test module {problem}")
        return
    report.send("tests", names=names)
    report.send("loaded")
    result = _verdicts(unittest)()
    # Set, this makes each one-test suite below run as part of one suite run: class and module fixtures run once,
    # not around every test. The empty top-level run after the last test tears them down.
    result._testRunEntered = True
    last = len(names) - 1

    def run(index, name):
        unittest.TestSuite([suite_class(name)]).run(result)
        if index == last:
            result._testRunEntered = False
            unittest.TestSuite().run(result)

    for index, name in enumerate(names):
        if index < spec["start"]:
            continue
        result.begin()
        error, ms = _timed(lambda index=index, name=name: run(index, name), spec["timeout"])
        status, error_type, message = result.verdict(error)
        report.send("test", i=index, status=status, type=error_type, message=message, ms=ms)


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
    {"stdio": _run_stdio_mode, "unittest": _run_unittest_mode, "function": _run_function_mode}[spec["mode"]](
        spec, report
    )
    report.send("done")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # do not wait for threads the solution left running


if __name__ == "__main__":
    main()
