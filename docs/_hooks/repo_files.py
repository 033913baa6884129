"""mkdocs hook: what the site shows from outside docs/, read where it lives in the repository.

- The front page (``docs/index.md``) is ``README.md`` itself, its links to ``docs/<page>.md`` made relative to
  docs/, so the README and the site's home page cannot drift apart.
- The plots, ``benchmarks/results/**/*.png``, are added to the site as ``benchmarks/results/...``. A page links a
  plot as ``../benchmarks/results/<name>.png`` and the README as ``../README.md``, the right paths when the page is
  read on GitHub; here they become the site's copy of the plot and the front page.

Nothing is copied into docs/, so a fresh clone builds with ``mkdocs build --strict`` as it is, and a regenerated
plot shows on the next build. Standard library and mkdocs only: building the docs imports neither peftprompt nor
torch.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


def on_files(files, config):
    for path in sorted(RESULTS.rglob("*.png")):
        files.append(File.generated(config, path.relative_to(REPO).as_posix(), abs_src_path=str(path)))
    return files


def on_page_read_source(page, config):
    if page.file.src_uri == "index.md":
        return (REPO / "README.md").read_text(encoding="utf-8").replace("](docs/", "](")
    return None


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # folders between docs/ and the page
    to_repo, to_docs = "../" * (depth + 1), "../" * depth
    markdown = markdown.replace("](" + to_repo + "README.md", "](" + to_docs + "index.md")
    return markdown.replace("](" + to_repo + "benchmarks/results/", "](" + to_docs + "benchmarks/results/")
