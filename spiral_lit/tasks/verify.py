"""Score responses with a task's verifier so that no answer can hang or crash training.

Extraction (pure, linear-time string code) runs in the calling process. Scoring runs in
worker processes forked from a ``forkserver`` (the trainer is a multithreaded torch
process, so forking the trainer itself is unsafe; a fork server is a clean process, and
forking it is far cheaper than ``spawn`` re-importing torch for every restarted worker),
in each worker's main thread, where math-verify's ``signal.alarm`` timeouts work. As with
``spawn``, a script that uses a Verifier needs an ``if __name__ == "__main__":`` guard.
Each worker gets the task once, at start-up, then scores
chunks of items, sending one result back per item. The parent therefore knows which item
each worker is on and since when: a worker that exceeds ``timeout_s`` on one item is
killed and replaced, that item alone scores 0 (counted as a timeout), and the rest of its
chunk goes back into the queue for the other workers (or its replacement). Only the stuck
worker is restarted, not the whole pool.

Answers are model output, i.e. hostile input. Workers run with least privilege
(:mod:`spiral_lit.tasks.sandbox`: scratch directory, no secrets in the environment, no inherited
descriptors, resource limits, an audit hook that refuses processes, file writes and sockets), and
they send results back as JSON, never pickle, so that nothing a worker sends can run in the
trainer. ``num_workers=0`` scores inline, without any of this, for debugging only.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import multiprocessing.util as mp_util
import shutil
import signal
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from spiral_lit.errors import UserError
from spiral_lit.tasks.base import Problem, Task, UnsafeAnswer
from spiral_lit.tasks.sandbox import harden

log = logging.getLogger(__name__)

# (position in the batch, extracted answer, problem)
_Item = tuple[int, str, Problem]
# (position in the batch, "ok" | "error" | "timeout" | "rejected", reward, error text or None)
_Outcome = tuple[int, str, float, str | None]
# Importing a task module and unpickling a task (reasoning-gym rebuilds its datasets) can take seconds on a busy CPU.
_STARTUP_TIMEOUT_S = 120.0
# Chunks per worker and call: small enough to balance uneven scoring times, large enough to amortise IPC.
_CHUNKS_PER_WORKER = 4
# Longest message a worker may send back (one result); anything longer is a protocol violation.
_MAX_MESSAGE_BYTES = 1 << 16
_STATUSES = ("ok", "error", "timeout", "rejected")


@dataclass
class VerifyResult:
    """Rewards of one batch, with counts of why some are zero."""

    rewards: list[float]
    """Reward in [0, 1] per response."""
    extracted: list[str | None]
    """The extracted final answer per response; None when it had none."""
    n_unparsed: int = 0
    """Responses with no extractable answer (reward 0)."""
    n_errors: int = 0
    """Items whose scorer raised, returned NaN, or killed its worker (reward 0)."""
    n_timeouts: int = 0
    """Items whose scorer ran past ``timeout_s`` (reward 0)."""
    n_rejected: int = 0
    """Answers refused before scoring because the scorer could have run them as code (reward 0)."""


class Verifier:
    """Runs ``task.score`` over a batch, in worker processes with a per-item timeout.

    ``num_workers=0`` scores inline in the calling thread, for debugging: no timeout, and a hang hangs the caller.
    Not thread-safe: call ``score`` from one thread. Workers start lazily on the first ``score``.
    """

    def __init__(
        self,
        task: Task,
        timeout_s: float = 5.0,
        num_workers: int = 1,
        sandbox: bool = True,
        memory_limit_mb: int = 8192,
    ) -> None:
        """
        Args:
            task: The task whose ``score`` is run; pickled once per worker.
            timeout_s: Seconds one item may take before its worker is killed and the item scores 0.
            num_workers: Worker processes; 0 scores inline without timeout protection or sandbox.
            sandbox: Run workers with least privilege (:mod:`spiral_lit.tasks.sandbox`).
            memory_limit_mb: Address-space limit of a sandboxed worker; 0 for none.
        """
        if not timeout_s > 0:
            raise UserError(f"verifier: timeout_s must be > 0, got {timeout_s}")
        if num_workers < 0:
            raise UserError(f"verifier: num_workers must be >= 0, got {num_workers}")
        if memory_limit_mb < 0:
            raise UserError(f"verifier: memory_limit_mb must be >= 0, got {memory_limit_mb}")
        self.task = task
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self._limits = _WorkerLimits(sandbox, memory_limit_mb, tempfile.mkdtemp(prefix="spiral_lit_verifier_"))
        self._workers: list[_Worker] = []
        # Workers ignore SIGTERM (see _worker_main), so multiprocessing's exit handler, which terminates daemonic
        # children with SIGTERM and then joins them, would wait forever: stop them first (exitpriority >= 0 runs
        # before that step). Mutated in place only, so the finalizer sees the current workers.
        mp_util.Finalize(self, _stop_workers, args=(self._workers, self._limits.scratch_dir), exitpriority=10)

    def score(self, problems: list[Problem], responses: list[str]) -> VerifyResult:
        """Extract and score every response against its problem."""
        if len(problems) != len(responses):
            raise ValueError(f"verifier: {len(problems)} problems but {len(responses)} responses")
        extracted = [self.task.extract_answer(r) for r in responses]
        result = VerifyResult(rewards=[0.0] * len(responses), extracted=extracted)
        result.n_unparsed = sum(e is None for e in extracted)
        items = [(i, e, p) for i, (e, p) in enumerate(zip(extracted, problems, strict=True)) if e is not None]
        if self.num_workers == 0:
            outcomes = [(i, *_score_one(self.task, e, p)) for i, e, p in items]
        else:
            outcomes = self._score_in_workers(items)
        for position, status, reward, _ in outcomes:
            result.rewards[position] = reward
            result.n_errors += status == "error"
            result.n_timeouts += status == "timeout"
            result.n_rejected += status == "rejected"
        errors = [(position, error) for position, status, _, error in outcomes if status == "error"]
        if errors:
            # One line per batch: a broken scorer would otherwise flood the log.
            log.warning(
                "verifier: %s.score failed on %d item(s); first (item %d): %s",
                type(self.task).__name__,
                len(errors),
                *errors[0],
            )
        return result

    def close(self) -> None:
        """Stop the workers (a later ``score`` starts new ones)."""
        _stop_workers(self._workers, None)

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _score_in_workers(self, items: list[_Item]) -> list[_Outcome]:
        """One outcome per item, in completion order."""
        if not items:
            return []
        self._workers[:] = [w if w.process.is_alive() else self._replace(w) for w in self._workers]
        self._workers += [_Worker(self.task, self._limits) for _ in range(self.num_workers - len(self._workers))]
        size = max(1, math.ceil(len(items) / (self.num_workers * _CHUNKS_PER_WORKER)))
        queue = deque(items[i : i + size] for i in range(0, len(items), size))
        outcomes: list[_Outcome] = []
        while len(outcomes) < len(items):
            for worker in self._workers:
                if worker.ready and not worker.pending and queue:
                    worker.assign(queue.popleft())
            busy = [w for w in self._workers if w.pending or not w.ready]
            for conn in wait([w.conn for w in busy], timeout=self._wait_s(busy)):
                worker = next(w for w in busy if w.conn is conn)
                outcomes += self._drain(worker, queue)
            outcomes += self._reap_stuck(queue)
        return outcomes

    def _wait_s(self, busy: list[_Worker]) -> float:
        """Seconds until the nearest item or start-up deadline."""
        deadlines = [w.since + (self.timeout_s if w.ready else _STARTUP_TIMEOUT_S) for w in busy]
        return max(0.0, min(deadlines) - time.monotonic())

    def _drain(self, worker: _Worker, queue: deque[list[_Item]]) -> list[_Outcome]:
        """Every message the worker has sent; a dead worker's current item counts as an error."""
        outcomes = []
        try:
            while worker.conn.poll():
                message = _decode(worker.conn.recv_bytes(_MAX_MESSAGE_BYTES), worker)
                worker.since = time.monotonic()
                if message is None:
                    worker.ready = True
                    continue
                worker.pending.popleft()
                outcomes.append(message)
        except (EOFError, OSError, ValueError):
            if not worker.ready:
                raise RuntimeError(
                    f"verifier: a worker died while starting; is the task {type(self.task).__name__} picklable and "
                    "importable in a fresh process? (its traceback is on stderr)"
                ) from None
            outcomes.append((worker.pending.popleft()[0], "error", 0.0, "the worker died or sent a malformed message"))
            self._requeue_and_replace(worker, queue)
        return outcomes

    def _reap_stuck(self, queue: deque[list[_Item]]) -> list[_Outcome]:
        """Kill workers past their deadline; their current item times out and the rest of their chunk is requeued."""
        outcomes: list[_Outcome] = []
        now = time.monotonic()
        for worker in list(self._workers):
            # A result that arrived since the last drain means the worker is not stuck after all.
            if worker.ready and worker.pending and now - worker.since > self.timeout_s and not worker.conn.poll():
                outcomes.append((worker.pending.popleft()[0], "timeout", 0.0, None))
                self._requeue_and_replace(worker, queue)
            elif not worker.ready and now - worker.since > _STARTUP_TIMEOUT_S:
                raise RuntimeError(f"verifier: a worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
        return outcomes

    def _requeue_and_replace(self, worker: _Worker, queue: deque[list[_Item]]) -> None:
        """Put the worker's unscored items first in the queue and start a fresh worker in its place."""
        if worker.pending:
            queue.appendleft(list(worker.pending))
        self._workers[self._workers.index(worker)] = self._replace(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        """A fresh worker for a dead or stuck one."""
        worker.stop(kill=True)
        return _Worker(self.task, self._limits)


def _stop_workers(workers: list[_Worker], scratch_dir: str | None) -> None:
    """Stop every worker and empty the list (in place); at exit, also remove the workers' scratch directory."""
    for worker in workers:
        worker.stop()
    workers.clear()
    if scratch_dir is not None:
        shutil.rmtree(scratch_dir, ignore_errors=True)


def _decode(data: bytes, worker: _Worker) -> _Outcome | None:
    """A worker's message as (position, status, reward, error), or None for "ready"; ValueError if malformed.

    JSON and checked field by field: the parent never unpickles what a worker (which ran hostile input) sends.
    """
    message = json.loads(data)
    if message == "ready":
        return None
    position, status, reward, error = message
    if not (worker.pending and position == worker.pending[0][0] and status in _STATUSES):
        raise ValueError(f"verifier: unexpected message from a worker: {message!r:.200}")
    if not (isinstance(reward, float) and 0.0 <= reward <= 1.0 and (error is None or isinstance(error, str))):
        raise ValueError(f"verifier: unexpected message from a worker: {message!r:.200}")
    return position, status, reward, error


@dataclass(frozen=True)
class _WorkerLimits:
    """How workers are confined (see :mod:`spiral_lit.tasks.sandbox`)."""

    sandbox: bool
    memory_limit_mb: int
    scratch_dir: str


class _Worker:
    """One scoring process and the parent's view of it."""

    def __init__(self, task: Task, limits: _WorkerLimits) -> None:
        context = mp.get_context("forkserver")
        # The fork server is one clean, single-threaded process started once; preloading the package there makes
        # each (re)started worker a cheap fork instead of a fresh interpreter that imports torch and Lightning.
        context.set_forkserver_preload(["__main__", __name__, type(task).__module__])
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn, task, limits), daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False
        self.pending: deque[_Item] = deque()
        self.since = time.monotonic()
        """When the current item (or start-up) began, as far as the parent can tell."""

    def assign(self, chunk: list[_Item]) -> None:
        """Send a chunk to an idle, ready worker."""
        self.pending.extend(chunk)
        self.since = time.monotonic()
        self.conn.send(chunk)

    def stop(self, kill: bool = False) -> None:
        """Ask the process to exit (or kill it), then reap it."""
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                kill = True
            self.process.join(timeout=1.0)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5.0)
        self.conn.close()


