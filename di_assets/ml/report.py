"""The diagnosis report: charts and one self-contained HTML page from the diagnosis DuckDB views.

Reads the views `predictions`, `accuracy`, `shift_failures`, `class_failures` and `real_vs_base`
of an open duckdb connection (read-only is enough). Charts are drawn on `matplotlib.figure.Figure`
objects with the Agg canvas (no pyplot global state, so rendering is thread-safe); matplotlib,
duckdb and PIL are imported inside the functions to keep this module light. No Dagster import.
"""

from __future__ import annotations

import base64
import html
import math
import os
from datetime import datetime
from io import BytesIO
from pathlib import Path

BASE = "base"
DPI = 100
THUMB_MIN = 96  # thumbnails smaller than this are enlarged (nearest neighbour)
THUMB_MAX = 160  # larger images are shrunk to keep the page small
ANNOTATE_MAX_CLASSES = 30

# colours of the accuracy chart (colour-blind safe pair for "drop" / "no drop")
C_BASE = "#222222"
C_OK = "#1f77b4"
C_SIG = "#d62728"


# --------------------------------------------------------------------------------------------
# small helpers


def _rows(con, sql: str, params: list | None = None) -> list[dict]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def _has_relation(con, name: str) -> bool:
    return bool(con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]
    ).fetchone()[0])


def _num(x) -> float:
    """A SQL number (or NULL) as a float, NULL as NaN."""
    return float("nan") if x is None else float(x)


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"


def _fmt_ci(lo, hi, digits: int = 3) -> str:
    if lo is None or hi is None:
        return "n/a"
    return f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def _mpl(s) -> str:
    """Text for matplotlib: `$` would start mathtext, so escape it."""
    return str(s).replace("$", r"\$")


def _e(s) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def _png_bytes(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    finally:
        fig.clear()
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _empty_chart(message: str) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2), dpi=DPI)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, _mpl(message), ha="center", va="center", fontsize=11)
    return _png_bytes(fig)


def _order_shifts(shifts: list[str], accuracy: dict[str, float], shifts_order: list[str] | None) -> list[str]:
    """Base first, then by accuracy (highest first, worst last); `shifts_order` overrides.

    Shifts present in the data but absent from `shifts_order` follow it, sorted by accuracy.
    """
    present = list(dict.fromkeys(shifts))

    def by_acc(s):
        a = accuracy.get(s, float("nan"))
        return (math.isnan(a), -a if not math.isnan(a) else 0.0, s)

    if shifts_order:
        head = [s for s in dict.fromkeys(shifts_order) if s in present]
        rest = sorted((s for s in present if s not in head), key=by_acc)
        if BASE in rest:
            rest.remove(BASE)
            head.insert(0, BASE)
        return head + rest
    rest = sorted((s for s in present if s != BASE), key=by_acc)
    return ([BASE] if BASE in present else []) + rest


def _shift_accuracy(con, classifier: str) -> dict[str, float]:
    return {r["shift"]: _num(r["accuracy"]) for r in _rows(
        con, "SELECT shift, accuracy FROM shift_failures WHERE classifier = ?", [classifier])}


# --------------------------------------------------------------------------------------------
# charts


