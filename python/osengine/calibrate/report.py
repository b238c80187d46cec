"""Calibration report: a markdown table of the migration sites, and a PNG of per-channel activation ranges before and
after the transformation for chosen sites."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


def _prefix_lines(report: dict) -> list:
    """The full-precision prefix the model was calibrated behind, with what detection measured."""
    if not report.get("prefix"):
        return []
    line = f"full-precision prefix (outlier tokens): {report['prefix']}"
    detection = report.get("prefix_detection")
    if detection:
        before, after = max(detection[0]["block_worst"], default=0), max(detection[-1]["block_worst"], default=0)
        line += f"; worst token / median token {before:g} without it, {after:g} behind it"
    return [line, ""]


def markdown_table(report: dict) -> str:
    lines = [f"# osengine calibration report: {report['strategy']} / {report['recipe']['name']} "
             f"({report['architecture']})", "",
             f"calibration: {report.get('calibration_tokens', '?')} tokens, "
             f"{report.get('calibration_seconds', 0):.1f} s, peak RSS {report.get('peak_rss_mib', 0):.0f} MiB", "",
             *_prefix_lines(report),
             "| block | site | shift | t | max scale | max abs before | max abs after | error before | error after |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in report["sites"]:
        mig = e.get("migration", {})
        lo, hi = e["range_before"]
        lo2, hi2 = e["range_after"]
        before = float(max(-lo.min(), hi.max()))
        after = float(max(-lo2.min(), hi2.max()))
        shift = "runtime" if mig.get("runtime_shift") else ("folded" if mig.get("shift") else "no")
        t = f"{mig['t']:.2f}" if "t" in mig else "-"
        err0 = f"{mig['error_no_migration']:.4g}" if "error_no_migration" in mig else "-"
        err1 = f"{mig['error']:.4g}" if "error" in mig else "-"
        lines.append(f"| {e['block']} | {e['site']} | {shift} | {t} | {mig.get('scale_max', 1.0):.3g} | "
                     f"{before:.3g} | {after:.3g} | {err0} | {err1} |")
    if report.get("clipping"):
        lines += ["", "Clipping searched on the block output (activation observer `search`):", "",
                  "| block | quantizers | quantile | range | MinMax range | block error | MinMax block error |",
                  "|---|---|---:|---|---|---:|---:|"]
        for c in report["clipping"]:
            (lo, hi), (mlo, mhi) = c["range"], c["minmax_range"]
            lines.append(f"| {c['block']} | {', '.join(c['quantizers'])} | {c['quantile']:g} | [{lo:.4g}, {hi:.4g}] | "
                         f"[{mlo:.4g}, {mhi:.4g}] | {c['output_error']:.4g} | {c['minmax_output_error']:.4g} |")
    return "\n".join(lines) + "\n"


def plot_ranges(report: dict, path, sites: Optional[Sequence[str]] = None, max_plots: int = 4) -> Path:
    """Per-channel [min, max] of the chosen sites' activations ("block.site", e.g. "11.down"), before and after.
    Default: the sites with the widest ranges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["sites"]
    if sites:
        wanted = set(sites)
        chosen = [e for e in entries if f"{e['block']}.{e['site']}" in wanted]
        missing = wanted - {f"{e['block']}.{e['site']}" for e in chosen}
        if missing:
            known = ", ".join(f"{e['block']}.{e['site']}" for e in entries[:6])
            raise ValueError(f"--plot-sites: unknown site(s) {sorted(missing)}; names look like {known}, ...")
    else:
        chosen = sorted(entries, key=lambda e: -float(max(-e["range_before"][0].min(), e["range_before"][1].max())))
        chosen = chosen[:max_plots]
    fig, axes = plt.subplots(len(chosen), 2, figsize=(12, 2.6 * len(chosen)), squeeze=False)
    for row, e in zip(axes, chosen):
        for ax, key, title in ((row[0], "range_before", "before"), (row[1], "range_after", "after")):
            lo, hi = (v.float().numpy() for v in e[key])
            ch = range(len(lo))
            ax.fill_between(ch, lo, hi, step="mid", color="tab:blue" if key == "range_before" else "tab:green",
                            alpha=0.7, linewidth=0)
            ax.set_title(f"block {e['block']} {e['site']} ({e['consumers'][0].split('.')[-1]} input): {title}",
                         fontsize=9)
            ax.set_xlabel("channel", fontsize=8)
            ax.tick_params(labelsize=7)
        ymax = max(-float(e["range_before"][0].min()), float(e["range_before"][1].max()), 1e-6)
        for ax in row:
            ax.set_ylim(-ymax * 1.05, ymax * 1.05)  # same scale before/after, so the squeeze is visible
    fig.suptitle(f"per-channel activation range, {report['strategy']} / {report['recipe']['name']}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir, sites: Optional[Sequence[str]] = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(markdown_table(report))
    png = plot_ranges(report, out / "activation_ranges.png", sites)
    return {"markdown": str(md), "plot": str(png)}
