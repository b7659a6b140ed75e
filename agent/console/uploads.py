"""Stock files uploaded in the console: streamed to a private temporary file, parsed by the
same reader as `kami-agent stock import` (agent/stockfile.py), imported in the background
while the page shows the progress."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import BodyPartReader

from agent.domain import AgentError, ImportReport
from agent.i18n import Translator
from agent.logs import get_logger
from agent.phrased import say
from agent.stockfile import StockFileReader
from agent.store.base import Store

log = get_logger("kami.console")

MAX_UPLOAD_BYTES = 512 * 1024 * 1024
KEEP_JOBS = 20
CHUNK = 256 * 1024


class UploadTooLarge(AgentError):
    """The upload passed MAX_UPLOAD_BYTES; `limit_mib` for the message in the merchant's
    language."""

    def __init__(self, limit_mib: int) -> None:
        super().__init__(f"larger than {limit_mib} MiB")
        self.limit_mib = limit_mib


@dataclass
class ImportJob:
    id: str
    sku: str
    filename: str
    started: float
    total_lines: int = 0
    done: int = 0
    finished: bool = False
    report: ImportReport | None = None
    rejected: int = 0
    # One line per rejection reason with its line numbers, as the CLI reports them.
    reasons: list[str] = field(default_factory=list)
    error: str | None = None

    def progress(self, done: int) -> None:
        self.done = done

    @property
    def percent(self) -> int:
        if self.finished:
            return 100
        if not self.total_lines:
            return 0
        return min(99, int(100 * self.done / self.total_lines))


async def save_upload(part: BodyPartReader, folder: Path) -> Path:
    """The uploaded file, written 0600 into `folder` (a private directory), at most
    MAX_UPLOAD_BYTES."""
    path = folder / "stock.upload"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = 0
    with os.fdopen(fd, "wb") as handle:
        while chunk := await part.read_chunk(CHUNK):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                raise UploadTooLarge(MAX_UPLOAD_BYTES // (1024 * 1024))
            handle.write(chunk)
    return path


def private_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="kami-import-"))  # mode 0700


class ImportJobs:
    def __init__(self, store: Store, clock: Callable[[], float], on_done: Callable[[], None]):
        self.store = store
        self.clock = clock
        self.on_done = on_done
        self.jobs: dict[str, ImportJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, job_id: str) -> ImportJob | None:
        return self.jobs.get(job_id)

    def start(
        self, sku: str, filename: str, folder: Path, path: Path, translator: Translator
    ) -> ImportJob:
        """Imports `path` in the background; the rejection reasons, the samples and a
        failure are said through `translator` (the language of the merchant who uploaded)."""
        job = ImportJob(
            id=secrets.token_urlsafe(12), sku=sku, filename=filename, started=time.monotonic()
        )
        while len(self.jobs) >= KEEP_JOBS:
            self.jobs.pop(next(iter(self.jobs)))
        self.jobs[job.id] = job
        task = asyncio.create_task(
            self._run(job, folder, path, translator), name=f"console-import:{job.id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: ImportJob, folder: Path, path: Path, translator: Translator) -> None:
        reader = StockFileReader(path, translator=translator)
        try:
            job.total_lines = await asyncio.to_thread(reader.count_lines)
            job.report = await self.store.import_keys(
                job.sku, reader, f"console:{job.filename}", self.clock(), job.progress
            )
            job.rejected = reader.rejected
            job.reasons = reader.rejections.report()
            log.info(
                "console_import",
                sku=job.sku,
                added=job.report.added,
                duplicates=job.report.duplicates,
                rejected=reader.rejected,
            )
        except AgentError as exc:
            # The reader's own errors already speak its translator's language.
            job.error = say(exc, translator)
            log.warning("console_import_failed", sku=job.sku, error=str(exc))
        finally:
            job.finished = True
            shutil.rmtree(folder, ignore_errors=True)
            self.on_done()

    async def close(self) -> None:
        """Waits for imports under way: each is one ledger transaction, so a stop mid-way
        would only throw the work away."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
