"""The documentation site builds (``mkdocs build --strict``) and reads as intended.

One build into a temporary directory serves every test. The API page must hold no raw
reST markup, no unresolved cross-reference and no math that arithmatex left unwrapped
(KaTeX, vendored under docs/vendor/katex, typesets the wrapped math in the browser);
every page of docs/ is in the nav and built, and every internal link and anchor of the
built site resolves. Skipped when mkdocs is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed"
)

# reST that Markdown does not turn into anything: roles, directives, ``literals``.
ROLES = r":(?:py:)?(?:math|class|func|meth|attr|mod|obj|exc|data|const|ref|doc):"
REST_ROLE = re.compile(ROLES + "`")
REST_ROLE_HTML = re.compile(ROLES)  # in the HTML, the role's argument became code
REST_DIRECTIVE = re.compile(r"^\s*\.\. [\w-]+::", re.MULTILINE)
REST_LITERAL = re.compile(r"(?<!`)``(?!`)")  # ``x``, not a ``` fence
UNRESOLVED_REF = re.compile(r"\]\[\s*maxnorm_optim[\w.]*\s*\]")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        # Not --quiet: it hides the warnings that --strict counts, and the build passes.
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


class Page(HTMLParser):
    """The ids, links and article text of one built page.

    `text` is the text of the page's article outside code, `<pre>` blocks and the
    elements arithmatex made (`class="arithmatex"`); `math` the content of the latter.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.text: list[str] = []
        self.math: list[str] = []
        self._stack: list[tuple[str, str]] = []  # (tag, role): role in "", article, skip, math

    def _role(self) -> str:
        roles = {role for _, role in self._stack}
        for role in ("math", "skip"):
            if role in roles:
                return role
        return "article" if "article" in roles else ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for key in ("id", "name"):
            if a.get(key) and (key == "id" or tag == "a"):
                self.ids.add(a[key])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag in ("img", "script", "source") and a.get("src"):
            self.links.append(a["src"])
            if tag == "script":
                self.scripts.append(a["src"])
        if tag == "link" and a.get("href") and "stylesheet" in a.get("rel", ""):
            self.links.append(a["href"])
            self.styles.append(a["href"])
        if tag in VOID:
            return
        classes = a.get("class", "").split()
        role = ""
        if tag == "article" and "md-content__inner" in classes:
            role = "article"
        elif "arithmatex" in classes:
            role = "math"
        elif tag in ("pre", "code", "script", "style", "kbd"):
            role = "skip"
        self._stack.append((tag, role))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        for i in range(len(self._stack) - 1, -1, -1):  # tolerate an unclosed child
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    def handle_data(self, data: str) -> None:
        role = self._role()
        if role == "article":
            self.text.append(data)
        elif role == "math" and "article" in {r for _, r in self._stack}:
            self.math.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def built_page(site: Path, md: Path) -> Path:
    """Where mkdocs (use_directory_urls) writes the page of a docs/ Markdown file."""
    rel = md.relative_to(DOCS).with_suffix("")
    if rel.name in ("index", "README"):
        return site / rel.parent / "index.html"
    return site / rel / "index.html"


def nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav] if nav.endswith(".md") else []
    if isinstance(nav, list):
        return [f for item in nav for f in nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in nav_files(value)]
    return []


def test_api_page_has_no_rest_markup_and_no_unresolved_references(site: Path) -> None:
    page = parse(site / "api" / "index.html")
    text = "".join(page.text)
    assert "MaxNormWrapper" in text and "max_norm_param_groups" in text  # it was rendered
    problems = [
        m.group(0)
        for rx in (REST_ROLE_HTML, REST_DIRECTIVE, UNRESOLVED_REF)
        for m in rx.finditer(text)
    ]
    if "``" in text:
        problems.append("``")
    # A backtick left in the text is a code span Markdown did not recognise.
    problems += [text[max(0, m.start() - 40) : m.end() + 40] for m in re.finditer("`", text)]
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    problems += re.findall(r"<autoref\b[^>]*>", html)  # autorefs' unresolved placeholder
    assert not problems, f"raw markup in the API page: {problems}"