def accuracy_chart(con, classifier: str, shifts_order: list[str] | None = None) -> bytes:
    """PNG: accuracy on kept images per shift with 95% intervals; significant drops in red."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = _rows(con, """
        SELECT shift, accuracy, acc_low, acc_high, base_accuracy, "drop", drop_low, drop_high,
               significant, classes, classes_dropping
        FROM shift_failures WHERE classifier = ?""", [classifier])
    if not rows:
        return _empty_chart(f"no shift results for classifier {classifier}")
    by_shift = {r["shift"]: r for r in rows}
    order = _order_shifts(list(by_shift), {s: _num(r["accuracy"]) for s, r in by_shift.items()},
                          shifts_order)
    n = len(order)

    fig = Figure(figsize=(max(6.0, 2.0 + 0.42 * n), 4.6), dpi=DPI)
    ax = fig.add_subplot()
    # the line sits at the base row's accuracy (all classes); other rows' base_accuracy may cover fewer classes
    base_acc = _num(by_shift[BASE]["accuracy"]) if BASE in by_shift else float("nan")
    if math.isnan(base_acc):
        base_acc = next((_num(r["base_accuracy"]) for r in rows if r["base_accuracy"] is not None), float("nan"))
    if not math.isnan(base_acc):
        ax.axhline(base_acc, color="#888888", linestyle="--", linewidth=1.2, zorder=1)

    groups = {"base": ([], C_BASE), "ok": ([], C_OK), "sig": ([], C_SIG)}
    for i, s in enumerate(order):
        r = by_shift[s]
        key = "base" if s == BASE else ("sig" if r["significant"] else "ok")
        groups[key][0].append((i, r))
    for key, (items, colour) in groups.items():
        if not items:
            continue
        xs, ys, lo_err, hi_err = [], [], [], []
        for i, r in items:
            a = _num(r["accuracy"])
            if math.isnan(a):
                ax.text(i, 0.02, "n/a", ha="center", va="bottom", fontsize=8, color="#666666")
                continue
            lo, hi = _num(r["acc_low"]), _num(r["acc_high"])
            xs.append(i)
            ys.append(a)
            lo_err.append(0.0 if math.isnan(lo) else max(0.0, a - lo))
            hi_err.append(0.0 if math.isnan(hi) else max(0.0, hi - a))
        if xs:
            ax.errorbar(xs, ys, yerr=[lo_err, hi_err], fmt="o", color=colour, ecolor=colour,
                        elinewidth=1.6, capsize=4, markersize=7, zorder=3)

    handles = [
        Line2D([], [], color="#888888", linestyle="--", label="base accuracy"),
        Line2D([], [], color=C_BASE, marker="o", linestyle="", label="base"),
        Line2D([], [], color=C_OK, marker="o", linestyle="", label="no significant drop"),
        Line2D([], [], color=C_SIG, marker="o", linestyle="", label="significant drop\n(95% CI of drop > 0)"),
        Line2D([], [], color="#444444", marker="|", markersize=12, linestyle="", label="95% interval"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9,
              frameon=False, borderaxespad=0.0)
    ax.set_xticks(range(n))
    ax.set_xticklabels([_mpl(s) for s in order], rotation=45 if n > 4 else 0,
                       ha="right" if n > 4 else "center", rotation_mode="anchor", fontsize=9)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0.0, 1.03)  # a little headroom so that caps at 1.0 are not clipped
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.spines["left"].set_bounds(0.0, 1.0)
    ax.grid(axis="y", color="#dddddd", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    ax.set_ylabel("accuracy on kept images")
    ax.set_xlabel("shift")
    ax.set_title(_mpl(f"{classifier}: accuracy per shift (mean over classes, 95% interval)"), fontsize=11)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _png_bytes(fig)


# Per shift, the numbers matplotlib's boxplot draws (cbook.boxplot_stats, whis=1.5) for sim_class (`c`)
# and sim_shift (`s`): quartiles (linear interpolation, as numpy's percentile), and the most extreme
# value within 1.5 IQR of the box on each side. Computed where the rows are: at ImageNet-1k's 1.2
# million images, handing every score to Python as a list took 0.3 s and growing.
BOX_SQL = """
    WITH q AS (
        SELECT shift, avg(kept::INTEGER) AS kept,
               quantile_cont(sim_class::DOUBLE, [0.25, 0.5, 0.75]) AS c,
               quantile_cont(sim_shift::DOUBLE, [0.25, 0.5, 0.75]) AS s
        FROM scores GROUP BY shift)
    SELECT q.shift, any_value(q.kept) AS kept, any_value(q.c) AS c, any_value(q.s) AS s,
           min(x.sim_class::DOUBLE) FILTER (WHERE x.sim_class::DOUBLE >= q.c[1] - 1.5 * (q.c[3] - q.c[1])) AS c_lo,
           max(x.sim_class::DOUBLE) FILTER (WHERE x.sim_class::DOUBLE <= q.c[3] + 1.5 * (q.c[3] - q.c[1])) AS c_hi,
           min(x.sim_shift::DOUBLE) FILTER (WHERE x.sim_shift::DOUBLE >= q.s[1] - 1.5 * (q.s[3] - q.s[1])) AS s_lo,
           max(x.sim_shift::DOUBLE) FILTER (WHERE x.sim_shift::DOUBLE <= q.s[3] + 1.5 * (q.s[3] - q.s[1])) AS s_hi
    FROM q JOIN scores x ON x.shift = q.shift GROUP BY q.shift"""


def box_stats(row: dict, name: str) -> dict:
    """BOX_SQL's numbers for `name` (c or s) as matplotlib's bxp takes them; a whisker never reaches
    inside the box (boxplot_stats: no value within reach on a side puts the whisker at the quartile)."""
    q1, med, q3 = row[name]
    lo, hi = row[f"{name}_lo"], row[f"{name}_hi"]
    return {"q1": q1, "med": med, "q3": q3, "whislo": q1 if lo is None or lo > q1 else lo,
            "whishi": q3 if hi is None or hi < q3 else hi}


def score_chart(con, shifts_order: list[str] | None = None) -> bytes:
    """PNG: per shift, the distribution of sim_class and sim_shift over every image (box plots), and
    the share the CLIP filter kept (bars), from the `scores` view."""
    from matplotlib.figure import Figure

    rows = _rows(con, BOX_SQL)
    if not rows:
        return _empty_chart("no scores yet")
    by_shift = {r["shift"]: r for r in rows}
    order = [s for s in (shifts_order or []) if s in by_shift] or sorted(by_shift, key=lambda s: (s != BASE, s))
    n = len(order)
    fig = Figure(figsize=(max(6.5, 2.0 + 0.45 * n), 6.4), dpi=DPI)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    xs = list(range(n))
    for name, dx, colour, label in (("c", -0.18, "#ff7f0e", "sim_class: image vs 'a photo of a <class>'"),
                                    ("s", 0.18, C_OK, "sim_shift: image vs the shift caption")):
        box = top.bxp([box_stats(by_shift[s], name) for s in order], positions=[x + dx for x in xs], widths=0.32,
                      patch_artist=True, showfliers=False, manage_ticks=False)
        for patch in box["boxes"]:
            patch.set(facecolor=colour, alpha=0.55, edgecolor=colour)
        for part in ("medians", "whiskers", "caps"):
            for line in box[part]:
                line.set(color=colour)
        box["boxes"][0].set_label(label)
    top.set_ylabel("CLIP cosine similarity")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    top.grid(axis="y", color="#dddddd", linewidth=0.8)
    top.set_title("CLIP scores per shift (box: quartiles, whiskers: 1.5 IQR) and the filter's kept share", fontsize=11)
    kept = [_num(by_shift[s]["kept"]) for s in order]
    bottom.bar(xs, kept, color=[C_SIG if k < 0.5 else C_OK for k in kept], width=0.6)
    for x, k in zip(xs, kept):  # the value, so that 0 reads as 0 and not as missing
        bottom.text(x, min(k, 1.0) + 0.03, f"{k:.2f}".lstrip("0") if k < 1 else "1", ha="center", va="bottom", fontsize=7)
    bottom.set_ylim(0, 1.15)
    bottom.set_yticks([0, 0.5, 1.0])
    bottom.set_ylabel("kept fraction\n(red: under half)")
    bottom.set_xlabel("shift")
    bottom.grid(axis="y", color="#dddddd", linewidth=0.8)
    bottom.set_xticks(xs)
    bottom.set_xticklabels([_mpl(s) for s in order], rotation=45 if n > 4 else 0,
                           ha="right" if n > 4 else "center", rotation_mode="anchor", fontsize=9)
    for ax in (top, bottom):
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return _png_bytes(fig)


def loss_chart(curves: dict[str, list[float]], evals: dict[str, tuple[float, float]] | None = None) -> bytes:
    """PNG: each token's training loss per step (smoothed; raw values faint), one colour per token, and
    its fixed-batch evaluation loss before -> after training in the legend."""
    from matplotlib.figure import Figure

    if not curves:
        return _empty_chart("no loss curves")
    fig = Figure(figsize=(7.5, 3.8), dpi=DPI)
    ax = fig.add_subplot()
    for i, (token, losses) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, j - k + 1):j + 1]) / len(losses[max(0, j - k + 1):j + 1]) for j in range(len(losses))]
        steps = list(range(1, len(losses) + 1))
        ax.plot(steps, losses, color=colour, alpha=0.25, linewidth=0.8)
        before, after = (evals or {}).get(token, (float("nan"), float("nan")))
        label = token if math.isnan(before) else f"{token}: eval {before:.4f} → {after:.4f}"
        ax.plot(steps, smooth, color=colour, linewidth=1.8, label=_mpl(label))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE of the predicted noise)")
    ax.set_title("textual inversion: loss per step (smoothed over ~5% of the steps)", fontsize=11)
    ax.grid(color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False,
              title="token: fixed-batch loss before → after", title_fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _png_bytes(fig)


def heatmap_chart(con, classifier: str, shifts_order: list[str] | None = None) -> bytes:
    """PNG: class × shift accuracy on kept images; grey cells have no kept image."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = _rows(con, """
        SELECT class_key, any_value(class_name) AS class_name, shift, max(accuracy) AS accuracy
        FROM accuracy WHERE classifier = ? GROUP BY class_key, shift""", [classifier])
    if not rows:
        return _empty_chart(f"no per-class accuracy for classifier {classifier}")
    shifts = sorted({r["shift"] for r in rows})
    sacc = _shift_accuracy(con, classifier)
    if not sacc:  # no shift summary: order by the mean over classes
        for s in shifts:
            vals = [_num(r["accuracy"]) for r in rows if r["shift"] == s and r["accuracy"] is not None]
            sacc[s] = sum(vals) / len(vals) if vals else float("nan")
    order = _order_shifts(shifts, sacc, shifts_order)
    keys = sorted({r["class_key"] for r in rows})
    names = {r["class_key"]: (r["class_name"] if r["class_name"] is not None else r["class_key"]) for r in rows}
    counts: dict[str, int] = {}
    for k in keys:
        counts[names[k]] = counts.get(names[k], 0) + 1
    labels = [names[k] if counts[names[k]] == 1 else f"{names[k]} ({k})" for k in keys]

    m = np.full((len(keys), len(order)), np.nan)
    ki = {k: i for i, k in enumerate(keys)}
    si = {s: j for j, s in enumerate(order)}
    for r in rows:
        m[ki[r["class_key"]], si[r["shift"]]] = _num(r["accuracy"])

    nr, nc = m.shape
    annotate = nr <= ANNOTATE_MAX_CLASSES
    width = max(5.5, 2.6 + (0.52 if annotate else 0.32) * nc + 0.06 * max(len(x) for x in labels))
    height = min(60.0, max(3.0, 1.9 + 0.3 * nr))
    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_subplot()
    cmap = colormaps["RdYlGn"].with_extremes(bad="#bdbdbd")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                   interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("accuracy")
    if annotate:
        fontsize = 8 if nc <= 16 else 7
        for i in range(nr):
            for j in range(nc):
                v = m[i, j]
                if math.isnan(v):
                    ax.text(j, i, "–", ha="center", va="center", fontsize=fontsize, color="#555555")
                    continue
                # dark text on the light middle of the colour map, white on its dark ends
                colour = "white" if (v < 0.2 or v > 0.85) else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize, color=colour)
    ax.set_xticks(range(nc))
    ax.set_xticklabels([_mpl(s) for s in order], rotation=45 if nc > 3 else 0,
                       ha="right" if nc > 3 else "center", rotation_mode="anchor", fontsize=9)
    step = max(1, math.ceil(nr / 120))
    ax.set_yticks(range(0, nr, step))
    ax.set_yticklabels([_mpl(labels[i]) for i in range(0, nr, step)], fontsize=9 if nr <= 40 else 7)
    ax.set_xticks(np.arange(-0.5, nc, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, nr, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0 if nr <= 60 else 0.0)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("shift")
    ax.set_ylabel("class")
    has_nan = bool(np.isnan(m).any())
    ax.set_title(_mpl(f"{classifier}: accuracy on kept images per class and shift"), fontsize=11,
                 pad=20 if has_nan else 6)
    if has_nan:  # a key for the grey cells, between the title and the grid
        ax.legend(handles=[Patch(facecolor="#bdbdbd", edgecolor="#888888", label="no kept image")],
                  loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=8, frameon=False,
                  borderaxespad=0.15, handlelength=1.2, handleheight=1.0)
    return _png_bytes(fig)


# --------------------------------------------------------------------------------------------
# tables


def worst_shifts(con, classifier: str, n: int = 5) -> list[dict]:
    """The `n` shifts (base excluded) with the largest accuracy drop from base."""
    return _rows(con, """
        SELECT shift, accuracy, base_accuracy, "drop", drop_low, drop_high, significant, classes_dropping
        FROM shift_failures
        WHERE classifier = ? AND shift <> ?
        ORDER BY "drop" DESC NULLS LAST, shift
        LIMIT ?""", [classifier, BASE, int(n)])


def misclassified(con, classifier: str, shift: str, n: int = 6) -> list[dict]:
    """Up to `n` wrong top-1 predictions for a classifier and shift: kept images first, then dropped."""
    return _rows(con, """
        SELECT class_key, class_name, seed, image_path, label, top1, kept, drop_reason
        FROM predictions
        WHERE classifier = ? AND shift = ? AND correct1 = false
        ORDER BY CASE WHEN kept THEN 0 ELSE 1 END, class_key, seed
        LIMIT ?""", [classifier, shift, int(n)])


# --------------------------------------------------------------------------------------------
# HTML


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;
 max-width:1400px;padding:0 16px;color:#222;line-height:1.4}
h1{margin-bottom:4px} h2{margin-top:40px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{margin-top:24px} .meta{color:#666;font-size:14px} .meta code{background:#f3f3f3;padding:1px 4px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.sig{color:#b71c1c;font-weight:600} .ns{color:#555}
.chart{max-width:100%;height:auto;display:block;margin:8px 0 16px}
.strip{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0 20px}
figure{margin:0;width:170px;font-size:12px}
figure img{image-rendering:pixelated;max-width:160px;height:auto;border:1px solid #ccc;display:block}
figcaption{margin-top:4px;word-wrap:break-word}
.badge{display:inline-block;border-radius:3px;padding:0 5px;font-size:11px;margin-top:2px}
.kept{background:#e3f2e1;color:#1b5e20} .dropped{background:#fde8d7;color:#8a3b00}
.missing{width:96px;height:96px;border:1px dashed #aaa;color:#888;display:flex;align-items:center;
 justify-content:center;font-size:11px;text-align:center}
.note{color:#444;font-size:14px;max-width:900px} .seed{color:#777} .empty{color:#888;font-style:italic}
"""


