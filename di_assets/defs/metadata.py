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
    """A PNG (a chart) as a Markdown image; for run-wide records only, never one per partition.

    As 256 colours: a chart's flat fills and antialiased lines look the same, and the record shrinks
    (scores_db's chart of 24 shifts: 93 KB -> 35 KB, stored in every materialization of it)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


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
