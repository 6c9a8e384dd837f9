"""Data files from where they come from: the local mirror, the user cache, or their original source.

Every file a task file names (relative to the data directory) is looked for, in order, in
``MTL_DATA_DIR`` (a local mirror), then in the download cache (``MTL_CACHE_DIR/data``, default
``~/.cache/mtl/data``), then downloaded there from the URLs of the source's ``download`` entry. A
download goes through pooch (checksum, temporary file, rename only once the checksum matches) with
:class:`ResumingDownloader`: it resumes an interrupted transfer from ``<file>.part`` with an HTTP
Range request, retries a dropped or stalled connection with back-off, and shows a rich progress bar.

``MTL_DATA_MIRROR=URL`` fetches every file from ``URL/<its path>`` instead of its original host;
``MTL_OFFLINE=1`` never downloads. Any failure is one line naming the file, its URL and where to put it.
Tuning (tests, slow links): ``MTL_DOWNLOAD_TIMEOUT`` (seconds without data, default 30),
``MTL_DOWNLOAD_RETRIES`` (default 4), ``MTL_DOWNLOAD_BACKOFF`` (first wait in seconds, default 1).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from mtl import settings
from mtl.data.schema import Download
from mtl.errors import MtlError


class DownloadFailed(Exception):
    """One URL could not deliver the file (the next URL is tried)."""


def offline() -> bool:
    return os.environ.get("MTL_OFFLINE", "") not in ("", "0", "false")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def locate(rel: str, downloads: dict[str, Download] | None) -> Path | None:
    """``rel`` (a file or folder under the data directory, missing there) from the download cache,
    fetching the files of ``downloads`` at or under it first; ``None`` if nothing says where it comes
    from and the cache does not have it either."""
    cached = settings.download_dir() / rel
    entries = entries_under(rel, downloads)
    if not entries:
        return cached if cached.exists() else None
    for file, d in entries.items():
        fetch(file, d)
    return cached


def entries_under(rel: str, downloads: dict[str, Download] | None) -> dict[str, Download]:
    """The download entries for ``rel`` itself or, for a folder, every file below it."""
    key = PurePosixPath(rel).as_posix().rstrip("/")
    return {f: d for f, d in (downloads or {}).items() if f == key or f.startswith(key + "/")}


def urls_of(file: str, d: Download) -> list[str]:
    mirror = os.environ.get("MTL_DATA_MIRROR")
    return [f"{mirror.rstrip('/')}/{file}"] if mirror else d.urls


def fetch(file: str, d: Download, quiet: bool = False) -> Path:
    """``file`` (relative to the data directory) in the download cache, downloaded if missing."""
    target = settings.download_dir() / file
    if target.exists():
        return target
    urls = urls_of(file, d)
    put = f"download it and put it at {target}, or set MTL_DATA_DIR to a folder that holds {file}"
    if offline():
        raise MtlError(f"data file {file} is not here and MTL_OFFLINE is set (it comes from {urls[0]})", put)
    if settings.safe_mode():
        raise MtlError(f"data file {file} is not here and safe mode does not download (from {urls[0]})",
                       f"run `cli.py data fetch` without --safe if you trust the task file, or {put}")
    target.parent.mkdir(parents=True, exist_ok=True)
    problems = []
    for url in urls:
        try:
            _retrieve(url, target, d, quiet)
            return target
        except DownloadFailed as e:
            problems.append(f"{url}: {e}")
    raise MtlError(f"cannot download data file {file} ({problems[-1]})", put)


def _retrieve(url: str, target: Path, d: Download, quiet: bool) -> None:
    import pooch

    pooch.get_logger().setLevel("WARNING")  # our progress bar and messages say what happens
    fname = target.name if d.member is None else f"{target.name}.archive"
    downloader = ResumingDownloader(target.parent / f"{fname}.part", label=target.name, quiet=quiet)
    try:
        path = Path(pooch.retrieve(url, known_hash=d.known_hash, fname=fname, path=target.parent,
                                   downloader=downloader, progressbar=False))
    except ValueError as e:  # pooch: the checksum did not match; it has deleted the download
        if "hash" not in str(e).lower():
            raise
        (target.parent / f"{fname}.part").unlink(missing_ok=True)
        raise MtlError(f"{url} did not give the published file: checksum mismatch ({d.known_hash}); the download "
                       "was deleted", "try again later or another mirror (MTL_DATA_MIRROR); if it persists the "
                       "upstream file has changed: report it") from None
    if d.member is not None:
        try:
            _extract(path, d.member, target)
        finally:
            path.unlink(missing_ok=True)


def _extract(archive: Path, member: str, target: Path) -> None:
    """Copy one member of a zip or tar archive to ``target`` (through a temporary file)."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive) as tf:
                src = tf.extractfile(member)
                if src is None:
                    raise KeyError(member)
                with src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError) as e:
        tmp.unlink(missing_ok=True)
        raise MtlError(f"{archive.name} has no member {member} or is damaged ({type(e).__name__})",
                       "check `member` in the task file's download entry") from None


