"""The serving loop: one thread owns the engine and steps it; HTTP handlers queue jobs and get results or streams.

Admission, fairness and batching are the engine's (fr_jax.rollout.engine); this thread adds what a server needs
around it, with SGLang's answers:
- backpressure: beyond `max_queued_requests` waiting samples a job is refused with "The request queue is full."
  (SGLang's --max-queued-requests, HTTP 503), never queued without bound and never dropped silently;
- progress: a job may ask to hear of every decode chunk (streaming), on this thread, in order;
- control between steps: /flush_cache, and weight updates that drain (stop admitting, let the running samples
  finish, swap, resume: what SGLang's update_weights_from_disk does by default) or first abort everything
  (abort_all_requests);
- a failing step fails the jobs in flight with the error (their samples are aborted), and serving goes on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from fr_jax.rollout.engine import Engine, GenerationRequest, Sample

_log = logging.getLogger(__name__)

QUEUE_FULL = "The request queue is full."


class QueueFull(RuntimeError):
    """The server holds max_queued_requests waiting samples already (HTTP 503, as SGLang answers it)."""


@dataclasses.dataclass(eq=False)
class Job:
    owner: int
    samples: list[list[Sample]]
    future: concurrent.futures.Future  # -> list[list[Completion]], one list of n per request
    on_progress: Callable[[Sample], None] | None = None  # called on the scheduler thread

    @property
    def done(self) -> bool:
        return all(s.finished for group in self.samples for s in group)


@dataclasses.dataclass(eq=False)
class _Command:
    run: Callable[[Engine], Any]
    future: concurrent.futures.Future
    drain: bool  # wait until no sample is running (admission paused meanwhile)
    abort: str | None = None  # first abort everything with this message


class Scheduler:
    """Steps `engine` on its own thread until stop()."""

    def __init__(self, engine: Engine, *, max_queued_requests: int | None = None):
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._commands: list[_Command] = []
        self._wake = threading.Condition()
        self._stopped = False
        self.jobs_served = 0
        self.samples_aborted = 0
        self._thread = threading.Thread(target=self._run, name="rollout-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ from any thread

    def submit(self, requests: Sequence[GenerationRequest], on_progress=None) -> Job:
        """Queue a job; raises ValueError for a request the engine cannot serve, QueueFull beyond the limit."""
        self.engine.check(requests)
        rows = sum(r.n for r in requests)
        with self._wake:
            if self._stopped:
                raise RuntimeError("the scheduler is stopped")
            if self.max_queued_requests is not None and self.engine.waiting_samples + rows > self.max_queued_requests:
                raise QueueFull(QUEUE_FULL)
            owner = next(self._ids)
            job = Job(owner, self.engine.submit(requests, owner), concurrent.futures.Future(), on_progress)
            job.future.set_running_or_notify_cancel()
            self._jobs[owner] = job
            self._finish_if_done(owner)  # max_new_tokens 0 everywhere: nothing to run
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> concurrent.futures.Future:
        """Abort a job's samples (its client went away)."""
        return self.call(lambda engine: self._dispatch_aborted(engine.abort(job.owner, "the client disconnected")))

    def _dispatch_aborted(self, aborted: Sequence[Sample]) -> None:
        self.samples_aborted += len(aborted)
        self._dispatch(aborted)

    def call(self, run: Callable[[Engine], Any], *, drain: bool = False, abort: str | None = None):
        """Run `run(engine)` on the scheduler thread between steps; drain: once no sample runs (new ones wait
        meanwhile); abort: after aborting every queued and running sample with this message."""
        command = _Command(run, concurrent.futures.Future(), drain, abort)
        with self._wake:
            if self._stopped:
                raise RuntimeError("the scheduler is stopped")
            self._commands.append(command)
            self._wake.notify()
        return command.future

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join()

    # --------------------------------------------------------------------------------- scheduler thread

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while not self._stopped and not self._commands and not engine.has_work():
                    self._wake.wait()
                if self._stopped:
                    break
                commands = list(self._commands)
            for command in commands:
                self._try(command)
            if engine.has_work():
                try:
                    changed = engine.step()
                except Exception as error:  # noqa: BLE001 - every waiting caller must hear about it
                    _log.exception("engine step failed; failing the jobs in flight")
                    engine.abort(None, f"engine error: {type(error).__name__}: {error}")
                    engine.flush_cache()  # the pool may have been donated to the failed program
                    with self._wake:
                        for owner in list(self._jobs):
                            self._jobs.pop(owner).future.set_exception(error)
                    continue
                self._dispatch(changed)
        aborted = engine.abort(None, "the server is shutting down")
        self._dispatch(aborted)
        for command in self._commands:
            command.future.cancel()

    def _try(self, command: _Command) -> None:
        engine = self.engine
        if command.abort is not None:
            self._dispatch_aborted(engine.abort(None, command.abort))
            command.abort = None
        if command.drain and engine.running_samples:
            engine.admitting = False  # the running samples finish; then this command runs
            return
        with self._wake:
            self._commands.remove(command)
        try:
            command.future.set_result(command.run(engine))
        except Exception as error:  # noqa: BLE001 - the caller gets it
            command.future.set_exception(error)
        finally:
            engine.admitting = not any(c.drain for c in self._commands)

    def _dispatch(self, changed: Sequence[Sample]) -> None:
        """Tell each job of its changed samples, and complete the jobs whose samples have all finished. Under the
        lock: submit() registers a job in the same critical section that queues its samples."""
        with self._wake:
            for sample in changed:
                job = self._jobs.get(sample.owner)
                if job is not None and job.on_progress is not None:
                    job.on_progress(sample)
            for owner in dict.fromkeys(s.owner for s in changed):
                if owner in self._jobs:
                    self._finish_if_done(owner)

    def _finish_if_done(self, owner: int) -> None:
        job = self._jobs[owner]
        if job.done:
            del self._jobs[owner]
            self.jobs_served += 1
            job.future.set_result([[s.completion() for s in group] for group in job.samples])
