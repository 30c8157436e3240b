"""Moves the pure-Python packages of a bytecode-only site-packages into one compressed zip on sys.path.

docker/Dockerfile.sklearn runs it in its build stage, after compiling every module to a .pyc beside it and removing
the sources. A top-level package or module whose files are all bytecode goes into SITE/pure-python.zip, which
SITE/pure-python.pth puts on sys.path; Python's zipimport loads the .pyc files from there as from the directory, and
tracebacks name the file and line as before. Everything else stays a directory: the dynamic loader cannot map an
extension module out of a zip, and data files are read through __file__. The .dist-info directories stay too
(importlib.metadata reads them from site-packages).

    usage: python zip_pure_packages.py SITE
"""

from __future__ import annotations

import os
import shutil
import sys
import zipfile

ARCHIVE = "pure-python.zip"


def is_pure(path: str) -> bool:
    """Whether ``path`` (a package directory) holds bytecode and nothing else (a py.typed marker aside)."""
    files = [f for _, _, names in os.walk(path) for f in names]
    return bool(files) and all(f.endswith(".pyc") or f == "py.typed" for f in files)


def main(site: str) -> None:
    moved = []
    with zipfile.ZipFile(os.path.join(site, ARCHIVE), "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name in sorted(os.listdir(site)):
            path = os.path.join(site, name)
            if os.path.isfile(path) and name.endswith(".pyc"):
                archive.write(path, name)
                os.remove(path)
                moved.append(name)
            elif os.path.isdir(path) and not name.endswith((".dist-info", ".libs")) and is_pure(path):
                for directory, _, files in os.walk(path):
                    # directory entries too: zipimport finds namespace packages (opentelemetry) by them
                    archive.write(directory, os.path.relpath(directory, site))
                    for file in sorted(files):
                        full = os.path.join(directory, file)
                        archive.write(full, os.path.relpath(full, site))
                shutil.rmtree(path)
                moved.append(name)
    with open(os.path.join(site, ARCHIVE.replace(".zip", ".pth")), "w") as pth:
        pth.write(ARCHIVE + "\n")
    print(f"{ARCHIVE}: {len(moved)} packages and modules, {os.path.getsize(os.path.join(site, ARCHIVE)) // 10**6} MB")


if __name__ == "__main__":
    main(sys.argv[1])
