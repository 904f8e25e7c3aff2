"""Self-contained HTML: inline CSS, images as base64 data URIs, no scripts, nothing fetched.

Every piece of text that reaches the page goes through :func:`esc`, except markup built here
and wrapped in :class:`Raw`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Raw", "esc", "data_uri", "figure", "table", "note", "section", "page", "CSS"]


@dataclass(frozen=True)
class Raw:
    """Markup that is already safe: inserted as it is."""

    markup: str

    def __str__(self) -> str:
        return self.markup


def esc(value: object) -> str:
    """``value`` as HTML text (``Raw`` markup passes through)."""
    return value.markup if isinstance(value, Raw) else html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    """A ``data:`` URI embedding PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, alt: str, caption: str | Raw, figure_id: str | None = None) -> Raw:
    """An embedded PNG with a caption under it."""
    ident = f' id="{esc(figure_id)}"' if figure_id else ""
    return Raw(
        f'<figure{ident}><img src="{data_uri(png)}" alt="{esc(alt)}"><figcaption>{esc(caption)}</figcaption></figure>'
    )


def table(
    headers: Iterable[object],
    rows: Iterable[Iterable[object]],
    numeric: Iterable[int] = (),
    table_id: str | None = None,
    css_class: str = "",
) -> Raw:
    """A table; the columns whose positions are in ``numeric`` are right-aligned."""
    numeric = set(numeric)
    ident = f' id="{esc(table_id)}"' if table_id else ""
    cls = f' class="{esc(css_class)}"' if css_class else ""

    def cells(tag: str, values: Iterable[object]) -> str:
        return "".join(f"<{tag}{' class=num' if k in numeric else ''}>{esc(v)}</{tag}>" for k, v in enumerate(values))

    headers = list(headers)
    head = f"<thead><tr>{cells('th', headers)}</tr></thead>" if any(str(h) for h in headers) else ""
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return Raw(f"<div class=table-wrap><table{ident}{cls}>{head}<tbody>{body}</tbody></table></div>")


def note(text: str | Raw) -> Raw:
    """A small grey paragraph, for explanations under a table."""
    return Raw(f'<p class="note">{esc(text)}</p>')


def section(section_id: str, title: str, *parts: str | Raw, lead: str | Raw | None = None) -> Raw:
    """A report section with a stable id, a heading, an optional lead paragraph, and parts
    (plain strings become paragraphs)."""
    body = [f'<p class="lead">{esc(lead)}</p>' if lead else ""]
    body += [p.markup if isinstance(p, Raw) else f"<p>{esc(p)}</p>" for p in parts]
    return Raw(f'<section id="{esc(section_id)}"><h2>{esc(title)}</h2>{"".join(body)}</section>')


def page(title: str, subtitle: str, nav: list[tuple[str, str]], sections: list[Raw], footer: Raw) -> str:
    """The whole document."""
    links = "".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t in nav)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header><div class="wrap"><h1>{esc(title)}</h1><p class="sub">{esc(subtitle)}</p>'
        f"<nav>{links}</nav></div></header>"
        f'<main class="wrap">{"".join(s.markup for s in sections)}</main>'
        f'<footer id="rebuild"><div class="wrap">{footer.markup}</div></footer>'
        "</body></html>\n"
    )


CSS = """
:root { --fg: #1f2328; --muted: #57606a; --line: #d8dee4; --soft: #f6f8fa; --accent: #1f6fb2; }
* { box-sizing: border-box; }
body { margin: 0; background: #eef1f4; color: var(--fg);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.wrap { max-width: 1080px; margin: 0 auto; padding: 0 28px; }
header { background: #14273a; color: #fff; padding: 26px 0 14px; }
header h1 { margin: 0; font-size: 26px; font-weight: 650; letter-spacing: -0.01em; }
header .sub { margin: 4px 0 14px; color: #b8c7d6; }
nav { display: flex; flex-wrap: wrap; gap: 6px; }
nav a { color: #dce6f0; text-decoration: none; font-size: 13px; padding: 3px 10px;
  border: 1px solid #3a5570; border-radius: 999px; }
nav a:hover { background: #24405c; }
main { padding-top: 6px; padding-bottom: 30px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 18px 26px 20px; margin: 18px 0; box-shadow: 0 1px 2px rgba(20, 39, 58, 0.05); }
h2 { margin: 0 0 8px; font-size: 19px; font-weight: 650; }
h3 { margin: 16px 0 6px; font-size: 15px; font-weight: 650; }
p { margin: 8px 0; max-width: 78ch; }
p.lead, p.note { color: var(--muted); }
p.note { font-size: 13.5px; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--soft);
  padding: 1px 5px; border-radius: 4px; }
figure { margin: 14px 0 6px; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 4px; max-width: 90ch; }
.table-wrap { overflow-x: auto; margin: 10px 0; }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 12px; border-bottom: 1px solid #eaeef2; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; border-bottom: 1px solid var(--line); }
td.num, th.num { text-align: right; }
tbody tr:hover { background: #f8fafc; }
.grid { display: flex; flex-wrap: wrap; gap: 0 36px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(148px, 1fr)); gap: 10px;
  margin: 12px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px; text-align: center;
  font-size: 12.5px; background: #fcfdfe; }
.card img { width: 88px; height: 88px; image-rendering: pixelated; border: 1px solid #eaeef2; }
.card .wrong { color: #c92a2a; font-weight: 600; }
.card .right { color: #2b8a3e; font-weight: 600; }
.card .idx { color: var(--muted); }
.stat { display: inline-block; margin: 4px 22px 4px 0; }
.stat b { display: block; font-size: 22px; font-weight: 650; font-variant-numeric: tabular-nums; }
.stat span { color: var(--muted); font-size: 12.5px; }
.advice { border-left: 5px solid; border-radius: 6px; padding: 10px 16px; margin: 12px 0; }
.advice h3 { margin: 0 0 4px; }
.advice p { margin: 4px 0; }
.advice.too-small { background: #fff8e6; border-color: #f08c00; }
.advice.about-right { background: #ebfbee; border-color: #2f9e44; }
.advice.wasteful { background: #e7f5ff; border-color: #1c7ed6; }
.advice.unknown { background: var(--soft); border-color: #adb5bd; }
.ok { color: #2b8a3e; font-weight: 600; }
.warn { color: #c92a2a; font-weight: 600; }
footer { color: var(--muted); font-size: 13px; padding: 8px 0 30px; }
"""
