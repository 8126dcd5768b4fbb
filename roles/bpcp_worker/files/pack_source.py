#!/usr/bin/env python3
"""Pack the bpcp source tree into a reproducible sdist-like tar.gz (controller side).

    pack_source.py SRC_DIR OUT.tar.gz

Takes pyproject.toml, README*, LICENSE*, MANIFEST.in, setup.cfg and the bpcp/ package
(without __pycache__ and *.pyc), sorted, with fixed mtimes and owners, so the archive
changes only when the source changes. Prints "changed" or "unchanged".
"""
import gzip
import io
import os
import sys
import tarfile

TOP_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in")
TOP_PREFIXES = ("README", "LICENSE")


def files(src):
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and (name in TOP_FILES or name.startswith(TOP_PREFIXES)):
            yield name
    for root, dirs, names in os.walk(os.path.join(src, "bpcp")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(names):
            if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                continue
            yield os.path.relpath(os.path.join(root, name), src)


def main():
    src, out = sys.argv[1], sys.argv[2]
    if not os.path.isfile(os.path.join(src, "pyproject.toml")):
        sys.exit("pack_source: no pyproject.toml in %s" % src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(set(files(src))):
            path = os.path.join(src, rel)
            info = tarfile.TarInfo("bpcp-src/" + rel)
            info.size = os.path.getsize(path)
            info.mtime = 0
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with open(path, "rb") as fh:
                tar.addfile(info, fh)
    data = gzip.compress(buf.getvalue(), mtime=0)
    old = None
    if os.path.exists(out):
        with open(out, "rb") as fh:
            old = fh.read()
    if old == data:
        print("unchanged")
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "wb") as fh:
        fh.write(data)
    os.replace(out + ".tmp", out)
    print("changed")


if __name__ == "__main__":
    main()
