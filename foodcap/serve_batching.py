"""Micro-batching for `foodcap serve`: concurrent caption requests share one decoding call.

    python -c "from foodcap.serve_batching import CaptionBatcher; help(CaptionBatcher)"

Each web or API request hands its already-validated images and decoding options to `CaptionBatcher.submit`
and waits on the returned future. One worker thread owns the model: it takes every request waiting in the
queue (up to `max_batch_size` images, waiting at most `max_wait_s` for more to arrive), groups them by
decoding options, and makes one `caption_fn` call per group. Under no load a request is served alone after
at most `max_wait_s`; under load the batches fill up, so throughput grows with the number of clients
instead of every request queueing for its own model pass. Validation happens before `submit`, so one bad
upload never fails the other requests in its batch.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

log = logging.getLogger(__name__)

CaptionFn = Callable[..., list]  # caption_fn(images, **decoding) -> one str (or list[str]) per image


@dataclass
class BatchStats:
    """Counters the /stats endpoint and the tests read; updated only by the worker thread."""

    requests: int = 0  # requests answered (successfully or with an error)
    images: int = 0  # images captioned
    decode_calls: int = 0  # calls to caption_fn: one per option group per batch
    batches: int = 0  # times the worker drained the queue
    largest_batch: int = 0  # most images in one decode call
    failed_calls: int = 0  # decode calls that raised

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Job:
    images: list  # (PIL images) already loaded and checked
    options: dict  # decoding kwargs, identical within a group
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> Hashable:
        return options_key(self.options)


def options_key(options: dict) -> Hashable:
    """Requests batch together only when every decoding option is identical."""
    return tuple(sorted((name, repr(value)) for name, value in options.items()))


def _as_caption_lists(result: Sequence[Any], expected: int) -> list[list[str]]:
    """Normalise caption_fn's answer (str per image, or list[str] per image) to list[list[str]]."""
    if len(result) != expected:
        raise RuntimeError(f"decoding returned {len(result)} results for {expected} images")
    return [[item] if isinstance(item, str) else list(item) for item in result]


class CaptionBatcher:
    """Owns `caption_fn` on one worker thread and feeds it batches of waiting requests."""

    def __init__(self, caption_fn: CaptionFn, *, max_batch_size: int = 16, max_wait_s: float = 0.02):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.caption_fn = caption_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_s)
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._carry: _Job | None = None  # a job that did not fit the previous batch goes first next time
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="foodcap-caption-batcher", daemon=True)
        self._worker.start()

    def submit(self, images: Sequence[Any], options: dict) -> Future:
        """Queue one request; the future resolves to one list of captions per image."""
        if self._closed:
            raise RuntimeError("the caption batcher is closed")
        if not images:
            raise ValueError("a caption request needs at least one image")
        job = _Job(list(images), dict(options))
        self._queue.put(job)
        return job.future

    def caption(self, images: Sequence[Any], options: dict, timeout: float | None = None) -> list[list[str]]:
        """Blocking form of `submit`."""
        return self.submit(images, options).result(timeout=timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued requests, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout)

    # --- worker thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._carry if self._carry is not None else self._queue.get()
            self._carry = None
            if first is None:
                return
            batch, stop = self._collect(first)
            self._serve(batch)
            if stop:
                return

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """`first` plus whatever arrives within max_wait_s, up to max_batch_size images."""
        batch, size = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            if size + len(job.images) > self.max_batch_size:
                self._carry = job  # too big for this batch: it opens the next one
                break
            batch.append(job)
            size += len(job.images)
        return batch, False

    def _serve(self, batch: list[_Job]) -> None:
        groups: dict[Hashable, list[_Job]] = {}
        for job in batch:
            # False when the client went away before we started: skip its images
            if job.future.set_running_or_notify_cancel():
                groups.setdefault(job.key, []).append(job)
        self.stats.batches += 1
        for jobs in groups.values():
            self._decode_group(jobs)

    def _decode_group(self, jobs: list[_Job]) -> None:
        images = [image for job in jobs for image in job.images]
        self.stats.decode_calls += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(images))
        started = time.perf_counter()
        try:
            captions = _as_caption_lists(self.caption_fn(images, **jobs[0].options), len(images))
        except Exception as error:  # noqa: BLE001 - every waiting request must hear about it
            log.exception("decoding %d images failed", len(images))
            self.stats.failed_calls += 1
            self.stats.requests += len(jobs)
            for job in jobs:
                job.future.set_exception(error)
            return
        log.debug("decoded %d images from %d requests in %.3fs", len(images), len(jobs),
                  time.perf_counter() - started)
        start = 0
        for job in jobs:
            job.future.set_result(captions[start:start + len(job.images)])
            start += len(job.images)
        self.stats.requests += len(jobs)
        self.stats.images += len(images)
