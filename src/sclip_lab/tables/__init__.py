"""The paper's Tables 1–4 rebuilt from result records, beside the paper's numbers.

``layout`` (rows from ``conf/sweep/tableN.yaml`` and ``conf/preprocess/modeK.yaml``,
columns) → ``collect`` (records → cells) → ``render`` (numeric CSV, console, LaTeX) and
``plot`` (figures); ``paper`` holds the published values. ``analysis/make_tables.py`` is
the CLI. Every view sets "reproduced" (this lab's records) beside "paper", and a
named table with ``table.rerun`` (``published``) also beside "re-run" (re-runs by others).
"""

from __future__ import annotations

from sclip_lab.tables.collect import (
    MIN_TRIALS,
    Table,
    backbone_groups,
    build_table,
    field_value,
    flops_column,
    load_local_records,
    load_wandb_records,
    matches,
    pick_records,
    preprocess_of,
    select_model,
    vit_for,
)
from sclip_lab.tables.layout import (
    ABLATION_COLUMNS,
    DEFAULT_SHORT_SIDE,
    MISSING,
    PAPER,
    PAPER_SHORT_SIDE,
    PARTIAL_MARK,
    PRESETS,
    REPRODUCED,
    RERUN,
    TABLE1_COLUMNS,
    TABLE_NUMBERS,
    Row,
    TableSpec,
    method_label,
    named_tables,
    preprocess_modes,
    table_id,
    table_ids,
    table_spec,
    uncovered_variants,
)
from sclip_lab.tables.plot import figure_of, plot_table
from sclip_lab.tables.render import (
    BACKBONE,
    CSV_RERUN,
    CSV_STATS,
    backbone_csv_frame,
    console_frame,
    console_text,
    csv_frame,
    display_frame,
    latex_text,
    notes,
    to_latex,
    write_backbones,
    write_table,
)

__all__ = [
    "ABLATION_COLUMNS", "BACKBONE", "CSV_RERUN", "CSV_STATS", "DEFAULT_SHORT_SIDE",
    "MIN_TRIALS", "MISSING", "PAPER",
    "PAPER_SHORT_SIDE", "PARTIAL_MARK", "PRESETS", "REPRODUCED", "RERUN", "TABLE1_COLUMNS",
    "TABLE_NUMBERS", "Row", "Table", "TableSpec", "backbone_csv_frame", "backbone_groups",
    "build_table", "console_frame",
    "console_text", "csv_frame", "display_frame", "field_value", "figure_of", "flops_column",
    "latex_text", "load_local_records", "load_wandb_records", "matches", "method_label",
    "named_tables", "notes", "pick_records", "plot_table", "preprocess_modes",
    "preprocess_of", "select_model", "table_id", "table_ids", "table_spec", "to_latex",
    "uncovered_variants", "vit_for", "write_backbones", "write_table",
]
