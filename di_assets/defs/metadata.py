"""What a user sees in the UI: charts and thumbnails as Markdown images, for one-record (unpartitioned)
assets only; a partition's record links its pictures as files instead."""

from __future__ import annotations

import base64
import io


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_markdown(png: bytes, alt: str) -> str:
    """A PNG (a chart) as a Markdown image; for run-wide records only, never one per partition."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def captioned_strip_markdown(items, size: int = 64) -> str:
    """A row of small thumbnails, each under its caption (a one-row Markdown table)."""
    if not items:
        return "_none_"
    cells = []
    for image, _ in items:
        im = image.copy()
        im.thumbnail((size, size))
        cells.append(f"![]({_data_uri(im)})")
    captions = [c.replace("|", "/") for _, c in items]
    return "| " + " | ".join(captions) + " |\n|" + "---|" * len(items) + "\n| " + " | ".join(cells) + " |"


def table_schema(columns) -> "dg.TableSchema":
    """A Dagster table schema from (name, type, description) triples, for the UI's Columns and tables."""
    import dagster as dg

    return dg.TableSchema(columns=[dg.TableColumn(name, kind, description=text) for name, kind, text in columns])
