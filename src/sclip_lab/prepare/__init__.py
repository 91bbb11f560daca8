"""Benchmark preparation: ``python -m sclip_lab.prepare <benchmark> [key=value ...]``.

Downloads the official archives (resumable over HTTP Range, with progress bars and
checksums), extracts the members the benchmark needs into the standard layout under
``data_root`` (docs/protocol.md §6), converts the raw annotations the benchmark does not ship in
its evaluation format, verifies the result and only then writes a ready marker.

What to fetch and how to convert it is each benchmark's ``prepare:`` section of
``conf/dataset/<name>.yaml`` (``catalogue``). Modules: ``download`` (resumable HTTP),
``extract`` (zip/tar), ``convert`` (label converters), ``verify`` (report and marker),
``cli`` (the command line). Archives behind a login (Cityscapes) are taken from
``from=DIR``, which also works for any other archive already on disk.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sclip_lab.data import (
    BenchmarkSpec,
    DataError,
    dataset_config,
    list_ids,
    resolve_data_root,
)
from sclip_lab.errors import check_writable_dir
from sclip_lab.prepare import cli
from sclip_lab.prepare.catalogue import (
    ARCHIVES,
    Archive,
    benchmarks,
    download_size,
    load_section,
    needs,
    size_text,
    split_specs,
)
from sclip_lab.prepare.cli import parse_args
from sclip_lab.prepare.convert import (
    CONTEXT_IDS,
    CONVERTERS,
    cityscapes_lut,
    coco_object_lut,
    coco_stuff_lut,
    context_lut,
    convert_cityscapes,
    convert_coco,
    convert_context,
    get_converter,
    rle_counts,
    rle_decode,
)
from sclip_lab.prepare.download import check_digest, download
from sclip_lab.prepare.extract import extract
from sclip_lab.prepare.verify import MARKER, Report, is_ready, verify, write_marker

__all__ = [
    "ARCHIVES", "Archive", "CONTEXT_IDS", "CONVERTERS", "MARKER", "Report", "benchmarks",
    "check_digest", "cityscapes_lut", "coco_object_lut", "coco_stuff_lut", "context_lut",
    "convert_cityscapes", "convert_coco", "convert_context", "download", "ensure_ready",
    "extract", "is_ready", "load_section", "main", "parse_args", "prepare", "rle_counts",
    "rle_decode", "split_specs", "verify",
]

log = logging.getLogger(__name__)

DOWNLOADS = "downloads"  # archives, under data_root


def login_instructions(name: str, section: Mapping[str, Any], data_root: Path,
                       archives: Mapping[str, Archive]) -> str:
    """How to fetch by hand the archives of ``name`` that have no url."""
    # "~11 GB" rather than "~11.0 GB": rounded sizes, as a person would write them.
    files = [f"{a.filename} (~{size_text(a.size_mb).replace('.0 GB', ' GB')})"
             for a in (archives[k] for k in needs(section)) if a.url is None]
    *rest, last = files or ["its archives"]
    listed = f"{', '.join(rest)} and {last}" if rest else last
    page = section["prepare"]["login"] or "its provider's site"
    return (f"{name} needs an account: log in at {page}, download {listed} into one folder, "
            f"then run python -m sclip_lab.prepare {name} from=<that folder> "
            f"data_root={data_root}")


def fetch(archive: Archive, data_root: Path, source_dir: Path | None, login: str,
          say: Callable = print) -> Path:
    """The archive file: from ``source_dir`` when there, else downloaded (``login`` says
    how to get one that has no url)."""
    if source_dir is not None and (source_dir / archive.filename).is_file():
        path = source_dir / archive.filename
        found = check_digest(path, archive.checksum)
        if found is not None:
            raise DataError(f"{path} does not match its published checksum "
                            f"({archive.checksum[0]} {archive.checksum[1]}, got {found}): "
                            "download it again")
        say(f"  using {path}")
        return path
    if archive.url is None:
        where = f" (not in {source_dir})" if source_dir is not None else ""
        raise DataError(f"{archive.filename}{where}: {login}")
    say(f"  downloading {archive.filename} (~{size_text(archive.size_mb)}) from {archive.url}")
    return download(archive.url, data_root / DOWNLOADS / archive.filename, archive.checksum)


def stage(keys: tuple[str, ...], data_root: Path, source_dir: Path | None, with_train: bool,
          archives: Mapping[str, Archive], login: str, say: Callable = print) -> None:
    """Fetch and extract the archives ``keys`` (skipping those already extracted)."""
    for key in keys:
        archive = archives[key]
        prefixes = archive.members + (archive.train_members if with_train else ())
        # Extraction record: which member prefixes already went out (not the archive:
        # an interrupted extraction leaves no record and is redone).
        done = data_root / DOWNLOADS / f"{archive.filename}.extracted.json"
        have = set(json.loads(done.read_text())) if done.is_file() else set()
        if done.is_file() and set(prefixes) <= have:
            continue
        path = fetch(archive, data_root, source_dir, login, say)
        if prefixes:
            n = extract(path, data_root / archive.dest, prefixes)
            say(f"  extracted {n} files of {archive.filename} -> {data_root / archive.dest}")
        else:
            target = data_root / archive.dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.resolve() != target.resolve():
                shutil.copyfile(path, target)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(sorted(have | set(prefixes))))


def prepare(name: str, data_root: str | Path | None = None, *,
            source_dir: str | Path | None = None, with_train: bool = False,
            force: bool = False, spec: BenchmarkSpec | None = None,
            section: Mapping[str, Any] | None = None,
            archives: Mapping[str, Archive] | None = None,
            say: Callable[[str], Any] = print) -> list[Report]:
    """Download, extract, convert and verify benchmark ``name`` under ``data_root``.

    Args:
        name: one of ``benchmarks()``.
        data_root: target folder; None = ``$SCLIP_DATA`` or ``./data``.
        source_dir: folder with archives already downloaded (required for Cityscapes).
        with_train: also prepare the training split (learned projection).
        force: prepare again even if marked ready.
        spec: the validation spec to verify against (default: from ``section``).
        section: dataset section (default: ``conf/dataset/<name>.yaml``).
        archives: archives by key, replacing those of ``ARCHIVES``.
        say: where progress lines go.

    Returns:
        the verification reports (val, then train).

    Raises:
        DataError: a step failed; nothing is marked ready then.
    """
    section = load_section(name) if section is None else dataset_config(section)
    root = resolve_data_root(data_root)
    source = Path(source_dir).expanduser() if source_dir else None
    archives = {**ARCHIVES, **(archives or {})}
    keys = needs(section, with_train)
    convert = get_converter(section["prepare"]["converter"], name)
    specs = split_specs(section, spec, with_train)
    val = specs["val"]
    if is_ready(val, root, tuple(specs)) and not force:
        say(f"{name}: already prepared and verified under {root / val.root}")
        return []
    reports = [verify(s, root, split) for split, s in specs.items()]
    if not all(r.ok for r in reports) or force:
        if (root / val.root).is_dir():  # a tree is there: say what is wrong before fetching
            for r in reports:
                say(f"  found: {r.line()}" + "".join(f"\n    - {p}" for p in r.problems[:5]))
        check_writable_dir(root, "data_root")
        say(f"{name}: preparing under {root} (downloads up to ~"
            f"{download_size(section, archives, with_train)})")
        stage(keys, root, source, with_train, archives,
              login_instructions(name, section, root, archives), say)
        if convert is not None:
            convert(specs, root, say)
        reports = [verify(s, root, split) for split, s in specs.items()]
    for r in reports:
        say("  " + r.line())
    failed = [p for r in reports for p in r.problems]
    if failed:
        shown = "; ".join(failed[:3])
        raise DataError(f"{name}: verification failed ({len(failed)} problem(s): {shown}); "
                        f"nothing marked ready: fix or delete {root / val.root} and prepare "
                        "again")
    path = write_marker(val, root, reports)
    say(f"{name}: ready ({path})")
    return reports


def ensure_ready(spec: BenchmarkSpec, data_root: str | Path, auto_prepare: bool) -> None:
    """Make sure ``spec`` can be evaluated from ``data_root`` (called before a run).

    Returns when the benchmark is marked ready or at least laid out (its images and split
    are where the spec says). Otherwise prepares it when ``auto_prepare`` and it can be
    downloaded (announcing the size), or raises DataError with the exact command.
    """
    data_root = resolve_data_root(data_root)
    if is_ready(spec, data_root):
        return
    try:
        list_ids(spec, data_root)
        log.info("%s is laid out under %s but not verified; run python -m sclip_lab.prepare "
                 "%s data_root=%s to verify it", spec.name, data_root, spec.name, data_root)
        return
    except DataError as missing:
        reason = str(missing)
    section = load_section(spec.name) if spec.name in benchmarks() else None
    if section is None or not needs(section):
        raise DataError(f"{reason} ({spec.name} is not a benchmark that prepare knows)")
    if section["prepare"]["login"]:
        raise DataError(f"{spec.name} is missing under {data_root}: "
                        f"{login_instructions(spec.name, section, data_root, ARCHIVES)}")
    size = download_size(section, ARCHIVES)
    if not auto_prepare:
        raise DataError(f"{reason} (downloads ~{size}; auto_prepare=true prepares it "
                        "automatically)")
    log.warning("%s is missing under %s: preparing it now (downloads ~%s)", spec.name,
                data_root, size)
    prepare(spec.name, data_root, spec=spec, say=log.warning)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sclip_lab.prepare <benchmark> [key=value ...]`` -> the exit code."""
    return cli.run(argv, prepare)
