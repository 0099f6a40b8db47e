"""The engine in a thread of its own, between the HTTP handlers and `engine.Engine`: a bounded queue in, each
request's callback out. A step that raises fails only the requests in it; the thread keeps serving."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..engine import Engine, Output, Request

log = logging.getLogger("gptkit.serve")


class QueueFull(Exception):
    """More requests are waiting than the server takes (answered 429)."""


@dataclass(eq=False)
class Job:
    request: Request
    on_event: Callable[[Output | Exception], None]  # Outputs, then nothing; or one exception
    deadline: float


class Runner:
    def __init__(self, engine: Engine, max_queue: int, timeout: float, after_step: Callable[[], None] = lambda: None):
        """`after_step` runs in the engine thread after each round of events (to wake their receivers at once)."""
        self.engine, self.timeout, self.after_step = engine, timeout, after_step
        self.inbox: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.jobs: dict[int, Job] = {}  # taken from the inbox, not finished (engine thread only)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gptkit-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def queued(self) -> int:
        return self.inbox.qsize() + self.engine.queued

    @property
    def running(self) -> int:
        return self.engine.running

    def submit(self, request: Request, on_event: Callable[[Output | Exception], None]) -> None:
        """Queue a request (checked by the engine's rules first: GenerationError); QueueFull when full."""
        self.engine.check(request)
        try:
            self.inbox.put_nowait(Job(request, on_event, time.monotonic() + self.timeout))
        except queue.Full:
            raise QueueFull(f"{self.inbox.maxsize} requests are already waiting") from None

    def stop(self) -> None:
        """Ask the thread to stop after its current step (returns at once)."""
        self._stop.set()

    def close(self, timeout: float = 10) -> None:
        self.stop()
        self._thread.join(timeout)

    # --- the engine thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        finally:  # requests still running or queued get an error, whatever ended the loop
            self._stop.set()
            while not self.inbox.empty():
                job = self.inbox.get_nowait()
                self.jobs[job.request.id] = job
            for job in list(self.jobs.values()):
                self._send(job, ConnectionAbortedError("the server is shutting down"))
            self.jobs.clear()
            self.after_step()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._expire()
            try:
                outputs = self.engine.step()
            except Exception as e:  # out of memory, a device error, a bug: fail this step's requests only
                log.exception("decoding step failed")
                outputs = []
                for request in self.engine.abort():
                    self._send(self.jobs.pop(request.id, None), RuntimeError(f"decoding failed: {e}"))
            for out in outputs:
                job = self.jobs.get(out.request.id)
                if out.finish_reason is not None:
                    self.jobs.pop(out.request.id, None)
                self._send(job, out)
            self.after_step()

    def _take(self) -> None:
        """Move queued requests into the engine while it has free rows; sleep briefly when there is no work."""
        block = not self.engine.has_work()
        while self.engine.has_room():
            try:
                job = self.inbox.get(timeout=0.2) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if job.request.cancelled:
                continue
            self.jobs[job.request.id] = job
            self.engine.enqueue(job.request)  # checked by `submit`

    def _expire(self) -> None:
        now = time.monotonic()
        for job in [j for j in self.jobs.values() if j.deadline < now or j.request.cancelled]:
            job.request.cancelled = True  # the engine frees its row at the next step
            del self.jobs[job.request.id]
            if job.deadline < now:
                self._send(job, TimeoutError(f"the request ran past the server's limit of {self.timeout:g} s"))

    @staticmethod
    def _send(job: Job | None, event: Output | Exception) -> None:
        if job is None:
            return
        try:
            job.on_event(event)
        except Exception:  # a handler that went away (its event loop closed) must not stop the engine
            log.debug("could not deliver an event", exc_info=True)


class Inbox:
    """Events from the engine thread to one HTTP handler. The engine thread only appends; once per step
    `Mailroom.deliver` wakes every handler with news in one call per event loop (not one per token), and
    the handler takes everything that arrived meanwhile."""

    def __init__(self, mailroom: Mailroom, loop: asyncio.AbstractEventLoop):
        self.mailroom, self.loop, self.items, self.ready = mailroom, loop, [], asyncio.Event()

    def put(self, item) -> None:  # engine thread
        self.mailroom.post(self, item)

    async def get_all(self, timeout: float) -> list:
        await asyncio.wait_for(self.ready.wait(), timeout)
        with self.mailroom.lock:
            items, self.items = self.items, []
            self.ready.clear()
        return items


class Mailroom:
    def __init__(self):
        self.lock, self.news = threading.Lock(), set()

    def post(self, inbox: Inbox, item) -> None:
        with self.lock:
            inbox.items.append(item)
            self.news.add(inbox)

    def deliver(self) -> None:  # engine thread, after each step
        with self.lock:
            news, self.news = self.news, set()
        loops: dict[asyncio.AbstractEventLoop, list[Inbox]] = {}
        for inbox in news:
            loops.setdefault(inbox.loop, []).append(inbox)
        for loop, inboxes in loops.items():
            try:
                loop.call_soon_threadsafe(_wake, inboxes)
            except RuntimeError:  # that loop is closed: its handlers are gone
                pass


def _wake(inboxes: list[Inbox]) -> None:
    for inbox in inboxes:
        inbox.ready.set()
