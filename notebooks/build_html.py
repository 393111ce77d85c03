"""Execute the notebooks and render them, with their figures, to static HTML pages that read offline.

    python notebooks/build_html.py [--out DIR] [--quick] [NOTEBOOK ...]

Each notebook (all of notebooks/*.ipynb by default; NOTEBOOK: a name such as 05_sampling, 05_sampling.ipynb
or a unique prefix such as 05) runs top to bottom in a fresh `python3` kernel with notebooks/ as its working
directory, as in Jupyter, then becomes DIR/NAME.html; DIR/index.html links them all by title. The committed
notebooks are only read: the outputs go into a copy in memory.

The kernel gets LDM_MINI_STATIC=1: ldm_mini.viz.sliders then draws each figure at its sliders' start values
instead of showing ipywidgets sliders, which need a live kernel that a page does not have. Notebook 09
trains a model (8.1 min on 2 CPU cores with its defaults): LDM_MINI_TRAIN_STEPS="AE,DIFFUSION" in the
environment sets its steps, and --quick sets the tests' few steps (6,6): all nine in ~3 min on 2 CPU cores.

The pages need nothing from a network: images are embedded, and the math is typeset by a copy of MathJax
in DIR/mathjax/ (from the PyPI package django-static-mathjax, in the dev extra) instead of nbconvert's
default links to a CDN. This is a script, not a module of ldm_mini: the library does not depend on
nbconvert. tests/test_notebooks_html.py opens the pages this script's functions write in a headless browser.
"""

from __future__ import annotations

import argparse
import copy
import html
import importlib.metadata
import os
import shutil
import sys
import time
from pathlib import Path

import nbformat
from jinja2 import DictLoader
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert import HTMLExporter
from tqdm import tqdm

FOLDER = Path(__file__).resolve().parent
DEFAULT_OUT = FOLDER.parent / "build" / "notebooks"
QUICK_TRAINING = "6,6"  # LDM_MINI_TRAIN_STEPS under --quick, as in the tests: autoencoder, diffusion steps
# Written into DIR by every build: a DIR holding it may be written over; any other non-empty DIR is refused
# (so a mistyped --out does not scatter pages among someone's files).
MARKER = ".ldm_mini_notebooks_html"
# One file of MathJax 3, the TeX input with all its extensions and the SVG output: SVG needs no font files
# (the CommonHTML output loads web fonts), and "full" bundles every TeX extension, so MathJax loads nothing
# more at run time. A single script tag from file:// works in every browser (no module loader, no fetch).
# django-static-mathjax: MathJax 3.2.2's release files, and no dependency (it does not need Django);
# jupyter-server-mathjax, Jupyter's, ships MathJax 2 and brings jupyter-server and two dozen packages with it.
MATHJAX_PACKAGE = "django-static-mathjax"
MATHJAX_FILES = {"tex-svg-full.js": "mathjax/static/mathjax/es5/tex-svg-full.js",
                 "LICENSE": "mathjax/static/mathjax/LICENSE"}  # fmt: skip

# nbconvert's "lab" template with every link to a network replaced or removed: require.js (nothing in
# these pages needs it: figures are PNGs), the ipywidgets renderer (static_widgets draws them instead),
# mermaid (no diagrams) and MathJax 2 from a CDN, replaced by the local MathJax 3 with the same
# delimiters and AMS equation numbers as nbconvert's MathJax 2 configuration.
TEMPLATE = r"""
{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
<script>
window.MathJax = {
  tex: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    tags: "ams"
  },
  svg: {fontCache: "global"}
};
</script>
<script defer src="mathjax/tex-svg-full.js"></script>
{%- endblock html_head_js_mathjax -%}
"""


def notebooks(names: list[str]) -> list[Path]:
    """The notebooks of FOLDER that `names` name (all of them when none), in order; SystemExit on a name
    that is none of them."""
    available = sorted(FOLDER.glob("*.ipynb"))
    if not names:
        return available
    chosen = []
    for name in names:
        stem = Path(name).name.removesuffix(".ipynb")
        exact = [p for p in available if p.stem == stem]
        matches = exact or [p for p in available if p.stem.startswith(stem)]  # or a unique prefix: "05"
        if len(matches) != 1:
            problem = f"ambiguous notebook {name!r}" if matches else f"unknown notebook {name!r}"
            raise SystemExit(f"{problem}: choose from {', '.join(p.stem for p in available)}")
        chosen.append(matches[0])
    return chosen


