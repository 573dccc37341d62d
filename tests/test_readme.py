"""The README cannot drift from the code: its Quickstart runs, and its links resolve.

Covered:
  * the first ``python`` block under "## Quickstart" runs as pasted (``exec`` in a fresh
    namespace) and trains, evaluates and predicts what it says;
  * every relative link of README.md (and of every page under docs/) names a file that
    exists, every ``#anchor`` names a heading of its page (the anchors of the generated
    API pages are checked by ``mkdocs build --strict``), and every repository path the
    README quotes (``examples/digits.py``, ``benchmarks/README.md``, ...) exists;
  * the README links the differences page, the guides and CONTRIBUTING.md.
"""

import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
API = ROOT / "docs" / "reference" / "api"

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
QUOTED_PATH = re.compile(r"`((?:examples|benchmarks|docs|tests|hkfit)/[\w./-]+\.\w+)`")


def section(text: str, heading: str) -> str:
    """The text of the ``## heading`` section, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert match, "no ```python block"
    return match.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # no headings in code
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_quickstart_runs_as_pasted():
    pytest.importorskip("sklearn")  # the Quickstart's data (the test and examples extras)
    code = first_python_block(section(README.read_text(), "Quickstart"))
    namespace: dict = {"__name__": "readme_quickstart"}
    exec(compile(code, "README.md (Quickstart)", "exec"), namespace)

    history, model = namespace["history"], namespace["model"]
    x, x_test, y_test = namespace["x"], namespace["x_test"], namespace["y_test"]
    epochs = len(history.epoch)
    assert 1 <= epochs <= 5, "keep the Quickstart fast: a few epochs"
    assert history.epoch == list(range(epochs))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert len(history.history[key]) == epochs, key
    assert history.history["loss"][-1] < history.history["loss"][0]

    results = namespace["results"]
    assert isinstance(results, dict) and {"loss", "accuracy"} <= set(results)
    assert all(isinstance(v, float) for v in results.values())
    assert results["accuracy"] > 0.8, results
    again = model.evaluate(x_test, y_test, verbose=0)  # evaluation is deterministic
    assert again == pytest.approx(results, rel=1e-6)

    probs = np.asarray(namespace["probs"])
    assert probs.shape == (len(x_test), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert x.dtype == np.float32


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    text = page.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT)}")
        elif anchor and file.suffix == ".md" and API not in file.parents:
            if anchor not in anchors(file.read_text()):
                broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"broken links in {page.name}: {broken}"


def test_readme_links_the_differences_page():
    assert "](docs/differences-from-keras.md)" in README.read_text()


def test_readme_links_every_guide_and_contributing():
    text = README.read_text()
    guides = sorted((ROOT / "docs" / "guides").glob("*.md"))
    assert guides, "docs/guides/ holds no page"
    missing = [g.name for g in guides if f"](docs/guides/{g.name})" not in text]
    assert not missing, f"README.md links no feature line to these guides: {missing}"
    assert "](CONTRIBUTING.md)" in text


def test_readme_fits_on_a_screen():
    lines = README.read_text().count("\n")
    assert lines <= 130, f"README.md has {lines} lines: move details to docs/"


def test_quoted_repository_paths_exist():
    quoted = set(QUOTED_PATH.findall(README.read_text()))
    assert "examples/digits.py" in quoted
    missing = sorted(path for path in quoted if not (ROOT / path).exists())
    assert not missing, f"README.md quotes files that do not exist: {missing}"