def _safe_image_file(root: Path, rel) -> Path | None:
    """The image file under the storage root: `rel` resolved against `root` (an older absolute path in
    `root`, or one of another root mapped into this one; see diagnosis.storage_file), refusing `..`
    components and files outside the root."""
    from .diagnosis import storage_file

    p = storage_file(root, rel)
    return p if p is not None and p.is_file() else None


def _thumbnail_uri(path: Path) -> str | None:
    from PIL import Image

    from .io import open_rgb

    try:
        img = open_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    w, h = img.size
    if min(w, h) < THUMB_MIN:
        f = math.ceil(THUMB_MIN / max(1, min(w, h)))
        img = img.resize((w * f, h * f), Image.NEAREST)
    elif max(w, h) > THUMB_MAX:
        img.thumbnail((THUMB_MAX, THUMB_MAX), Image.LANCZOS)
    buf = BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return _data_uri(buf.getvalue())


def _table(headers: list[str], rows: list[list[str]], num_cols: set[int] = frozenset()) -> str:
    """`headers` are escaped here; the cells in `rows` must already be escaped HTML."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in num_cols else f"<td>{c}</td>"
                         for i, c in enumerate(r)) + "</tr>"
        for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sig(flag) -> str:
    return '<span class="sig">yes</span>' if flag else '<span class="ns">no</span>'


def _classifiers(con) -> list[str]:
    names: list[str] = []
    for rel in ("shift_failures", "accuracy"):
        if _has_relation(con, rel):
            names += [r[0] for r in con.execute(
                f"SELECT DISTINCT classifier FROM {rel} ORDER BY classifier").fetchall()]
    return sorted(set(n for n in names if n is not None))


def _summary_section(con, classifiers: list[str], anchors: dict[str, str]) -> str:
    rows = []
    for clf in classifiers:
        ws = worst_shifts(con, clf, n=1)
        base = _rows(con, """SELECT accuracy, acc_low, acc_high FROM shift_failures
                             WHERE classifier = ? AND shift = ?""", [clf, BASE])
        nsig = con.execute("""SELECT count(*) FILTER (significant), count(*) FROM shift_failures
                              WHERE classifier = ? AND shift <> ?""", [clf, BASE]).fetchone()
        b = base[0] if base else {"accuracy": None, "acc_low": None, "acc_high": None}
        w = ws[0] if ws else {}
        rows.append([
            f'<a href="#{anchors[clf]}">{_e(clf)}</a>',
            f"{_fmt(b['accuracy'])} {_fmt_ci(b['acc_low'], b['acc_high'])}",
            _e(w.get("shift", "n/a")),
            _fmt(w.get("accuracy")),
            _fmt(w.get("drop")),
            _fmt_ci(w.get("drop_low"), w.get("drop_high")),
            _sig(w.get("significant")) if w else "n/a",
            f"{nsig[0]} of {nsig[1]}",
        ])
    table = _table(["classifier", "base accuracy [95% CI]", "worst shift", "its accuracy", "drop",
                    "drop 95% CI", "significant", "shifts with a significant drop"], rows,
                   num_cols={3, 4})
    return f"<h2>Summary</h2>\n{table}"


def _worst_table(ws: list[dict]) -> str:
    if not ws:
        return '<p class="empty">No shifts besides base.</p>'
    rows = [[_e(w["shift"]), _fmt(w["accuracy"]), _fmt(w["base_accuracy"]), _fmt(w["drop"]),
             _fmt_ci(w["drop_low"], w["drop_high"]), _sig(w["significant"]),
             _e(w["classes_dropping"] if w["classes_dropping"] is not None else "n/a")] for w in ws]
    return _table(["shift", "accuracy", "base accuracy", "drop", "drop 95% CI", "significant",
                   "classes with a significant drop"], rows, num_cols={1, 2, 3, 6})


def _real_vs_base_section(con, clf: str) -> str:
    note = ('<p class="note">Accuracy on the real images of each class next to accuracy on the generated '
            '<em>base</em> images: a low base accuracy with a high real accuracy means the classifier '
            'fails on the generated images themselves rather than because of the shift.</p>')
    if not _has_relation(con, "real_vs_base"):
        return note + '<p class="empty">No real-vs-base comparison in this database.</p>'
    rows = _rows(con, """
        SELECT class_key, class_name, real_images, real_accuracy, real_low, real_high,
               base_images, base_accuracy, base_low, base_high
        FROM real_vs_base WHERE classifier = ? ORDER BY class_key""", [clf])
    if not rows:
        return note + '<p class="empty">No real images were evaluated for this classifier.</p>'
    out = []
    for r in rows:
        gap = (None if r["real_accuracy"] is None or r["base_accuracy"] is None
               else r["real_accuracy"] - r["base_accuracy"])
        out.append([_e(r["class_name"] if r["class_name"] is not None else r["class_key"]),
                    _e(r["real_images"]), f"{_fmt(r['real_accuracy'])} {_fmt_ci(r['real_low'], r['real_high'])}",
                    _e(r["base_images"]), f"{_fmt(r['base_accuracy'])} {_fmt_ci(r['base_low'], r['base_high'])}",
                    _fmt(gap)])
    return note + _table(["class", "real images", "real accuracy [95% CI]", "base images",
                          "base accuracy [95% CI]", "real − base"], out, num_cols={1, 3, 5})


def _strip(con, root: Path, clf: str, shift: str) -> str:
    items = misclassified(con, clf, shift)
    if not items:
        return '<p class="empty">No misclassified images.</p>'
    figs = []
    for it in items:
        path = _safe_image_file(root, it["image_path"])
        uri = _thumbnail_uri(path) if path is not None else None
        alt = f"{it['class_name']} seed {it['seed']}"
        if uri is None:
            pic = f'<div class="missing">image missing<br>{_e(it["image_path"])}</div>'
        else:
            pic = f'<img src="{uri}" alt="{_e(alt)}" title="{_e(it["image_path"])}">'
        if it["kept"]:
            badge = '<span class="badge kept">kept</span>'
        else:
            badge = f'<span class="badge dropped">dropped: {_e(it["drop_reason"] or "unknown")}</span>'
        figs.append(f'<figure>{pic}<figcaption>{_e(it["label"])} → {_e(it["top1"])}'
                    f' <span class="seed">(seed {_e(it["seed"])})</span><br>{badge}</figcaption></figure>')
    return '<div class="strip">' + "".join(figs) + "</div>"


def render_html(con, storage_root: str | Path, title: str = "di-assets diagnosis", root_label: str | None = None) -> str:
    """One self-contained HTML page (charts and thumbnails as base64 data URIs, inline CSS).

    The page names the storage root as `root_label` (default: its path)."""
    root = Path(storage_root)
    classifiers = _classifiers(con)
    anchors = {c: f"clf-{i}" for i, c in enumerate(classifiers)}
    now = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">Generated {_e(now)} from storage root <code>{_e(root_label or os.fspath(root))}</code>. '
        "Accuracies are top-1 over the generated images kept by the CLIP filter; intervals are 95%; "
        "a drop is significant when its interval lies above 0.</p>",
    ]
    if not classifiers:
        parts.append('<p class="empty">No classifier results in this database.</p></body></html>')
        return "\n".join(parts)
    parts.append(_summary_section(con, classifiers, anchors))
    for clf in classifiers:
        ws = worst_shifts(con, clf, n=5)
        parts.append(f'<h2 id="{anchors[clf]}">Classifier {_e(clf)}</h2>')
        parts.append("<h3>Accuracy per shift</h3>")
        parts.append(f'<img class="chart" src="{_data_uri(accuracy_chart(con, clf))}" '
                     f'alt="{_e(f"accuracy per shift for {clf}")}">')
        parts.append("<h3>Accuracy per class and shift</h3>")
        parts.append(f'<img class="chart" src="{_data_uri(heatmap_chart(con, clf))}" '
                     f'alt="{_e(f"accuracy per class and shift for {clf}")}">')
        parts.append("<h3>Worst shifts</h3>")
        parts.append(_worst_table(ws))
        parts.append("<h3>Real images vs generated base images</h3>")
        parts.append(_real_vs_base_section(con, clf))
        for w in ws[:3]:
            parts.append(f'<h3>Misclassified in {_e(w["shift"])} '
                         f'<span class="meta">(drop {_fmt(w["drop"])} '
                         f'{_fmt_ci(w["drop_low"], w["drop_high"])})</span></h3>')
            parts.append(_strip(con, root, clf, w["shift"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(con, storage_root, out_path, title: str = "di-assets diagnosis") -> Path:
    """Render the report and write it atomically to `out_path`; return that path.

    A report inside the storage root names the root by its folder name only, so that no file of a
    copied or moved root holds the original's path."""
    from di_assets.ml.io import atomic_path

    out = Path(out_path)
    root = Path(os.path.abspath(storage_root))
    inside = os.path.commonpath([root, os.path.abspath(out)]) == str(root)
    text = render_html(con, storage_root, title=title, root_label=root.name if inside else None)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
