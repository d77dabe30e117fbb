"""A Hugging Face hub cache built by hand, for the tests of hub ids (checkpoints, tokenizers, datasets).

huggingface_hub's layout: ``models--org--name/refs/REVISION`` holds a commit hash, ``snapshots/HASH/FILE``
is a symlink to ``blobs/SHA256``. The ``cache`` fixture points ``HF_HUB_CACHE`` and ``HF_HOME`` at a tmp
dir and sets ``HF_HUB_OFFLINE=1``; ``no_network`` makes every socket refuse to connect.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("test_hub: the network is off limits")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub and statelens see, offline."""
    root = tmp_path / "hf-home" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def publish(cache: Path, repo_id: str, source: Path, *, revision: str = "main", repo_type: str = "model") -> str:
    """Puts the files under ``source`` (subfolders kept) in ``cache`` as huggingface_hub stores a download
    of ``repo_id`` at ``revision``; returns the commit hash (derived from the content)."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(str(f).encode() + (source / f).read_bytes() for f in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in files:
        content = (source / file).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / file
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit
