"""Run a function in N fresh processes on this machine and collect their results.

Used by the tests and benchmarks that need several workers; scripts run by users start
their workers with `torchrun` instead.

    results = run_workers(worker, 2, args=(...,))   # [rank0_result, rank1_result]

`worker(rank, world_size, *args)` must be a module-level function (spawned processes
import it by name) and return something `torch.save` can write (tensors, lists, ints).
Each process starts with `torch.distributed` initialised (gloo by default, or NCCL with
`backend="nccl"`, worker i on GPU i; a FileStore in a temporary directory, loopback only)
and destroys the process group when `worker` returns. A worker that raises fails the
caller with the worker's traceback; workers that are still running at `timeout` are
killed and fail the caller, so a hung collective never hangs the caller.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 240.0


class WorkerError(RuntimeError):
    """A worker process raised, died, or did not finish in time."""


def _worker_main(
    rank: int,
    world_size: int,
    fn: Callable,
    args: tuple,
    workdir: str,
    env: dict[str, str],
    timeout: float,
    threads: int,
    pg_timeout: datetime.timedelta | None,
    backend: str,
) -> None:
    out = Path(workdir)
    phase = out / f"phase_{rank}.txt"
    try:
        phase.write_text("starting")
        os.environ.update(env)
        if sys.platform.startswith("linux"):
            # Keep gloo on loopback even where the hostname resolves to no usable interface.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(threads)
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{out / 'store'}",
            rank=rank,
            world_size=world_size,
            # Shorter than the parent's deadline, so a hung collective raises here (with a
            # traceback naming it) before the parent has to kill the process.
            timeout=pg_timeout or datetime.timedelta(seconds=max(1.0, 0.8 * timeout)),
        )
        phase.write_text("running the worker function")
        try:
            result = fn(rank, world_size, *args)
        finally:
            phase.write_text("destroying the process group")
            dist.destroy_process_group()
        torch.save(result, out / f"result_{rank}.pt.tmp")
        os.replace(out / f"result_{rank}.pt.tmp", out / f"result_{rank}.pt")
        phase.write_text("result saved, exiting")
    except BaseException:
        (out / f"error_{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1)
    # Seen once in four fresh CI runs: a worker aborted ("terminate called without an active
    # exception", SIGABRT) after its last collective (its peer had finished training), most
    # likely in interpreter teardown destroying a still-joinable native thread. The result is
    # saved by then, so leave without running teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(
    fn: Callable,
    world_size: int = 2,
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    args: Sequence[Any] = (),
    threads: int = 1,
    pg_timeout: datetime.timedelta | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """`[fn(rank, world_size, *args) for rank in range(world_size)]`, each in its own process.

    `threads` sets `torch.set_num_threads` in each worker (1 by default, so that N
    workers do not oversubscribe a small machine). `pg_timeout` is the process group's
    collective timeout (default: 0.8 x `timeout`). Raises `WorkerError` with the
    worker's traceback if one raises or dies, and after killing every worker if they
    are not all done within `timeout` seconds. `backend` is "gloo" or "nccl" (one GPU per
    worker: worker i uses cuda:i).
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend='nccl' runs one worker per GPU: {world_size} workers need {world_size} GPUs, "
                         f"this machine has {torch.cuda.device_count()}")
    env = {
        key: os.environ[key]
        for key in ("TORCHINDUCTOR_CACHE_DIR", "GLOO_SOCKET_IFNAME", "CUBLAS_WORKSPACE_CONFIG")
        if key in os.environ
    }
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lordo-dist-") as workdir:
        out = Path(workdir)
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, fn, tuple(args), workdir, env, timeout, threads, pg_timeout, backend),
                name=f"{getattr(fn, '__name__', 'worker')}-rank{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if failed:
                    # Give the others a moment to report their own error, then stop them.
                    time.sleep(0.5)
                    raise WorkerError(_describe_failure(fn, procs, out, failed))
                if all(p.exitcode == 0 for p in procs):
                    break
                if time.monotonic() > deadline:
                    running = [r for r, p in enumerate(procs) if p.exitcode is None]
                    raise WorkerError(
                        f"{_fn_name(fn)}: rank(s) {running} still running after {timeout:.0f} s "
                        f"(a hung collective?); killed them.\n" + _errors(out, world_size)
                    )
                time.sleep(0.05)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            for proc in procs:
                proc.join(10)
        missing = [r for r in range(world_size) if not (out / f"result_{r}.pt").exists()]
        if missing:
            raise WorkerError(f"{_fn_name(fn)}: rank(s) {missing} exited 0 without a result")
        return [torch.load(out / f"result_{r}.pt", weights_only=False) for r in range(world_size)]


def _fn_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _errors(out: Path, world_size: int) -> str:
    parts = []
    for rank in range(world_size):
        error = out / f"error_{rank}.txt"
        if error.exists():
            parts.append(f"--- rank {rank} traceback ---\n{error.read_text()}")
    return "\n".join(parts)


def _describe_failure(fn: Callable, procs, out: Path, failed: list[int]) -> str:
    def last_phase(rank: int) -> str:
        path = out / f"phase_{rank}.txt"
        return path.read_text() if path.exists() else "not started"

    codes = ", ".join(f"rank {r}: exit code {procs[r].exitcode} while {last_phase(r)}" for r in failed)
    errors = _errors(out, len(procs))
    return f"{_fn_name(fn)} failed ({codes}).\n" + (errors or "(no traceback: the process died)")
