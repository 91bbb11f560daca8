"""A built table as a figure: seaborn bars, ours vs the paper per dataset."""

from __future__ import annotations

from pathlib import Path

from sclip_lab.tables.collect import Table


def plot_table(table: Table, stem: Path) -> list[Path]:
    """Grouped bars, ours vs paper per dataset (sd error bars over trials); PNG and PDF."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    import seaborn as sns

    labels = [r.label for r in table.spec.rows]
    if table.spec.number == 4:  # show each mode's relative cost next to its name
        flops = table.extra["FLOPs"]
        labels = [f"{r.label} ({flops[r.key]:.1f}×)" for r in table.spec.rows]
        rename = {r.label: lab for r, lab in zip(table.spec.rows, labels, strict=True)}
        data = table.observations.assign(row=table.observations["row"].map(rename))
    else:
        data = table.observations
    columns = list(table.spec.columns.values())
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    # Scoped styles: importing this module must not restyle the caller's figures.
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        # errorbar="sd" over the trial-level rows: error bars on random trials only.
        grid = sns.catplot(
            data=data, kind="bar", x="mIoU", y="row", hue="source", col="dataset",
            order=labels, hue_order=["ours", "paper"], col_order=columns,
            col_wrap=min(4, len(columns)), errorbar="sd", capsize=0.2,
            err_kws={"linewidth": 1}, height=0.3 * len(labels) + 1.5, aspect=1.1,
            sharex=False, palette="deep")
        grid.set_titles("{col_name}")
        grid.set_axis_labels("mIoU (%)", "")
        grid.figure.suptitle(table.spec.heading, y=1.02)
        for path in paths:
            grid.figure.savefig(path, bbox_inches="tight", dpi=150)
    plt.close(grid.figure)
    return paths
