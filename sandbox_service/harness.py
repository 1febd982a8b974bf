"""The evaluation harness that runs INSIDE the jail (standard library only; the service passes this file's text to
`python3 -c`, so it never runs in the service process). It decides no verdict: it runs the steps of a plan
(plans.py) and reports what happened; the service's judge (judge.py, verdicts.py) decides Passed or Failed.

Two processes:

* the supervisor (this file's `main`) reads the spec from stdin, holds the channel to the service, makes itself
  non-dumpable (so no process of the jail's uid can read or write its memory through /proc; the seccomp filter
  denies ptrace, process_vm_* and pidfd_getfd) and forks
* the runner, which closes the channel before any solution code runs, loads the solution and runs the steps the
  supervisor asks for, one at a time, answering each on a pipe of its own: the values a judged test's probes
  produced (converted to plain data), or how an in-process step ended. Everything it says is untrusted.

The supervisor times each step (the runner's CPU time under ITIMER_PROF, a wall-clock backstop here), kills a
runner that overruns, dies or breaks the pipe's framing, and forwards each answer to the service as a record: one
line of flat JSON carrying the run's nonce, followed by `len` bytes of the runner's answer when there is one.
After a runner's death it reports the cause and ends; the service starts the harness again past that test.

The runner's namespaces: the solution runs in its own module ("solution"); tests, setup code and probes run in a
separate namespace ("tests") whose builtins are a copy taken before any solution code ran, holding the solution's
top-level names except those that shadow a builtin (the declared entry point excepted). The runner's `__main__`
is an empty module, so the solution cannot reach this code by name or through sys.modules.
Heavy modules are avoided: every import here is paid on every evaluation.
"""

import _json
import _signal
import builtins
import io
import os
import select
import sys
import time

_PR_SET_DUMPABLE = 4
_MAX_DEPTH = 100  # nesting of a value crossing to the judge
_HEADER = 64  # bytes of a runner answer's header line: "<step> <length> <count>\n"
_HEARTBEAT_S = 1.0


class _Timeout(BaseException):
    """Raised by SIGPROF; a BaseException so that `except Exception` in the solution does not swallow it."""


class _OutputLimit(BaseException):
    pass


# -- values as plain data (the runner) -------------------------------------------------------------------------
# JSON, tagged where JSON has no type of its own: {"T": [...]} tuple, {"D": [[k, v], ...]} dict, {"S"|"Z": [...]}
# set|frozenset, {"B": base64} bytes, {"C": [re, im]} complex, {"F": "nan"|"inf"|"-inf"}, {"I": hex} a big int,
# {"R": [start, stop, step]} range, {"It": [...]} what an iterator yielded, {"O": type name, "why": ...} anything
# else. Subclasses of the built-in types are read through the base type's own C accessors, so a class that
# overrides equality, hashing or comparison (or __iter__, __index__, ...) is converted, never consulted.


class _Budget:
    def __init__(self, items):
        self.items = items


_TYPE_NAME = type.__dict__["__qualname__"].__get__  # read past any metaclass or class attribute of the solution's
_TYPE_MODULE = type.__dict__["__module__"].__get__


def _opaque(value, why):
    return '{"O":' + _string(_TYPE_NAME(type(value))) + ',"why":' + _string(why) + "}"


def _tagged(tag, body):
    return '{"' + tag + '":' + body + "}"


def _error(described):
    """An answer that a step (or a probe) ended with an error: [status, error type, message]."""
    return _tagged("err", _sequence(described, 0, _Budget(8)))


def _string(text):
    return _json.encode_basestring_ascii(str.__str__(text))


def _sequence(items, depth, budget, tag=None):
    parts = [_encode(item, depth + 1, budget) for item in items]
    body = "[" + ",".join(parts) + "]"
    return body if tag is None else _tagged(tag, body)


_ITERATORS = tuple(
    type(it)
    for it in (
        iter([]),
        iter(()),
        iter(""),
        iter(range(0)),
        iter({}),
        iter(set()),
        {}.keys().__iter__(),
        map(int, ()),
        filter(None, ()),
        zip(),
        enumerate(()),
        reversed([]),
        (lambda: (yield))(),
    )
)


