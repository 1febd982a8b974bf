"""The Workflow runtime that runs INSIDE the jail (standard library only; the service passes this file's text to
`python3 -c`, so model-written graphs never run in the service process).

It reads its spec (JSON: graph, prompt, problem, entry point, worker name, operator names) from stdin, defines
what FlowReasoner's graphs expect to find (`operator`, `prompt_custom`, `create_llm_instance`, `DatasetType`),
runs `await Workflow(name, llm_config, dataset)(problem, entry_point)` and reports the outcome.

Every operator is a proxy: a call becomes one JSON line on the channel fd ($SANDBOX_CHANNEL_FD),
{"id", "op", "worker", "args", "kwargs"}, and the service answers {"id", "result", "usage"} or {"id", "error"}
(an exception the graph may catch) or {"fatal": kind} (budget spent, worker not allowed, ...), on which this
process exits at once: the graph cannot catch it, and the service already knows why the run ended.
The first line is {"ready": true}, the last {"done": true, "status": "ok" | "graph_syntax_error" |
"workflow_exception" | "no_solution", ...}.
"""

import asyncio
import builtins
import inspect
import json
import os
import socket
import sys
import traceback
import types

_MAX_LINE = 1 << 26
_TRACEBACK_CHARS = 8000
_FATAL_EXIT = 3


class OperatorCallError(Exception):
    """The service refused or failed one operator call (bad arguments, ...); the graph may catch it."""


class _Channel:
    def __init__(self, fd):
        self.fd = fd
        self.next_id = 0
        self.pending = {}
        self.writer = None
        self.reading = None

    async def open(self):
        reader, self.writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=self.fd), limit=_MAX_LINE)
        self.reading = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader):
        while True:
            line = await reader.readline()
            if not line:
                os._exit(_FATAL_EXIT)  # the service hung up: nothing more can happen
            message = json.loads(line)
            if "fatal" in message:
                os._exit(_FATAL_EXIT)
            future = self.pending.pop(message["id"], None)
            if future is None or future.done():
                continue
            if "error" in message:
                future.set_exception(OperatorCallError(message["error"]))
            else:
                future.set_result(message)

    async def send(self, message):
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()

    async def call(self, op, worker, args, kwargs):
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        try:
            line = {"id": self.next_id, "op": op, "worker": worker, "args": list(args), "kwargs": kwargs}
            json.dumps(line)
        except (TypeError, ValueError) as e:
            self.pending.pop(self.next_id)
            raise TypeError(f"operator {op}: arguments must be JSON values (str, int, list, dict, ...): {e}") from None
        await self.send(line)
        return await future


class WorkerLLM:
    """The worker a graph's operators call, named as the service's allowlist names it."""

    def __init__(self, name):
        self.name = name
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def get_usage_summary(self):
        """FlowReasoner's cost hook; there is no price here, so total_cost is 0 and the tokens are given."""
        return {
            "total_cost": 0.0,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _operator_module(channel, names):
    module = types.ModuleType("operator", "The workflow operators; each call is performed by the service.")

    def proxy(name):
        async def call(self, *args, **kwargs):
            reply = await channel.call(name, self.llm.name, args, kwargs)
            self.llm.prompt_tokens += reply["usage"]["prompt_tokens"]
            self.llm.completion_tokens += reply["usage"]["completion_tokens"]
            return reply["result"]

        def init(self, llm, *unused_args, **unused_kwargs):
            if not isinstance(llm, WorkerLLM):
                raise TypeError(
                    f"operator.{name} takes the worker made by create_llm_instance(llm_config), "
                    f"not {type(llm).__name__}"
                )
            self.llm = llm

        return type(name, (), {"__init__": init, "__call__": call})

    for name in names:
        setattr(module, name, proxy(name))
    return module


def create_llm_instance(llm_config):
    if not isinstance(llm_config, str):
        raise TypeError(
            "create_llm_instance takes a worker name (str), such as the llm_config Workflow was given, "
            f"not {type(llm_config).__name__}"
        )
    return WorkerLLM(llm_config)


def _load(spec, channel):
    """The graph's Workflow class, or a failure report."""
    prompt_custom = types.ModuleType("prompt_custom")
    namespace = {
        "__name__": "workflow_graph",
        "__builtins__": builtins,
        "operator": _operator_module(channel, spec["operators"]),
        "prompt_custom": prompt_custom,
        "create_llm_instance": create_llm_instance,
        "DatasetType": str,
    }
    for source, where, scope in (
        (spec["prompt"], "<prompt>", prompt_custom.__dict__),
        (spec["graph"], "<graph>", namespace),
    ):
        try:
            code = compile(source, where, "exec")
        except (SyntaxError, ValueError) as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            return None, {
                "status": "graph_syntax_error",
                "message": f"{where}: {type(e).__name__}: {getattr(e, 'msg', e)}{line}",
            }
        try:
            exec(code, scope)
        except Exception as e:  # noqa: BLE001 - model-written code: every failure is a result
            return None, _exception(f"running {where} failed", e)
    workflow = namespace.get("Workflow")
    if not isinstance(workflow, type):
        return None, {"status": "graph_syntax_error", "message": "<graph> defines no class Workflow"}
    return workflow, None


def _exception(what, error):
    text = "".join(traceback.format_exception(error))
    return {
        "status": "workflow_exception",
        "message": f"{what}: {type(error).__name__}: {error}"[:2000],
        "traceback": text[-_TRACEBACK_CHARS:],
    }


async def _run(spec, channel):
    workflow_class, failure = _load(spec, channel)
    if failure is not None:
        return failure
    offered = {"name": "workflow", "llm_config": spec["worker"], "dataset": spec["dataset"]}
    try:
        params = inspect.signature(workflow_class).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        workflow = workflow_class(**{k: v for k, v in offered.items() if takes_any or k in params})
        result = await workflow(spec["problem"], spec["entry_point"])
    except Exception as e:  # noqa: BLE001 - model-written code: every failure is a result
        return _exception("the workflow raised", e)
    solution = result[0] if isinstance(result, (tuple, list)) and result else result
    if solution is None:
        return {"status": "no_solution", "message": "the workflow returned None"}
    if not isinstance(solution, str):
        return {
            "status": "workflow_exception",
            "message": f"the workflow returned a {type(solution).__name__}; expected the solution's code (str) "
            "or (solution, cost)",
        }
    return {"status": "ok", "solution": solution}


async def main():
    spec = json.loads(sys.stdin.buffer.read())
    channel = _Channel(int(os.environ.pop("SANDBOX_CHANNEL_FD")))
    await channel.open()
    await channel.send({"ready": True})  # the budget's clock starts now, not when python started
    outcome = await _run(spec, channel)
    await channel.send({"done": True, **outcome})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # do not wait for tasks or threads the graph left running


if __name__ == "__main__":
    asyncio.run(main())
