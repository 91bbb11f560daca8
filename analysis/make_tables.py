"""Rebuild the paper's Tables 1–4 from result records: CSV, LaTeX and figures.

Usage::

    python analysis/make_tables.py [--root multirun/] [--out tables/]
                                   [--tables 1 2 3 4 clearclip_grid naclip_grid]
                                   [--wandb-project ENTITY/PROJECT] [--model NAME]
                                   [--pretrained TAG] [--preset sclip|paper]

Records are the ``result.json`` files that ``sclip_lab.run`` writes (any depth under
``--root``) or the finished runs of a W&B project. A record fills a cell when its summary
fields match the row exactly (attention, projection, post-processing, preprocessing); the
path and ``sweep.table`` do not matter, so hand-made runs count too. Re-runs: the newest
record wins; random-projection trials (Table 2) are averaged (mean ± sample std).

Per table N the output directory receives ``tableN.csv`` (numeric: per dataset
``<dataset>_mean``, ``_std``, ``_k``, ``_partial``, ``_paper``, ``_delta``, and ``_rerun``
after ``_paper`` in a table with re-runs by others (``table.rerun``: the methods
leaderboard); empty where missing; see ``sclip_lab.tables.render``), ``tableN.tex``
(pandas ``Styler.to_latex``, booktabs, one decimal, the best reproduced value per column
in bold) and ``tableN.png`` / ``tableN.pdf`` (reproduced vs paper per dataset, shared
x-range). "reproduced" is this lab's records, Δ = reproduced − paper. Missing cells are
"–" ("n/a" in the figures) and logged, never fatal; cells from partial splits
(``limit=``) are marked † (hatched).
The rows come from ``conf/sweep/tableN.yaml`` (``rows:``) and, for Table 4, the
preprocessing modes; the work is done by ``sclip_lab.tables``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from sclip_lab.errors import (
    EXIT_USER_ERROR,
    UserError,
    check_writable_dir,
    message_of,
    report,
)
from sclip_lab.tables import (
    PRESETS,
    TABLE_NUMBERS,
    build_table,
    console_text,
    load_local_records,
    load_wandb_records,
    named_tables,
    select_model,
    table_id,
    vit_for,
    write_backbones,
    write_table,
)

log = logging.getLogger("sclip_lab.tables")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line instead of usage + error
        report(f"{message} (analysis/make_tables.py --help)")
        self.exit(EXIT_USER_ERROR)


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="make_tables", description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=Path("multirun"),
                   help="directory searched (any depth) for result.json (default: multirun/)")
    p.add_argument("--out", type=Path, default=Path("tables"), help="output directory")
    p.add_argument("--wandb-project", metavar="ENTITY/PROJECT",
                   help="read finished runs of this W&B project instead of --root")
    p.add_argument("--tables", nargs="+", default=list(TABLE_NUMBERS), metavar="N",
                   help="tables to build: 1-4 (the paper's) and/or sweeps with a table: "
                        "section (" + ", ".join(named_tables()) + "); default: 1 2 3 4")
    p.add_argument("--model", help="model name to tabulate (default: the most common)")
    p.add_argument("--pretrained", help="pretrained tag (default: the most common of --model)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="sclip",
                   help="default short sides Tables 1-3 require: sclip (published code, "
                        "COCO-Stuff 448) or paper (336, Cityscapes 560)")
    return p.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return build_tables(args)
    except UserError as e:
        report(e)
        return EXIT_USER_ERROR


def build_tables(args: argparse.Namespace) -> int:
    """Read the records, write every requested table; UserError for unusable inputs."""
    for t in args.tables:  # before reading hundreds of records
        table_id(t)
    check_writable_dir(args.out, "--out")
    if args.wandb_project:
        try:
            records = load_wandb_records(args.wandb_project)
        except Exception as e:  # noqa: BLE001 - any API or network failure is one message
            raise UserError(f"cannot read W&B project {args.wandb_project} "
                            f"({type(e).__name__}: {message_of(e)[:200]}); check the name "
                            "and `wandb login`, or use --root with local records") from None
        source = f"W&B project {args.wandb_project}"
    else:
        if not args.root.is_dir():
            raise UserError(f"--root {args.root} is not a directory; point it at the sweep "
                            "outputs (e.g. --root multirun/)")
        records = load_local_records(args.root)
        source = str(args.root)
    if not records:
        log.warning("no finished result records in %s; tables hold the paper's values only",
                    source)
    ids = list(dict.fromkeys(table_id(t) for t in args.tables))
    if args.model is None:  # a named table over several backbones: one more CSV with them all
        for number in (i for i in ids if isinstance(i, str)):
            path = write_backbones(number, records, args.out, preset=args.preset)
            if path is not None:
                print(f"-> {path} (every backbone)")
    records, model = select_model(records, args.model, args.pretrained)
    vit = vit_for(model) if 4 in ids else None
    for number in ids:
        table = build_table(number, records, vit=vit, preset=args.preset)
        paths = write_table(table, args.out)
        print(f"\n{table.spec.heading}  [{model or 'no records'}]")
        print(console_text(table))
        print("-> " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
