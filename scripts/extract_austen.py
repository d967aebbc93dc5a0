"""Extract Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` into ``fedpft_dist/data/austen/``.

A one-off, reproducible maintenance script: its output is committed, so users never run it. It needs
a Debian machine (for ``apt-get download`` and ``dpkg-deb``) and the PyPI package ``rdata``, which is
not a project dependency; install it somewhere temporary::

    python3 -m venv /tmp/rdata-venv && /tmp/rdata-venv/bin/pip install rdata
    /tmp/rdata-venv/bin/python scripts/extract_austen.py            # downloads the .deb itself
    /tmp/rdata-venv/bin/python scripts/extract_austen.py --deb r-cran-janeaustenr_1.0.0-1_all.deb

What it does:

1. ``apt-get download r-cran-janeaustenr`` (only the .deb: installing it would pull all of R) and
   ``dpkg-deb -x`` it into a temporary directory.
2. Read the package's lazy-load data base ``usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}``.
   ``rdata`` cannot open the pair as such, so it is decoded by hand:

   - ``Rdata.rdx`` is an ordinary gzip-compressed RDS file, read with ``rdata.read_rds``: a list with
     ``variables`` (object name -> ``c(offset, length)`` in bytes into the .rdb), ``references`` and
     ``compressed`` (``TRUE`` = zlib, ``2`` = bzip2, ``3`` = xz).
   - Each object in ``Rdata.rdb`` is ``rdb[offset:offset + length]``: a 4-byte big-endian
     uncompressed length, then (for bzip2/xz only) one type byte, then the compressed stream. The
     decompressed bytes are an R serialization (``X\\n`` + XDR), which ``rdata.parser.parse_data``
     parses and ``rdata.conversion.convert`` turns into a numpy array of lines.

3. Join each novel's lines back into paragraphs (lines of a paragraph joined by one space; runs of
   empty lines become one blank line between paragraphs) and write one gzip-compressed UTF-8 text
   file per novel. The gzip header holds no name and mtime 0, so reruns give identical bytes.
4. Write ``SOURCE.md`` next to them with the origin and the sizes.

The text is Project Gutenberg's, unchanged apart from the line joining (``_underscores_`` mark
italics, as in the Gutenberg plain-text editions).
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import io
import lzma
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import rdata

PACKAGE = "r-cran-janeaustenr"
DATA_DIR = Path("usr/lib/R/site-library/janeaustenr/data")
OUT_DIR = Path(__file__).resolve().parents[1] / "fedpft_dist" / "data" / "austen"

# (R object name, output file stem, title, year of publication), in publication order.
NOVELS = [
    ("sensesensibility", "sense_and_sensibility", "Sense and Sensibility", 1811),
    ("prideprejudice", "pride_and_prejudice", "Pride and Prejudice", 1813),
    ("mansfieldpark", "mansfield_park", "Mansfield Park", 1814),
    ("emma", "emma", "Emma", 1815),
    ("northangerabbey", "northanger_abbey", "Northanger Abbey", 1817),
    ("persuasion", "persuasion", "Persuasion", 1817),
]


def fetch_deb(workdir: Path) -> Path:
    """Download the package's .deb (not install it) into ``workdir``."""
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise SystemExit(f"expected one {PACKAGE} .deb in {workdir}, found {debs}")
    return debs[0]


def deb_version(deb: Path) -> str:
    out = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def decompress(blob: bytes, compressed: object) -> bytes:
    """One .rdb record -> the serialized R object (see R's ``lazyLoadDBfetch``)."""
    (size,) = struct.unpack(">I", blob[:4])
    if compressed is True or compressed == 1:
        raw = zlib.decompress(blob[4:])
    else:
        # bzip2/xz records carry a type byte; '0' means the writer found compression did not pay.
        kind, payload = blob[4:5], blob[5:]
        raw = {b"2": bz2.decompress, b"Z": lzma.decompress, b"0": bytes}[kind](payload)
    if len(raw) != size:
        raise SystemExit(f"corrupt .rdb record: {len(raw)} bytes, header says {size}")
    return raw


def read_lazyload_db(base: Path) -> dict[str, list[str]]:
    """Read every object of ``base.rdx``/``base.rdb`` as a list of strings (the novels' lines)."""
    index = rdata.read_rds(str(base.with_suffix(".rdx")))
    flag = index["compressed"]
    compressed = bool(flag[0]) if flag.dtype == bool else int(flag[0])
    rdb = base.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        raw = decompress(rdb[int(offset):int(offset) + int(length)], compressed)
        value = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
        objects[str(name)] = ["" if line is None else str(line) for line in value]
    return objects


def paragraphs(lines: list[str]) -> list[str]:
    """Gutenberg hard-wrapped lines -> paragraphs (empty lines separate paragraphs)."""
    out, current = [], []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            out.append(" ".join(current))
            current = []
    if current:
        out.append(" ".join(current))
    return out


def write_gzip_text(path: Path, text: str) -> int:
    buf = io.BytesIO()
    # filename="" and mtime=0: the archive's bytes depend on the text only.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help=f"an already downloaded {PACKAGE} .deb")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb = args.deb.resolve() if args.deb else fetch_deb(tmp)
        version = deb_version(deb)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        objects = read_lazyload_db(tmp / "root" / DATA_DIR / "Rdata")

    args.out.mkdir(parents=True, exist_ok=True)
    rows, total_text, total_gz = [], 0, 0
    for name, stem, title, year in NOVELS:
        paras = paragraphs(objects[name])
        text = "\n\n".join(paras) + "\n"
        size_gz = write_gzip_text(args.out / f"{stem}.txt.gz", text)
        size_text = len(text.encode("utf-8"))
        total_text += size_text
        total_gz += size_gz
        rows.append(f"| {stem}.txt.gz | {title} ({year}) | {len(objects[name]):,} | {len(paras):,} "
                    f"| {size_text:,} | {size_gz:,} |")
        print(f"{stem}: {len(paras)} paragraphs, {size_text} bytes, {size_gz} gzipped")

    source = "\n".join([
        "# Jane Austen's six novels",
        "",
        "Public-domain English text for calibration (neuron saliency) and distillation, loaded by",
        "`fedpft_dist.data.load_public_text(\"austen\")`.",
        "",
        "- **Texts**: Project Gutenberg editions of the novels, public domain (Jane Austen died in 1817).",
        f"- **Taken from**: the Debian package `{PACKAGE}` version `{version}` (the CRAN R package",
        "  `janeaustenr` 1.0.0 by Julia Silge, MIT licence for the packaging), file",
        f"  `/{DATA_DIR}/Rdata.rdb`.",
        "- **Changes**: the hard-wrapped lines of each paragraph are joined with one space; paragraphs are",
        "  separated by one blank line. Nothing else is changed (`_underscores_` mark italics, as in",
        "  Gutenberg's plain text). Files are UTF-8, gzip-compressed.",
        "- **Reproduce**: `scripts/extract_austen.py` (its docstring says how).",
        "",
        "| file | novel | lines in source | paragraphs | UTF-8 bytes | gzip bytes |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        f"| **total** | | | | {total_text:,} | {total_gz:,} |",
        "",
    ])
    (args.out / "SOURCE.md").write_text(source, encoding="utf-8")
    print(f"total: {total_text} bytes of text, {total_gz} gzipped -> {args.out}")


if __name__ == "__main__":
    main()