def _encode(value, depth, budget):
    """`value` as tagged JSON text (see above); never raises for the solution's objects."""
    budget.items -= 1
    if budget.items < 0:
        return _opaque(value, "the value has too many items to judge")
    if depth > _MAX_DEPTH:
        return _opaque(value, f"the value is nested deeper than {_MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind is bool:
        return "null" if value is None else ("true" if value else "false")
    try:
        if isinstance(value, int):
            number = int.__index__(value)
            return repr(number) if -(1 << 4000) < number < (1 << 4000) else _tagged("I", f'"{number:x}"')
        if isinstance(value, float):
            number = float.__float__(value)
            if number != number or number in (float("inf"), float("-inf")):
                return '{"F":"%s"}' % ("nan" if number != number else "inf" if number > 0 else "-inf")
            return float.__repr__(number)
        if isinstance(value, str):
            return _string(value)
        if isinstance(value, list):
            return _sequence(list.__iter__(value), depth, budget)
        if isinstance(value, tuple):
            return _sequence(tuple.__iter__(value), depth, budget, "T")
        if isinstance(value, dict):
            pairs = [
                "[" + _encode(k, depth + 1, budget) + "," + _encode(v, depth + 1, budget) + "]"
                for k, v in dict.items(value)
            ]
            return '{"D":[' + ",".join(pairs) + "]}"
        if isinstance(value, (set, frozenset)):
            items = set.__iter__(value) if isinstance(value, set) else frozenset.__iter__(value)
            return _sequence(items, depth, budget, "S" if isinstance(value, set) else "Z")
        if isinstance(value, (bytes, bytearray)):
            import binascii

            data = bytes(memoryview(value))
            return _tagged("B", '"' + binascii.b2a_base64(data, newline=False).decode() + '"')
        if isinstance(value, complex):
            parts = (complex.real.__get__(value), complex.imag.__get__(value))
            return _sequence(parts, depth, budget, "C")
        if kind is range:
            return _tagged("R", f"[{value.start},{value.stop},{value.step}]")
        name = _TYPE_NAME(kind)
        if name == "dict_keys":
            return _sequence(value, depth, budget, "S")
        if name == "dict_items":
            return _sequence(value, depth, budget, "S")
        if name == "dict_values" or kind in _ITERATORS:
            items = []
            for item in value:
                items.append(item)
                if len(items) > budget.items:
                    return _opaque(value, "the iterator yields too many items to judge")
            return _sequence(items, depth, budget, "It")
        if _TYPE_MODULE(kind) == "numpy" and depth < _MAX_DEPTH:
            plain = value.tolist()  # numpy scalars and arrays as Python scalars and (nested) lists
            if _TYPE_MODULE(type(plain)) != "numpy":
                return _encode(plain, depth + 1, budget)
    except (_Timeout, _OutputLimit):
        raise
    except BaseException as e:  # noqa: BLE001 - a broken object is an answer, not a crash
        return _opaque(value, f"converting it raised {type(e).__name__}")
    return _opaque(value, "not a built-in type or a numpy value")


# -- running a step (the runner) -------------------------------------------------------------------------------


def _on_prof(signum, frame):
    raise _Timeout


def _arm(timeout):
    # CPU time, so that a loaded machine does not time a test out; fires again every 50 ms in case it is caught.
    _signal.setitimer(_signal.ITIMER_PROF, timeout, 0.05)


def _disarm():
    _signal.setitimer(_signal.ITIMER_PROF, 0, 0)


def _describe(exc, limit=500):
    """[status, error type, message] for an exception a step raised."""
    if isinstance(exc, _Timeout):
        return ["TimeLimitExceeded", "TimeoutError", "the test exceeded its time limit"]
    if isinstance(exc, _OutputLimit):
        return ["OutputLimitExceeded", "OutputLimitExceeded", "the program's output exceeded its limit"]
    if isinstance(exc, MemoryError):
        return ["MemoryLimitExceeded", "MemoryError", "the memory limit was exceeded"]
    try:
        message = str(exc) or ("assertion failed" if isinstance(exc, AssertionError) else "")
    except BaseException:  # noqa: BLE001 - a __str__ that raises
        message = ""
    line = None
    if isinstance(exc, SyntaxError):
        message, line = str(exc.msg), exc.lineno if exc.filename == "<solution>" else None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<solution>":
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is not None:
        message = f"{message} (solution line {line})"
    status = "Failed" if isinstance(exc, AssertionError) else "Error"
    return [status, type(exc).__name__, message[:limit]]


def _timed(function, timeout):
    """Run function() under a CPU-time limit: (its result, the exception it raised or None)."""
    try:
        try:
            _arm(timeout)
            return function(), None
        finally:
            _disarm()
    except BaseException as e:  # noqa: BLE001 - every outcome of untrusted code is an answer
        _disarm()
        return None, e


class _Runner:
    def __init__(self, spec, pristine):
        self.spec, self.timeout = spec, spec["timeout"]
        self.solution = type(sys)("solution")
        tests = type(sys)("tests")  # a module, so that unittest finds setUpModule and the like
        sys.modules["solution"], sys.modules["tests"] = self.solution, tests
        self.tests = tests.__dict__
        self.tests["__builtins__"] = pristine
        self.pristine = pristine
        self.unittest = None

    def answer(self, step):
        """(the answer's JSON text, a count the supervisor needs: the test methods a unittest module has)."""
        kind, name, payload = step[0], step[1], step[2]
        if kind in ("prelude", "solution"):  # test imports run where the solution and the tests both see them
            scopes = [self.solution.__dict__] + ([self.tests] if kind == "prelude" else [])
            code = self.spec["solution"] if kind == "solution" else payload
            _, error = _timed(lambda: [exec(compile(code, name, "exec"), scope) for scope in scopes], self.timeout)
            if error is None and kind == "solution":
                self._export()
            return self._ended(error), 0
        if kind in ("setup", "inproc"):
            before = {key: id(value) for key, value in self.tests.items()}
            _, error = _timed(lambda: exec(compile(payload, name, "exec"), self.tests), self.timeout)
            if kind == "setup":  # as if the test code followed the solution in one module: its imports count there
                for key, value in list(self.tests.items()):
                    if not key.startswith("__") and before.get(key) != id(value):
                        self.solution.__dict__[key] = value
            return self._ended(error), 0
        if kind == "probe":
            values = []
            for source in payload:
                value, error = _timed(
                    lambda source=source: eval(compile(source, name, "eval"), self.tests), self.timeout
                )
                if error is None:
                    value, error = _timed(
                        lambda value=value: _encode(value, 0, _Budget(self.spec["max_items"])), self.timeout
                    )
                values.append(value if error is None else _tagged("E", _sequence(_describe(error), 0, _Budget(8))))
            return '{"v":[' + ",".join(values) + "]}", 0
        if kind == "case":
            error, output = _run_case(self.spec["solution"], payload, self.spec["output_cap"], self.timeout)
            if error is not None:
                described = _describe(error)
                if isinstance(error, SystemExit):
                    described[2] = f"the program exited with code {error.code!r}"
                return _error(described), 0
            return _tagged("out", _string(output)), 0
        if kind == "discover":
            return self._discover()
        if kind == "method":
            return self._method(payload), 0
        raise ValueError(f"unknown step kind {kind!r}")

    def _export(self):
        """The solution's top-level names, as the tests see them (a name that shadows a builtin only if declared)."""
        declared = self.spec["entry_point"]
        for key, value in self.solution.__dict__.items():
            if not key.startswith("__") and (key not in self.pristine or key == declared):
                self.tests[key] = value

    def _ended(self, error):
        return '{"ok":true}' if error is None else _error(_describe(error))

    def _discover(self):
        import unittest

        self.unittest = unittest
        suite_class = self.tests.get("TestCases")
        names = []
        if isinstance(suite_class, type) and issubclass(suite_class, unittest.TestCase):
            names = list(unittest.TestLoader().getTestCaseNames(suite_class))
        self.suite_class, self.names = suite_class, names
        if not names or len(names) > self.spec["max_tests"]:
            problem = (
                f"has {len(names)} test methods, over the limit of {self.spec['max_tests']}"
                if names
                else "defines no unittest.TestCase class TestCases with test methods"
            )
            return _error(["Error", "TestModuleError", f"the test module {problem}"]), 0
        self.result = _verdicts(unittest)()
        # Set, this makes each one-test suite below run as part of one suite run: class and module fixtures run
        # once, not around every test. The empty top-level run after the last test tears them down.
        self.result._testRunEntered = True
        return _tagged("tests", _sequence(names, 0, _Budget(len(names) + 1))), len(names)

    def _method(self, index):
        unittest, result, name = self.unittest, self.result, self.names[index]

        def run():
            unittest.TestSuite([self.suite_class(name)]).run(result)
            if index == len(self.names) - 1:
                result._testRunEntered = False
                unittest.TestSuite().run(result)

        result.begin()
        _, error = _timed(run, self.timeout)
        return _tagged("end", _sequence(result.verdict(error), 0, _Budget(8)))


def _verdicts(unittest):
    """A unittest result that keeps the outcome of the test running now (the first problem seen wins)."""

    class Verdicts(unittest.TestResult):
        fixture_failure = None  # a failed setUpClass/setUpModule: the outcome of every test it keeps from running

        def begin(self):
            self.problem, self.started, self.succeeded = None, False, False

        def startTest(self, test):
            self.started = True

        def stopTest(self, test):
            pass

        def _note(self, outcome):
            if self.problem is None:
                self.problem = outcome

        def addError(self, test, err):
            status, error_type, message = _describe(err[1])
            if not isinstance(test, unittest.TestCase):  # a class or module fixture (unittest's _ErrorHolder)
                self.fixture_failure = [status, error_type, f"{test.description}: {message}"]
                self._note(self.fixture_failure)
            else:
                self._note([status, error_type, message])

        def addFailure(self, test, err):
            self._note(_describe(err[1]))

        def addSubTest(self, test, subtest, err):
            if err is not None:
                status, error_type, message = _describe(err[1])
                self._note([status, error_type, f"{subtest}: {message}"])

        def addSkip(self, test, reason):
            self._note(["Failed", "SkipTest", f"skipped ({reason}): a test that did not run does not pass"])

        def addExpectedFailure(self, test, err):
            self.succeeded = True

        def addUnexpectedSuccess(self, test):
            self._note(["Failed", "UnexpectedSuccess", "the test is marked expectedFailure but passed"])

        def addSuccess(self, test):
            self.succeeded = True

        def verdict(self, escaped):
            """[status, error type, message]; `escaped`: what the test's run raised past unittest, if anything."""
            if self.problem is not None:
                return self.problem
            if escaped is not None:
                return _describe(escaped)
            if self.succeeded:
                return ["Passed", None, None]
            if not self.started and self.fixture_failure is not None:
                return self.fixture_failure
            return ["Error", "NotRun", "unittest reported no outcome for this test"]

    return Verdicts


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


def _run_case(source, stdin, cap, timeout):
    """Run the program as __main__ with `stdin` on fd 0: (error or None, its stdout)."""
    fd = os.memfd_create("case-stdin")
    os.write(fd, stdin.encode())
    os.lseek(fd, 0, 0)
    os.dup2(fd, 0)
    os.close(fd)
    sink = _CappedSink(cap)
    saved = sys.stdin, sys.stdout
    sys.stdin = open(0, closefd=False)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(sink), encoding="utf-8", write_through=True)

    def program():
        try:
            exec(compile(source, "<solution>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        sys.stdout.flush()

    try:
        _, error = _timed(program, timeout)
    finally:
        sys.stdin, sys.stdout = saved
    return error, b"".join(sink.parts).decode("utf-8", "replace")


def _runner_main(spec, pristine, commands, answers):
    """The runner: one answer per step number read from `commands`, until the supervisor closes it."""
    sys.modules["__main__"] = type(sys)("__main__")
    runner = _Runner(spec, pristine)
    _signal.signal(_signal.SIGPROF, _on_prof)
    pending = b""
    while True:
        while b"\n" not in pending:
            chunk = os.read(commands, 64)
            if not chunk:
                return
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        index, steps = int(line), spec["steps"]
        step = steps[index] if index < len(steps) else ("method", "", index - len(steps), index - len(steps))
        try:
            text, count = runner.answer(step)
        except BaseException as e:  # noqa: BLE001 - the step's own failure
            text, count = _error(_describe(e)), 0
        data = text.encode("utf-8", "surrogatepass")
        data = b"%d %d %d\n" % (index, len(data), count) + data
        while data:
            data = data[os.write(answers, data) :]


# -- the supervisor ----------------------------------------------------------------------------------------------


class _Supervisor:
    def __init__(self, channel, spec):
        self.channel, self.spec, self.nonce = channel, spec, spec["nonce"]

    def send(self, event, payload=b"", **fields):
        fields["n"], fields["e"] = self.nonce, event
        if payload:
            fields["len"] = len(payload)
        header = "{" + ",".join(f'"{k}":{_string(v) if isinstance(v, str) else repr(v)}' for k, v in fields.items())
        data = (header + "}\n").encode() + payload
        try:
            while data:
                data = data[os.write(self.channel, data) :]
        except OSError:  # the service hung up (it gave up on this run): nothing more to report
            os._exit(0)

    def read_answer(self, answers, runner, pid, index, backstop):
        """The runner's answer to step `index` as (payload, count), or a word saying why there is none: "timeout"
        (past `backstop` seconds of wall time, less the time the runner waited for a CPU: a sleeping or blocked
        step; a computing one meets SIGPROF first), "exit" (it ended), "framing" (it wrote something else),
        "too_large". A heartbeat goes to the service every second the runner is silent."""
        buffer, length, count = b"", None, 0
        started, waited = time.monotonic(), _waited(pid)
        while length is None or len(buffer) < length:
            charged = time.monotonic() - started - (_waited(pid) - waited)
            if charged >= backstop:
                return "timeout"
            ready = select.select([answers, runner], [], [], min(backstop - charged, _HEARTBEAT_S))[0]
            if not ready:
                self.send("alive", k=index)
                continue
            chunk = os.read(answers, 1 << 16) if answers in ready else b""
            if not chunk:  # ended, or closed its pipe: what it wrote before still counts
                if answers in ready or not select.select([answers], [], [], 0)[0]:
                    return "exit"
                continue
            buffer += chunk
            if length is None and b"\n" in buffer[:_HEADER]:
                header, buffer = buffer.split(b"\n", 1)
                fields = header.split()
                if len(fields) != 3 or not all(f.isdigit() for f in fields) or int(fields[0]) != index:
                    return "framing"
                length, count = int(fields[1]), int(fields[2])
                if length > self.spec["max_answer_bytes"]:
                    return "too_large"
            elif length is None and len(buffer) >= _HEADER:
                return "framing"
        if len(buffer) != length:
            return "framing"
        return buffer, count


def _waited(pid):
    """Seconds the process has spent runnable but waiting for a CPU (the host's load, not its own doing)."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _start_runner(spec, channel, pristine):
    commands_r, commands_w = os.pipe()
    answers_r, answers_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(channel)
            os.close(commands_w)
            os.close(answers_r)
            _set_dumpable(1)  # only the supervisor hides its memory; the runner's /proc stays as usual
            _runner_main(spec, pristine, commands_r, answers_w)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: BLE001 - the solution may have replaced or closed it
                    pass
            os._exit(0)
    os.close(commands_r)
    os.close(answers_w)
    return pid, commands_w, answers_r


def _set_dumpable(flag):
    try:
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, flag, 0, 0, 0)
    except (OSError, AttributeError):  # no libc to call: the seccomp filter still denies ptrace
        pass


def _death(pid, why):
    """How the runner ended, once it stopped answering: a word for the service ("timeout", "framing",
    "too_large", "closed" its pipe, "signal N", "exit N"). It is killed first unless it ended by itself."""
    if why == "exit":
        for _ in range(20):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
            time.sleep(0.01)
        why = "closed"
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return why


def main():
    channel = int(os.environ.pop("SANDBOX_CHANNEL_FD"))
    spec = eval(sys.stdin.buffer.read().decode(), {"__builtins__": {}})  # a literal written by the service
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _set_dumpable(0)
    supervisor = _Supervisor(channel, spec)
    supervisor.send("ready")  # the harness is up; no solution code has run yet
    pristine = dict(builtins.__dict__)
    steps, start, timeout = spec["steps"], spec["start"], spec["timeout"]
    pid, commands, answers = _start_runner(spec, channel, pristine)
    runner = os.pidfd_open(pid)
    index = 0
    while index < len(steps):
        step = steps[index]
        if step[3] >= 0 and step[3] < start:  # a test that an earlier harness run already reported
            index += 1
            continue
        started = time.monotonic()
        os.write(commands, b"%d\n" % index)
        answer = supervisor.read_answer(answers, runner, pid, index, 2 * timeout + 1.0)
        ms = (time.monotonic() - started) * 1000.0
        if isinstance(answer, str):
            supervisor.send("died", k=index, why=_death(pid, answer), ms=ms)
            break
        payload, count = answer
        supervisor.send("step", payload, k=index, ms=ms)
        if step[0] == "discover":
            steps = steps + [("method", f"method {i}", i, i) for i in range(min(count, spec["max_tests"]))]
        index += 1
    supervisor.send("done")
    os._exit(0)  # the runner and whatever it started end with the jail


if __name__ == "__main__":
    main()