def title(nb) -> str:
    """The notebook's title: its first markdown heading, without the #s."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    raise ValueError("the notebook has no markdown heading to take its title from")


def execute(nb, folder: Path = FOLDER, timeout: int | None = None, **env: str) -> None:
    """Run nb top to bottom in place, in a fresh python3 kernel with `folder` as working directory and
    LDM_MINI_STATIC=1 and `env` added to this process's environment. timeout: seconds for one cell (None:
    no limit; 09's training cells run for minutes). Raises CellExecutionError, with the failing cell and its
    traceback, when a cell fails."""
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute(env={**os.environ, "LDM_MINI_STATIC": "1", **env})


def widget_html(model_id: str, state: dict) -> str | None:
    """A widget's last state as static HTML, for the kinds a progress bar is made of (tqdm's in Jupyter: an
    HBox of an HTML, a FloatProgress and an HTML), or None for any other kind."""
    model = state.get(model_id)
    if model is None:
        return None
    kind, values = model["model_name"], model["state"]
    if kind in ("HBoxModel", "VBoxModel", "BoxModel"):
        children = [widget_html(child.removeprefix("IPY_MODEL_"), state) for child in values["children"]]
        if None in children:
            return None
        flex = "row; align-items: center; gap: 0.5em" if kind == "HBoxModel" else "column"
        return f'<div style="display: flex; flex-direction: {flex}">{"".join(children)}</div>'
    if kind in ("HTMLModel", "HTMLMathModel"):
        return f"<div>{values.get('value', '')}</div>"  # the widget's value is HTML, shown as HTML
    if kind == "LabelModel":
        return f"<div>{html.escape(values.get('value', ''))}</div>"
    if kind in ("FloatProgressModel", "IntProgressModel"):
        return f'<progress value="{values.get("value", 0)}" max="{values.get("max", 100)}"></progress>'
    return None


def static_widgets(nb):
    """A copy of nb in which each widget output is replaced by its last state as static HTML (a progress
    bar at its end, 100%), when widget_html knows its kind, else by its text fallback: a page has no kernel
    to draw widgets with, nor (offline) the ipywidgets renderer. nbclient saved the widgets' last states in
    the notebook's metadata."""
    nb = copy.deepcopy(nb)
    state = (
        nb.metadata.pop("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    )
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
            if view is not None and (static := widget_html(view["model_id"], state)) is not None:
                output.data = {"text/html": static}
    return nb


def render(nb) -> str:
    """The executed notebook as one HTML page: figures embedded, the math typeset by ./mathjax/ (see
    prepare), widgets drawn as they ended (static_widgets), nothing loaded from a network; its <title> is
    the notebook's title."""
    exporter = HTMLExporter(
        template_file="offline.html.j2", extra_loaders=[DictLoader({"offline.html.j2": TEMPLATE})]
    )
    exporter.embed_images = True  # markdown's images too (outputs' figures are always embedded)
    body, _ = exporter.from_notebook_node(static_widgets(nb), resources={"metadata": {"name": title(nb)}})
    return body


def prepare(out: Path) -> None:
    """Make `out` ready for pages: create it, or refuse a non-empty folder that no build wrote (SystemExit),
    and copy MathJax into out/mathjax/."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(
            f"--out {out}: the folder is not empty and is not a previous build of these pages (no {MARKER} "
            "in it): give an empty or new folder"
        )
    try:
        distribution = importlib.metadata.distribution(MATHJAX_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"MathJax is missing: pip install {MATHJAX_PACKAGE} (or the dev extra, pip install -e '.[dev]')"
        ) from None
    (out / "mathjax").mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("Written by notebooks/build_html.py, which may write over this folder.\n")
    for name, path in MATHJAX_FILES.items():
        shutil.copyfile(distribution.locate_file(path), out / "mathjax" / name)


def write_page(out: Path, name: str, nb) -> Path:
    page = out / f"{name}.html"
    page.write_text(render(nb), encoding="utf-8")
    return page


def write_index(out: Path) -> Path:
    """out/index.html: a link to each notebook's page present in `out`, titled like the notebook."""
    items = []
    for path in sorted(FOLDER.glob("*.ipynb")):
        if (out / f"{path.stem}.html").exists():
            heading = title(nbformat.read(path, as_version=4))
            items.append(f'<li><a href="{path.stem}.html">{html.escape(heading)}</a></li>')
    index = out / "index.html"
    index.write_text(
        f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>ldm_mini: the notebooks</title>
<style>body {{ font-family: sans-serif; max-width: 48em; margin: 2em auto; line-height: 1.6; }}</style>
</head>
<body>
<h1>ldm_mini: the notebooks</h1>
<p>Latent Diffusion step by step, executed top to bottom by <code>notebooks/build_html.py</code>.
Run them yourself: <code>pip install -e ".[notebooks]" &amp;&amp; jupyter lab notebooks/</code>.</p>
<ul>
{chr(10).join(items)}
</ul>
</body>
</html>
""",
        encoding="utf-8",
    )
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", metavar="NOTEBOOK", help="names (default: all of them)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"the pages' folder (default {DEFAULT_OUT})",
    )
    quick = f"notebook 09 trains a few steps (LDM_MINI_TRAIN_STEPS={QUICK_TRAINING})"
    parser.add_argument("--quick", action="store_true", help=quick)
    args = parser.parse_args(argv)
    paths = notebooks(args.notebooks)
    out = args.out.resolve()
    prepare(out)
    env = {"LDM_MINI_TRAIN_STEPS": QUICK_TRAINING} if args.quick else {}
    bar = tqdm(paths, unit="notebook")
    for path in bar:
        bar.set_description(path.stem)
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        try:
            execute(nb, FOLDER, **env)
        except CellExecutionError as error:
            bar.close()
            raise SystemExit(f"{path.name}: a cell failed, no page written for it:\n{error}") from None
        write_page(out, path.stem, nb)
        bar.write(f"{path.stem}: {time.perf_counter() - start:.0f} s")
    index = write_index(out)
    print(f"{len(paths)} page(s) in {out}; open {index}")


if __name__ == "__main__":
    sys.exit(main())
