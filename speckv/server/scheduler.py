"""The scheduler: every model call of the server runs on its one worker thread.

torch modules and KV caches are not safe to drive from several threads at once here, and the
asyncio event loop must never wait on a forward pass, so HTTP handlers only `submit` jobs and
read their events; the worker thread does all decoding.

Work is organised in ticks. A tick admits waiting jobs into free slots (FIFO, at most
`max_running` running) and then advances every running job by one speculative step: with
`step_jobs` (the server's: `speckv.server.generation.step_generations`) all of them together, one
target pass verifying every job's draft (continuous batching: jobs join and leave between
ticks); without it, each job's step in turn, in admission order. Either way a long request
cannot starve the others. Requests beyond the running slots wait in a queue bounded by
`max_queue`; past that, `submit` raises `QueueFull` (HTTP 429).

A cancelled job (its client went away) leaves the queue at once, or, when running, at the
start of its next step, freeing its slot.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from speckv.errors import SpecKVError


class QueueFull(SpecKVError):
    """Every running slot and every queue place is taken."""


class Job(Protocol):
    """What the scheduler needs from a request (`speckv.server.generation.Generation`)."""

    id: str

    @property
    def cancelled(self) -> bool: ...

    def start(self) -> None:
        """Admitted to a slot: set up its decoder (worker thread)."""

    def step(self) -> bool:
        """Run one decoding step; True when the job has finished."""

    def abort(self, reason: str) -> None:
        """The job ends without finishing ("abort": client gone, "shutdown"); release its state."""

    def fail(self, error: BaseException) -> None:
        """A step raised: report the error to the client and release the job's state."""


class Scheduler:
    """Runs jobs on one worker thread, one step per running job per tick (see the module doc).

    `step_jobs(jobs)` steps the running jobs together and says which finished (None: one by one,
    `Job.step`); `on_queue(running, waiting)` sees every change of the counts (the metrics
    gauges); `on_step(job)` runs after each step (tests record the order of steps, or slow them
    down). `trace` keeps the last (tick, job id) pairs, in the order the steps ran."""

    def __init__(
        self,
        max_running: int = 4,
        max_queue: int = 64,
        on_queue: Callable[[int, int], None] | None = None,
        on_step: Callable[[Job], None] | None = None,
        trace_size: int = 10_000,
        step_jobs: Callable[[list[Job]], list[bool]] | None = None,
    ):
        if max_running < 1 or max_queue < 0:
            raise SpecKVError(f"max_running must be ≥ 1 and max_queue ≥ 0, got {max_running}, {max_queue}")
        self.max_running, self.max_queue = max_running, max_queue
        self.on_queue, self.on_step, self.step_jobs = on_queue, on_step, step_jobs
        self.trace: deque[tuple[int, str]] = deque(maxlen=trace_size)
        self.ticks = 0
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- asyncio side: never blocks on model work ------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue `job` for a slot; `QueueFull` when running slots and queue are all taken."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            # Admission happens on the worker, so a job just submitted still counts as waiting,
            # and so does one bound for a slot freed since the last tick: the counts of the
            # moment (e.g. 3 running, 65 waiting) would misstate the limits, so say those.
            if len(self._waiting) + len(self._running) >= self.max_running + self.max_queue:
                raise QueueFull(
                    f"the server is busy: all {self.max_running} running slots and "
                    f"{self.max_queue} queue places are taken (--max-running {self.max_running}, "
                    f"--max-queue {self.max_queue}); retry later"
                )
            self._waiting.append(job)
            self._counts_changed()
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away. A waiting job leaves now; a running one at its next step (the
        worker owns it, and may be in the middle of its step)."""
        with self._cond:
            if job not in self._waiting:
                return  # running (its `cancelled` flag is checked before its next step) or over
            self._waiting.remove(job)
            self._counts_changed()
        job.abort("abort")

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.alive:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="speckv-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, then end every job ("shutdown") and the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            jobs = [*self._running, *self._waiting]
            self._running.clear()
            self._waiting.clear()
            self._counts_changed()
        for job in jobs:
            job.abort("shutdown")

    # -- worker side -------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    return
            self.tick()

    def tick(self) -> None:
        """Admit waiting jobs into free slots, then advance each running job by one step."""
        admitted = []
        with self._cond:
            while self._waiting and len(self._running) < self.max_running:
                job = self._waiting.popleft()
                self._running.append(job)
                admitted.append(job)
            if admitted:
                self._counts_changed()
            batch = list(self._running)
        for job in admitted:
            try:
                job.start()
            except Exception as error:  # e.g. a decoder that cannot be built: that job only
                self._finish(job, error)
        self.ticks += 1
        self._advance([job for job in batch if job in self._running])

    def _advance(self, batch: list[Job]) -> None:
        """One step of every job of the tick: together, or one by one."""
        if self.step_jobs is not None:
            self._advance_together(batch)
            return
        for job in batch:
            if self._stopping:
                return
            if job.cancelled:
                job.abort("abort")
                self._remove(job)
                continue
            try:
                finished = job.step()
                self.trace.append((self.ticks, job.id))
                if self.on_step is not None:
                    self.on_step(job)
            except Exception as error:  # one request's failure must not stop the server
                self._finish(job, error)
                continue
            if finished:
                self._remove(job)

    def _advance_together(self, batch: list[Job]) -> None:
        live = []
        for job in batch:
            if job.cancelled:
                job.abort("abort")
                self._remove(job)
            else:
                live.append(job)
        if not live or self._stopping:
            return
        try:
            finished = self.step_jobs(live)
        except Exception as error:  # the shared pass failed: every job in it ends, the server goes on
            for job in live:
                self._finish(job, error)
            return
        for job, done in zip(live, finished, strict=True):
            self.trace.append((self.ticks, job.id))
            try:
                if self.on_step is not None:
                    self.on_step(job)
            except Exception as error:
                self._finish(job, error)
                continue
            if done:
                self._remove(job)

    def _finish(self, job: Job, error: BaseException) -> None:
        job.fail(error)
        self._remove(job)

    def _remove(self, job: Job) -> None:
        with self._cond:
            if job in self._running:
                self._running.remove(job)
                self._counts_changed()

    def _counts_changed(self) -> None:
        if self.on_queue is not None:
            self.on_queue(len(self._running), len(self._waiting))