def _worker_main(conn: Connection, task: Task, limits: _WorkerLimits) -> None:
    """Worker loop: score chunks, one reply per item, until told to stop (or until the parent is gone)."""
    # The parent alone ends a worker (a stop message, or a kill when stuck). Ctrl-C or SIGTERM sent to the whole
    # process group must not kill the item being scored: the trainer finishes its step on these signals.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if limits.sandbox:
        harden(limits.scratch_dir, [conn.fileno()], limits.memory_limit_mb)
    conn.send_bytes(json.dumps("ready").encode())
    try:
        while (chunk := conn.recv()) is not None:
            for position, extracted, problem in chunk:
                conn.send_bytes(json.dumps([position, *_score_one(task, extracted, problem)]).encode())
    except (EOFError, BrokenPipeError):
        return  # the parent died without a stop message


def _score_one(task: Task, extracted: str, problem: Problem) -> tuple[str, float, str | None]:
    """(status, reward clamped into [0, 1], error text or None); a raise or NaN is an error scoring 0."""
    try:
        reward = float(task.score(extracted, problem))
    except UnsafeAnswer as e:
        return "rejected", 0.0, str(e)
    except Exception as e:
        return "error", 0.0, f"{type(e).__name__}: {e}"
    if math.isnan(reward):
        return "error", 0.0, "score returned NaN"
    return "ok", min(1.0, max(0.0, reward)), None
