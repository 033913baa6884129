"""The documentation site builds with `mkdocs build --strict`, and what it promises is there.

One test, so the pytest workers of `make test` build the site once (a few seconds). `--strict` with mkdocs.yml's `validation` already fails on a link to
a missing page or anchor; these tests check what the build cannot: every page of the nav was written, the API pages
hold the docstrings, the plots the pages show were copied, the README's own links resolve (on GitHub, where the
README is read first, and on the site), and building the docs imports neither torch nor the package.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

REPO = Path(__file__).resolve().parents[2]
# A sentence of `peftprompt.attach`'s docstring without markup, so it reads the same in the rendered HTML.
ATTACH_PHRASE = "The returned model is in the training or evaluation mode that"
HEAVY = ("torch", "transformers", "peft")  # the docs build must not import these (static analysis only)


def build_site(root: Path) -> Path:
    """The site built from this checkout into `root`, with torch, transformers and peft made unimportable."""
    stubs = root / "stubs"
    for name in HEAVY:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('the docs build imported {name}')\n")
    env = {**os.environ, "PYTHONPATH": str(stubs), "NO_MKDOCS_2_WARNING": "1"}
    out = root / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return out


def _config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml names a Python function (the heading slugs); reading the nav needs none of it.
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((REPO / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def _built(site: Path, page: str) -> Path:
    """Where mkdocs writes `page` (docs-relative .md) with directory URLs."""
    stem = page[: -len(".md")]
    if stem == "index" or stem.endswith("/index"):
        return site / (stem + ".html")
    return site / stem / "index.html"


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])


def _parse(path: Path) -> _Ids:
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _github_slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _markdown_links(text: str) -> tuple[list[str], set[str]]:
    """The inline link targets of `text` outside code, and the GitHub ids of its headings."""
    links, headings, fence = [], set(), False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        heading = re.match(r"#{1,6} (.*)", line)
        if heading:
            headings.add(_github_slug(heading.group(1)))
        line = re.sub(r"`[^`]*`", "", line)
        links += re.findall(r"\]\(([^)\s]+)\)", line)
    return links, headings


def check_every_page_of_the_nav_is_built_and_every_page_is_in_the_nav(site):
    pages = _nav_pages(_config()["nav"])
    assert {"index.md", "benchmarks.md", "faults.md", "api/index.md"} <= set(pages)
    for page in pages:
        assert (REPO / "docs" / page).is_file(), f"nav names docs/{page}, which does not exist"
        assert _built(site, page).is_file(), f"docs/{page} was not built ({_built(site, page)})"
    on_disk = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert on_disk == set(pages), f"pages outside the nav: {sorted(on_disk - set(pages))}"


def check_the_api_pages_hold_the_docstrings(site):
    source = (REPO / "peftprompt" / "methods" / "__init__.py").read_text(encoding="utf-8")
    attach = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "attach")
    assert ATTACH_PHRASE in " ".join(ast.get_docstring(attach).split()), "attach's docstring changed: update ATTACH_PHRASE"
    html = _built(site, "api/index.md").read_text(encoding="utf-8")
    assert 'id="peftprompt.attach"' in html
    assert ATTACH_PHRASE in " ".join(re.sub(r"<[^>]+>", "", html).split())
    for module, name in [("selfask", "SelfAskRunner"), ("recursive", "SelfAskCollator"), ("training", "TrainConfig")]:
        assert f'id="peftprompt.{module}.{name}"' in _built(site, f"api/{module}.md").read_text(encoding="utf-8")


def check_the_front_page_is_the_readme_and_every_image_on_the_site_is_there(site):
    front = _parse(site / "index.html").ids
    readme_ids = _markdown_links((REPO / "README.md").read_text(encoding="utf-8"))[1]
    assert readme_ids <= front, f"README headings missing from the front page: {sorted(readme_ids - front)}"
    shown = set()
    for html in site.rglob("*.html"):
        for src in _parse(html).images:
            if urlsplit(src).scheme:
                continue
            target = (html.parent / unquote(urlsplit(src).path)).resolve()
            assert target.is_file(), f"{html.relative_to(site)} shows {src}, which the site lacks"
            shown.add(target.relative_to(site.resolve()).as_posix())
    plots = {p.relative_to(REPO).as_posix() for p in REPO.glob("benchmarks/results/**/*.png")}
    referenced = set()
    for page in (REPO / "docs").rglob("*.md"):
        referenced |= {"benchmarks/results/" + m for m in re.findall(r"\(\.\./benchmarks/results/([^)]+\.png)\)", page.read_text())}
    assert referenced and referenced <= plots, f"pages show plots that do not exist: {sorted(referenced - plots)}"
    assert referenced <= shown, f"plots named by the pages but not on the site: {sorted(referenced - shown)}"


def check_the_readme_links_only_to_what_exists(site):
    links, headings = _markdown_links((REPO / "README.md").read_text(encoding="utf-8"))
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        parts = urlsplit(link)
        if parts.scheme:
            assert parts.scheme in ("http", "https"), link
            continue
        path, anchor = unquote(parts.path), parts.fragment
        if not path:
            assert anchor in headings, f"README links to #{anchor}, a heading it does not have"
            continue
        target = (REPO / path).resolve()
        assert target.exists(), f"README links to {link}: {path} does not exist"
        if anchor:
            assert path.startswith("docs/") and path.endswith(".md"), f"README links to an anchor outside docs/: {link}"
            ids = _parse(_built(site, path[len("docs/"):])).ids
            assert anchor in ids, f"README links to {link}, but the built page has no #{anchor}"


def test_the_docs_build_strict_and_hold_what_they_promise(tmp_path):
    site = build_site(tmp_path)
    check_every_page_of_the_nav_is_built_and_every_page_is_in_the_nav(site)
    check_the_api_pages_hold_the_docstrings(site)
    check_the_front_page_is_the_readme_and_every_image_on_the_site_is_there(site)
    check_the_readme_links_only_to_what_exists(site)
