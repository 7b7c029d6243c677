"""Plain-text tables, PNG figures and self-contained HTML reports, shared by the tools.

``longkd cache inspect`` and the evals print the same kind of tables to a terminal and write
the same kind of reports, so the formatting lives here once. Figures always use matplotlib's
Agg backend (no display is needed, and a CI machine has none); an HTML report embeds its
PNGs as base64 ``data:`` URIs and its CSS inline, so the single file can be mailed or
attached to an issue and still shows everything.

    from longkd.tools import report
    print(report.text_table(["bucket", "rows"], [["0-7", 96], ["8-15", 96]]))
    fig, axes = report.subplots(1, 2)
    report.save_figure(fig, "plot.png")
    report.write_html("report.html", "My cache", [report.html_section("Summary", report.html_table(...))])
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
p.note { color: #555; font-size: 0.9em; }
"""


def format_value(value, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant digits, ints with thousands separators.

    Args:
        value: any JSON-like value; ``None`` and NaN print as ``-``.
        digits: significant digits for floats.

    Returns:
        The cell text.
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v, digits)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v, digits) for v in value)
    return str(value)


def text_table(headers: Sequence[str], rows: Iterable[Sequence], *, digits: int = 4) -> str:
    """A fixed-width table for a terminal: the first column left-aligned, the others right.

    Args:
        headers: column titles.
        rows: one sequence of cells per row (formatted with :func:`format_value`).
        digits: significant digits for floats.

    Returns:
        The table as lines joined by newlines (no trailing newline).
    """
    cells = [[format_value(c, digits) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(parts: Sequence[str]) -> str:
        out = [parts[0].ljust(widths[0])] + [p.rjust(w) for p, w in zip(parts[1:], widths[1:])]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), sep] + [line(row) for row in cells])


def key_value_table(pairs: Iterable[tuple[str, object]], *, digits: int = 4) -> str:
    """Two columns ``name: value`` for a terminal summary."""
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0) + 2
    return "\n".join(f"{(k + ':').ljust(width)}{format_value(v, digits)}" for k, v in pairs)


# ----------------------------------------------------------------------------- figures


def pyplot():
    """matplotlib.pyplot on the Agg backend (selected before pyplot is first imported)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(nrows: int = 1, ncols: int = 1, *, width: float = 5.0, height: float = 3.6, **kwargs):
    """``plt.subplots`` on the Agg backend with a size per panel (inches).

    Returns:
        ``(figure, axes)`` as matplotlib gives them.
    """
    plt = pyplot()
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), **kwargs)


def save_figure(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (parent directories created) and close it.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    pyplot().close(fig)
    return path


def png_data_uri(png: str | Path | bytes) -> str:
    """A ``data:image/png;base64,...`` URI for a PNG file or its bytes."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# ----------------------------------------------------------------------------- HTML


def html_table(headers: Sequence[str], rows: Iterable[Sequence], *, digits: int = 4) -> str:
    """An HTML ``<table>``; every cell is escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(c, digits))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_key_values(pairs: Iterable[tuple[str, object]], *, digits: int = 4) -> str:
    """A two-column HTML table of ``name | value``."""
    return html_table(["", "value"], [(k, v) for k, v in pairs], digits=digits)


def html_image(png: str | Path | bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as base64 (the report needs no other file)."""
    return f'<img src="{png_data_uri(png)}" alt="{html.escape(alt)}">'


def html_note(text: str) -> str:
    """A short explanatory paragraph (escaped)."""
    return f'<p class="note">{html.escape(text)}</p>'


def html_section(title: str, *parts: str) -> str:
    """A titled section; ``parts`` are HTML fragments from the helpers above."""
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def html_page(title: str, sections: Iterable[str]) -> str:
    """A complete, self-contained HTML document (inline CSS, no external references)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )


def write_html(path: str | Path, title: str, sections: Iterable[str]) -> Path:
    """Write :func:`html_page` to ``path`` (parent directories created).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_page(title, sections), encoding="utf-8")
    return path
