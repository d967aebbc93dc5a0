"""Every relative link in README.md and docs/ points at a file that exists, and a link's #anchor at a
heading of that file (anchors as GitHub renders them)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (letters, digits, '-', '_' and
    spaces kept), spaces made hyphens."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def test_anchor_follows_github():
    assert anchor("SmolLM2 on Austen with the paper's proxy construction (3 seeds, earlier FedOT)") == \
        "smollm2-on-austen-with-the-papers-proxy-construction-3-seeds-earlier-fedot"
    assert anchor("The decoder comparison: SmolLM2-135M, 5 paired seeds") == \
        "the-decoder-comparison-smollm2-135m-5-paired-seeds"


def test_relative_links_and_anchors_resolve():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in LINK.findall(FENCE.sub("", doc.read_text())):
            if re.match(r"[a-z]+:", target):  # http(s), mailto
                continue
            path, _, frag = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
