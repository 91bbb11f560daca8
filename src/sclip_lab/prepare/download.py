"""Resumable, checksummed HTTP downloads (HTTP Range on a ``*.part`` file)."""

from __future__ import annotations

import http.client
import logging
import socket
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from sclip_lab.data import DataError
from sclip_lab.files import file_digest

log = logging.getLogger(__name__)


def check_digest(path: Path, checksum: tuple[str, str] | None) -> str | None:
    """None if ``path`` matches ``checksum`` (or there is none), else the digest found."""
    if checksum is None:
        return None
    found = file_digest(path, checksum[0])
    return None if found == checksum[1].lower() else found


def download(url: str, dest: Path, checksum: tuple[str, str] | None = None, *,
             retries: int = 5, timeout: float = 60.0, backoff: float = 2.0,
             chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` with HTTP Range requests.

    A cut connection is retried (``retries`` times, resuming where it stopped); a later
    call resumes too. The checksum is verified before ``dest`` appears.

    Raises:
        DataError: HTTP error, too many interruptions, or a checksum mismatch (the
            partial file is then removed).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if check_digest(dest, checksum) is None:
            return dest
        dest.unlink()  # a complete file that does not match: fetch it again
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "sclip_lab-prepare"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with urlopen(Request(url, headers=headers), timeout=timeout) as resp:
                if offset and resp.status != 206:
                    offset = 0  # the server ignored the Range header: start over
                length = resp.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                with part.open("ab" if offset else "wb") as f, tqdm(
                        total=total, initial=offset, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=dest.name, leave=False) as bar:
                    while data := resp.read(chunk):
                        f.write(data)
                        bar.update(len(data))
            size = part.stat().st_size
            if total is not None and size < total:
                raise ConnectionError(f"connection closed at {size} of {total} bytes")
            break
        except HTTPError as e:
            if e.code == 416 and offset:
                break  # nothing left to fetch: the partial file is complete
            raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}; check the "
                            "URL or fetch the file by hand and pass from=<its folder>") from None
        except (URLError, OSError, http.client.HTTPException) as e:
            if isinstance(getattr(e, "reason", None), socket.gaierror):  # no retry helps
                raise DataError(f"cannot reach {url} ({e.reason.strerror}): no network or "
                                "DNS here? fetch the file by hand and pass from=<its folder>"
                                ) from None
            failures += 1
            got = part.stat().st_size if part.is_file() else 0
            if failures > retries:
                raise DataError(f"download of {url} interrupted {failures} times ({got} bytes "
                                f"kept in {part}: {e}); run the same command again to "
                                "resume") from None
            log.warning("download of %s interrupted at %d bytes (%s); resuming", url, got, e)
            time.sleep(min(backoff * failures, 30.0))
    found = check_digest(part, checksum)
    if found is not None:
        part.unlink()
        raise DataError(f"checksum mismatch for {dest.name} from {url}: expected "
                        f"{checksum[0]} {checksum[1]}, got {found}; the file was removed, run "
                        "the command again (or fetch it by hand and pass from=<its folder>)")
    part.replace(dest)
    return dest
