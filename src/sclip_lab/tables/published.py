"""A named table's published values, read from its ``table:`` section and checked.

Two sources beside this lab's records ("reproduced"): ``paper`` (each method's own paper or
README) and ``rerun`` (an independent re-run published by another paper or repository),
each ``{row key: {benchmark: mIoU}}``, with their "Avg." columns ``paper_avg`` and
``rerun_avg`` (``{row key: mIoU}``) and, for the re-runs, ``rerun_source`` (``{row key:
"short source text"}``, required for every re-run row). A key that is no row's, a
benchmark that is no column, or a value that is not a number is one ConfigError that
names the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sclip_lab.errors import ConfigError, closest, number


def published_sections(meta: Mapping[str, Any], name: str, keys: Sequence[str],
                       columns: Mapping[str, str]) -> dict[str, Any]:
    """``paper``, ``paper_avg``, ``rerun``, ``rerun_avg``, ``rerun_source`` of sweep
    ``name``'s ``table:`` section (``meta``), checked against its row ``keys`` and
    benchmark ``columns``; absent sections are ``{}`` (averages: None).

    Raises:
        ConfigError: see the module docstring.
    """
    where = f"conf/sweep/{name}.yaml: table"
    out: dict[str, Any] = {}
    for section in ("paper", "rerun"):
        out[section] = {key: _benchmarks(values, f"{where}.{section}.{key}", columns)
                        for key, values in _rows(meta, section, where, keys).items()}
        avg = f"{section}_avg"
        out[avg] = None if meta.get(avg) is None else {
            key: number(value, f"{where}.{avg}.{key}")
            for key, value in _rows(meta, avg, where, keys).items()}
    out["rerun_source"] = {key: str(text) for key, text
                           in _rows(meta, "rerun_source", where, keys).items()}
    unsourced = [k for k in dict.fromkeys([*out["rerun"], *(out["rerun_avg"] or {})])
                 if k not in out["rerun_source"]]
    if unsourced:
        raise ConfigError(f"{where}.rerun of {', '.join(unsourced)} has no source; add "
                          f"table.rerun_source: {{{unsourced[0]}: \"who re-ran it, where\"}}")
    return out


def _rows(meta: Mapping[str, Any], section: str, where: str, keys: Sequence[str]
          ) -> dict[str, Any]:
    """``table.<section>`` as ``{row key: value}``, every key one of ``keys``."""
    values = meta.get(section) or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}.{section} must map row keys to values, not {values!r}")
    for key in values:
        if str(key) not in keys:
            near = closest(str(key), keys)
            raise ConfigError(f"{where}.{section} has row '{key}', the key of no rows: entry"
                              + (f" (did you mean '{near}'?)" if near else "")
                              + f"; use a rows: key or add a rows: entry with key: {key}")
    return {str(k): v for k, v in values.items()}


def _benchmarks(values: Any, where: str, columns: Mapping[str, str]) -> dict[str, float]:
    """One row's ``{benchmark: mIoU}``, every benchmark one of the table's columns."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must map benchmarks to mIoU, e.g. "
                          f"{{{next(iter(columns))}: 50.0}}")
    for dataset in values:
        if dataset not in columns:
            near = closest(str(dataset), columns)
            raise ConfigError(f"{where} has benchmark '{dataset}', which is not a column"
                              + (f" (did you mean '{near}'?)" if near else "")
                              + f"; columns are {', '.join(columns)}")
    return {str(d): number(v, f"{where}.{d}") for d, v in values.items()}
