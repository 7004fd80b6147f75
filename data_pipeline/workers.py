"""Decoding worker processes, shared by the training loader and the ordered reader.

    with worker_batches(PlannedBatches(reader, batches), num_workers=2, prefetch_factor=2,
                        seed=seed) as batches:
        for batch in batches:      # in plan order
            ...

Workers start from a fork server, ignore SIGUSR1/SIGTERM (the training process decides when to
stop) and are ended by the ``with`` block, or at exit, with SIGKILL if they do not leave. Their
base seed comes from a private generator, never from the caller's global RNG.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import weakref
from collections.abc import Iterator

import torch

_STOPS = (signal.SIGUSR1, signal.SIGTERM)


def _ignore_stop_signals(_worker_id: int) -> None:
    for s in _STOPS:
        signal.signal(s, signal.SIG_IGN)
    # Blocked since the fork server started (see _ensure_fork_server): a stop signal that came
    # before this point is pending, and ignoring it discards it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    torch.set_num_threads(1)


# Workers start from a single-threaded fork server, never by forking the trainer itself: a trainer
# runs gloo/NCCL, tqdm and queue-feeder threads, and a fork taken while one of them holds
# CPython's thread-state lock leaves the child stuck in its after-fork clean-up (seen: a dev-set
# worker hung in _PyThreadState_DeleteExcept while the other rank waited in the MoE all-to-all).
_WORKER_CONTEXT = multiprocessing.get_context("forkserver")
_WORKER_CONTEXT.set_forkserver_preload(["data_pipeline.reader"])


def _ensure_fork_server() -> None:
    """Start the fork server with the stop signals blocked (the mask survives its exec and every
    fork), so SIGUSR1/SIGTERM sent to the trainer's process group (SLURM signals every process of
    a step) reach the trainer alone: the server never takes them, and a worker discards them in
    ``_ignore_stop_signals``. Ignoring them in the server would not do: a worker's first act is
    torch's ``_set_worker_signal_handlers``, whose SIGTERM handler exits unless the parent sent
    the signal, so one landing before ``_ignore_stop_signals`` killed the worker (seen: every
    worker of 10 epochs under a burst of SIGTERMs) and the trainer with it. Only this thread
    blocks them, and only meanwhile: one meant for the trainer is pending or taken by another
    of its threads, never lost."""
    # The resource tracker first: it unblocks SIGINT/SIGTERM in this thread after its own start.
    multiprocessing.resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


# Workers ignore SIGTERM, so neither torch's fallback (``terminate()``) nor multiprocessing's exit
# handler (terminate, then join without a timeout) can end a straggler: a worker still alive when
# the trainer exits (say with 75 after SIGUSR1, its epoch iterator abandoned) would hang the exit
# forever. The workers are therefore ended here, with SIGKILL if they do not leave.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _stop_workers(it) -> None:
    workers = list(getattr(it, "_workers", ()))
    it._shutdown_workers()  # the polite way: sentinel, join with a timeout
    for w in workers:
        if w.is_alive():
            os.kill(w.pid, signal.SIGKILL)
            w.join()
    _LIVE.discard(it)


# Registered after multiprocessing's own exit handler, so it runs before it.
atexit.register(lambda: [_stop_workers(it) for it in list(_LIVE)])


@contextlib.contextmanager
def worker_batches(
    dataset: torch.utils.data.Dataset, *, num_workers: int, prefetch_factor: int, seed: int
) -> Iterator[Iterator[dict]]:
    """``dataset[0], dataset[1], ...`` read by ``num_workers`` processes (0: in this one)."""
    if num_workers == 0:
        yield (dataset[i] for i in range(len(dataset)))
        return
    _ensure_fork_server()
    it = iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=min(num_workers, max(1, len(dataset))),
            prefetch_factor=prefetch_factor,
            worker_init_fn=_ignore_stop_signals,
            multiprocessing_context=_WORKER_CONTEXT,
            # The workers' base seed comes from a private generator: starting an epoch never
            # draws from the trainer's global RNG (dropout, SpecAugment, CAPE), so a resumed
            # run draws exactly what the uninterrupted run drew.
            generator=torch.Generator().manual_seed(seed),
        )
    )
    _LIVE.add(it)
    try:
        yield it
    finally:
        if it in _LIVE:
            _stop_workers(it)