class ResumingDownloader:
    """A pooch downloader that resumes: bytes go to ``part`` (kept across interruptions and runs),
    continued with an HTTP Range request after a dropped connection or stall, with exponential
    back-off between attempts; on completion ``part`` becomes pooch's temporary file, which pooch
    checks and renames. A rich progress bar (bytes, speed, ETA) shows on a terminal."""

    def __init__(self, part: Path, label: str = "", quiet: bool = False, retries: int | None = None,
                 timeout: float | None = None, backoff: float | None = None) -> None:
        self.part = part
        self.label = label or part.name
        self.quiet = quiet
        self.retries = int(_env_float("MTL_DOWNLOAD_RETRIES", 4)) if retries is None else retries
        self.timeout = _env_float("MTL_DOWNLOAD_TIMEOUT", 30.0) if timeout is None else timeout
        self.backoff = _env_float("MTL_DOWNLOAD_BACKOFF", 1.0) if backoff is None else backoff

    def __call__(self, url: str, output_file: str | Any, pooch: Any = None, check_only: bool = False) -> bool | None:
        import requests

        if check_only:
            return True
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                self._transfer(url)
                os.replace(self.part, output_file)
                return None
            except requests.HTTPError as e:  # 404 and friends: retrying will not help
                raise DownloadFailed(f"HTTP {e.response.status_code if e.response is not None else '?'}") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    Incomplete) as e:
                last = e
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
        reason = type(last).__name__ if last is not None else "no answer"
        raise DownloadFailed(f"{reason} after {self.retries + 1} attempts; {self._size()} bytes kept in "
                             f"{self.part} for the next try")

    def _size(self) -> int:
        return self.part.stat().st_size if self.part.exists() else 0

    def _transfer(self, url: str) -> None:
        import requests

        have = self._size()
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=(self.timeout, self.timeout)) as r:
            if r.status_code == 416 and have:  # nothing left to send: the part is complete
                return
            r.raise_for_status()
            if have and r.status_code != 206:  # the server ignored the range: start over
                have = 0
            r.raw.enforce_content_length = False  # keep the bytes of a cut transfer; checked below
            length = r.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            with open(self.part, "ab" if have else "wb") as f, self._progress(total, have) as advance:
                for chunk in r.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
                    advance(len(chunk))
        if total is not None and self._size() < total:
            raise Incomplete(f"{self._size()} of {total} bytes")

    def _progress(self, total: int | None, done: int) -> Any:
        from contextlib import contextmanager

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        @contextmanager
        def bar() -> Any:
            console = Console(stderr=True)
            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          TimeRemainingColumn(), console=console, disable=self.quiet or not console.is_terminal,
                          transient=True) as progress:
                job = progress.add_task(f"downloading {self.label}", total=total, completed=done)
                yield lambda n: progress.advance(job, n)

        return bar()


class Incomplete(Exception):
    """The connection closed before Content-Length bytes arrived."""
