"""The report's HTML page: one Jinja2 template (autoescaped), figures embedded as base64 PNG so
the page is a single self-contained file."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>relkd accuracy report</title>
<style>
body { font-family: sans-serif; max-width: 1200px; margin: auto; padding: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 0.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child, td.text { text-align: left; }
tr.teacher td { font-style: italic; background: #f6f6f6; }
p.note { margin: 0.2em 0; font-size: 90%; color: #444; }
img { max-width: 100%; }
</style></head><body>
<h1>relkd accuracy report</h1>
{% for line in intro %}<p>{{ line }}</p>
{% endfor %}
{% for v in views %}
<h2>{{ v.title }}</h2>
{% if v.recipe %}<p>Recipe: {{ v.recipe }}.</p>{% endif %}
<table>
<tr>{% for h in v.header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in v.rows %}<tr{% if row[0].startswith("teacher (") %} class="teacher"{% endif %}>
{%- for c in row %}<td{% if loop.last and v.header[-1] == "recipe differs" %} class="text"{% endif %}>{{ c }}</td>{% endfor -%}
</tr>
{% endfor %}</table>
{% for n in v.notes %}<p class="note">{{ n }}</p>
{% endfor %}
{% endfor %}
{% if sources %}<h2>Reference sources</h2>
<ul>{% for r in sources %}<li><b>{{ r.label }}</b> ({{ r.metric }} epoch): {{ r.source }}</li>{% endfor %}</ul>
{% endif %}
{% for fig in figures %}<h2>{{ fig.title }}</h2>
<img alt="{{ fig.title }}" src="data:image/png;base64,{{ fig.data }}">
{% endfor %}
</body></html>
"""


def render_html(
    views: list[dict[str, Any]],
    intro: list[str],
    sources: dict[str, dict[str, Any]],
    images: dict[str, Path],
) -> str:
    """The page for the table views of :mod:`relkd.bench.report` (``title``, ``recipe``,
    ``header``, ``rows``, ``notes`` each), its intro lines, reference sources and figures."""
    from jinja2 import Environment

    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    figures = [
        {"title": t, "data": base64.b64encode(p.read_bytes()).decode("ascii")}
        for t, p in images.items()
    ]
    return env.from_string(TEMPLATE).render(
        views=views, intro=intro, sources=list(sources.values()), figures=figures
    )
