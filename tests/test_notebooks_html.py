"""The notebooks as static HTML pages (notebooks/build_html.py), opened in a real headless browser.

The pages are rendered by the build's own functions (prepare, write_page, write_index) from the notebooks
that tests/test_notebooks.py executed (each runs once per session; a notebook not yet executed, e.g. under
-k, is executed here). Each page opens from file:// in Debian's chromium, driven by playwright (its Python
package only: no browser download), with every request to anything but a local file blocked and counted.
A page passes when it has no console error, no page error, no failed and no non-local request; it has the
notebook's title; its figures loaded; its math was typeset by the local MathJax, without a TeX error and
with no raw TeX left in the text; and its full-page screenshot (kept under tmp_path) is not blank.

Without /usr/bin/chromium the browser tests skip (apt-get install chromium), unless LDM_MINI_REQUIRE_BROWSER=1
(set by .ci/run), when they fail.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from PIL import Image
from test_notebooks import NOTEBOOKS, build_html, executed

CHROMIUM = Path("/usr/bin/chromium")
# Root in a container needs --no-sandbox; the others keep chromium from calling home (updates, sync,
# field trials), which would show up as requests to hosts on a machine without a network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip
# Raw TeX in a markdown cell's text once MathJax is done: a $ (MathJax removes the delimiters of what it
# typesets; code spans are left out of the text) or a TeX command such as \bar or \alpha
RAW_TEX = re.compile(r"\$|\\[A-Za-z]+")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not found: apt-get install chromium to test the rendered notebooks in a browser"
        if os.environ.get("LDM_MINI_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (LDM_MINI_REQUIRE_BROWSER=1: the browser is required)")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The pages' folder, prepared by the build (MathJax copied in)."""
    out = tmp_path_factory.mktemp("pages")
    build_html.prepare(out)
    return out


def visit(browser, page_file: Path, screenshot: Path) -> dict:
    """Open page_file and report what a reader gets: the problems (console and page errors, failed
    requests, requests not to a local file), the title, the images, the math; save a full-page
    screenshot."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    problems = []
    local = ("file:", "data:")
    # Block anything that would leave the machine (a closed network would fail it anyway) and count it
    context.route(lambda url: not url.startswith(local), lambda route: route.abort())
    page = context.new_page()
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} ({r.failure})"))
    page.on("request", lambda r: r.url.startswith(local) or problems.append(f"request to {r.url}"))
    try:
        page.goto(page_file.as_uri(), wait_until="load")  # "load": after the deferred MathJax script ran
        # MathJax 3 typesets the page once it has loaded; startup.promise resolves when that is done
        typeset = page.evaluate(
            "() => window.MathJax && MathJax.startup ? MathJax.startup.promise.then(() => true) : false"
        )
        report = page.evaluate(
            """() => ({
                title: document.title,
                text: document.body.innerText,
                h1: document.querySelector("h1") ? document.querySelector("h1").innerText : null,
                images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth})),
                widgets: document.querySelectorAll('script[type*="jupyter.widget"]').length,
                progress: [...document.querySelectorAll("progress")].map(p => [p.value, p.max]),
                math: document.querySelectorAll("mjx-container").length,
                math_errors: [...document.querySelectorAll("mjx-merror")].map(e => e.textContent),
                markdown: [...document.querySelectorAll(".jp-MarkdownCell .jp-RenderedMarkdown")].map(c => {
                    const text = c.cloneNode(true);  // without the typeset math and the code spans
                    text.querySelectorAll("mjx-container, code, pre").forEach(e => e.remove());
                    return text.textContent;
                }),
                links: [...document.querySelectorAll("a[href]")].map(a => ({text: a.innerText,
                                                                           href: a.href})),
            })"""
        )
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        context.close()
    raw = sorted({m for text in report["markdown"] for m in RAW_TEX.findall(text)})
    return {**report, "typeset": typeset, "raw_tex": raw, "problems": problems}


def assert_screenshot(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 1000 and image.height >= 900, image.size
        low, high = image.convert("L").getextrema()
        assert high - low > 100, f"{path.name}: a blank screenshot (grey levels {low}..{high})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_page_reads_offline_with_its_figures_and_math(path, browser, site, tmp_path):
    nb = executed(path, tmp_path)
    heading = build_html.title(nb)
    page = build_html.write_page(site, path.stem, nb)
    seen = visit(browser, page, tmp_path / f"{path.stem}.png")
    assert seen["problems"] == [], f"{page.name}: " + "\n".join(seen["problems"])
    assert seen["title"] == heading and seen["h1"].startswith(heading), (seen["title"], seen["h1"])
    assert seen["images"], f"{page.name}: no figure"
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"]), f"{page.name}: {seen['images']}"
    assert seen["widgets"] == 0, f"{page.name}: a widget left for a widget renderer the page does not have"
    assert all(value == end for value, end in seen["progress"]), f"{page.name}: {seen['progress']}"
    if path.stem.startswith("09"):  # the training loops' tqdm bars, drawn as they ended
        assert len(seen["progress"]) == 2, seen["progress"]
        for stage in ("autoencoder", "diffusion"):
            assert re.search(rf"{stage}:\s*100%", seen["text"]), f"{page.name}: no {stage} bar at 100%"
    assert seen["typeset"] and seen["math"] > 0, f"{page.name}: MathJax typeset nothing"
    assert seen["math_errors"] == [], f"{page.name}: TeX errors {seen['math_errors']}"
    assert seen["raw_tex"] == [], f"{page.name}: raw TeX left in the text: {seen['raw_tex']}"
    assert_screenshot(tmp_path / f"{path.stem}.png")


def test_index_links_every_page_by_title(browser, site, tmp_path):
    for path in NOTEBOOKS:  # executed once for the session: already, in the whole suite
        build_html.write_page(site, path.stem, executed(path, tmp_path))
    seen = visit(browser, build_html.write_index(site), tmp_path / "index.png")
    assert seen["problems"] == [], "\n".join(seen["problems"])
    titles = [build_html.title(nbformat.read(path, as_version=4)) for path in NOTEBOOKS]
    assert [link["text"] for link in seen["links"]] == titles
    assert [link["href"] for link in seen["links"]] == [(site / f"{p.stem}.html").as_uri() for p in NOTEBOOKS]
    assert_screenshot(tmp_path / "index.png")


def test_the_checks_catch_nbconvert_s_default_page(browser, tmp_path):
    """The same checks on nbconvert's default page of a notebook with math: it loads require.js and
    MathJax from a CDN (blocked here, as a closed network would), so its math stays raw TeX."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(r"# Math" "\n\n" r"$\bar\alpha_t$")])
    from nbconvert import HTMLExporter

    page = tmp_path / "default.html"
    page.write_text(HTMLExporter().from_notebook_node(nb)[0], encoding="utf-8")
    seen = visit(browser, page, tmp_path / "default.png")
    assert any(p.startswith("request to https://") for p in seen["problems"]), seen["problems"]
    assert any(p.startswith("failed request") for p in seen["problems"]), seen["problems"]
    assert not seen["typeset"] and seen["math"] == 0
    assert seen["raw_tex"] == ["$", r"\alpha", r"\bar"]
    assert seen["images"] == []