def test_api_page_math_is_wrapped_for_katex(site: Path) -> None:
    page = parse(site / "api" / "index.html")
    text = "".join(page.text)
    assert page.math, "no math on the API page: is pymdownx.arithmatex configured?"
    for tex in page.math:
        tex = tex.strip()
        assert (tex.startswith("\\(") and tex.endswith("\\)")) or (
            tex.startswith("\\[") and tex.endswith("\\]")
        ), f"arithmatex output without its delimiters: {tex!r}"
    leftovers = [
        text[max(0, m.start() - 40) : m.end() + 40] for m in re.finditer(r"\$|\\\(|\\\[", text)
    ]
    assert not leftovers, f"math that arithmatex did not wrap: {leftovers}"
    # The vendored renderer and its init script are on the page and in the site.
    assets = page.scripts + page.styles
    for name in ("katex.min.js", "katex-init.js", "katex.min.css"):
        hits = [a for a in assets if a.split("?")[0].endswith(name)]
        assert hits, f"{name} is not included in the API page"
        assert (site / "api" / hits[0].split("?")[0]).resolve().is_file(), hits[0]
    fonts = site / "vendor" / "katex" / "fonts"
    css = (site / "vendor" / "katex" / "katex.min.css").read_text(encoding="utf-8")
    for font in set(re.findall(r"url\((fonts/[^)]+\.woff2)\)", css)):
        assert (fonts.parent / font).is_file(), f"KaTeX font missing: {font}"


def test_api_docstrings_are_markdown() -> None:
    """The docstrings the API page renders: no reST (``x`` would render, but as reST)."""
    idents = re.findall(r"^::: *([\w.]+)", (DOCS / "api.md").read_text(), re.MULTILINE)
    assert idents
    problems = []
    for ident in idents:
        module_name, _, attr = ident.rpartition(".")
        obj = getattr(importlib.import_module(module_name), attr)
        docs = {ident: inspect.getdoc(obj) or ""}
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if not name.startswith("_"):
                    docs[f"{ident}.{name}"] = getattr(member, "__doc__", None) or ""
        for where, doc in docs.items():
            for rx in (REST_ROLE, REST_DIRECTIVE):
                problems += [f"{where}: {m.group(0)!r}" for m in rx.finditer(doc)]
            if REST_LITERAL.search(doc):
                problems.append(f"{where}: ``double backticks``")
    assert not problems, problems


def test_every_page_is_in_the_nav_and_built(site: Path) -> None:
    import yaml  # a dependency of mkdocs

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = set(nav_files(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - in_nav == set(), f"pages missing from the nav: {sorted(pages - in_nav)}"
    assert in_nav - pages == set(), f"nav entries without a page: {sorted(in_nav - pages)}"
    for md in sorted(DOCS.rglob("*.md")):
        out = built_page(site, md)
        assert out.is_file(), f"{md.name} was not built ({out})"
        assert "<article" in out.read_text(encoding="utf-8"), out


def test_internal_links_and_anchors_resolve(site: Path) -> None:
    site = site.resolve()
    pages = {p: parse(p) for p in site.rglob("*.html")}
    broken = []
    for path, page in pages.items():
        for link in page.links:
            url = urlsplit(link)
            if url.scheme or url.netloc or link.startswith(("mailto:", "javascript:")):
                continue  # external
            if not url.path:
                dest = path
            elif url.path.startswith("/"):  # 404.html: absolute, from the site root
                dest = (site / unquote(url.path).lstrip("/")).resolve()
            else:
                dest = (path.parent / unquote(url.path)).resolve()
            if dest.is_dir():
                dest = dest / "index.html"
            where = f"{path.relative_to(site)}: {link}"
            if not dest.is_file() or not dest.is_relative_to(site):
                broken.append(where)
            elif url.fragment and dest.suffix == ".html":
                ids = pages[dest].ids if dest in pages else parse(dest).ids
                if unquote(url.fragment) not in ids:
                    broken.append(f"{where} (no such anchor)")
    assert not broken, f"broken internal links: {broken}"
