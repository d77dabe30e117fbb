"""Hub ids: ``ORG/NAME[@REVISION]`` resolved to a local directory through ``huggingface_hub``'s cache.

Start with :func:`resolve`. A path that exists is used as it is (a local directory of the same name
as a hub id wins). Otherwise a string shaped like a hub id is looked up in the local cache first
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), then, unless
``HF_HUB_OFFLINE`` is set, downloaded: only the files asked for (``patterns``), never a whole repository.

Both environment variables are read at call time and passed to ``huggingface_hub`` explicitly
(``cache_dir``, ``local_files_only``): the library reads its own copies once, at import.

Every failure is a :class:`~statelens.errors.BadInput` (one line naming the id and what to do); nothing
here prints.
"""
from __future__ import annotations

import os
import re
from fnmatch import fnmatch
from dataclasses import dataclass
from pathlib import Path

from statelens.errors import BadInput

# ORG/NAME with the Hub's characters, then an optional @REVISION (a branch, tag or commit hash).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubSource:
    """Where a hub-resolved directory came from: recorded in run.json, shown in the output."""

    repo_id: str      # ORG/NAME
    revision: str     # as asked: "main" unless ``@REVISION`` was given
    commit: str       # the commit hash the revision resolved to (the snapshot folder's name)

    def describe(self) -> str:
        return f"{self.repo_id}@{self.revision} (hub cache, commit {self.commit[:12]})"

    def to_json(self) -> dict:
        return {"id": self.repo_id, "revision": self.revision, "commit": self.commit}


def parse_hub_id(spec: str) -> tuple[str, str] | None:
    """``"ORG/NAME@REV"`` -> ``("ORG/NAME", "REV")`` (revision "main" when absent); None if not an id."""
    match = _HUB_ID.fullmatch(str(spec))
    if match is None or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"] or "main"


def cache_dir() -> Path:
    """The hub cache ``huggingface_hub`` would use with the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (1, ON, YES or TRUE, any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve(spec: str | os.PathLike, files: list[str], choices: tuple[list[str], ...] = (), *, what: str = "checkpoint",
            required: tuple[str, ...] = ("config.json",), repo_type: str = "model") -> tuple[Path, HubSource | None]:
    """A local directory for ``spec`` and, when it came from the hub, where from.

    ``files``: patterns always fetched; ``choices``: alternatives tried in order until one matches a file
    of the repository (e.g. the safetensors weights, else the ``.bin`` ones), so only one is downloaded.
    ``required``: files of which a snapshot must hold one (else a cached one counts as absent; none: any
    snapshot will do). ``what`` names the thing in messages; ``repo_type`` is "model" or "dataset".
    """
    path = Path(spec)
    parsed = parse_hub_id(os.fspath(spec))
    if path.exists() or parsed is None:
        return path, None
    repo, revision = parsed
    kind = {"repo_type": repo_type, "cache_dir": cache_dir()}
    folder = _cached(repo, revision, files, choices, required, kind)
    if folder is None:
        if offline():
            fetch = _fetch_command(repo, revision, repo_type)
            raise BadInput(f"{spec}: not a local directory, and not in the Hugging Face cache ({cache_dir()}); "
                           f"HF_HUB_OFFLINE is set, so nothing is downloaded: fetch the {what} where there is "
                           f"network with `{fetch}` (same HF_HOME), or unset HF_HUB_OFFLINE")
        folder = _download(spec, repo, revision, files, choices, kind, what)
    if required and not any((folder / name).is_file() for name in required):
        raise BadInput(f"{spec}: the repository has no {' or '.join(required)}, so it is not a {what}")
    return folder, HubSource(repo, revision, folder.name)


def _cached(repo: str, revision: str, files: list[str], choices: tuple[list[str], ...],
            required: tuple[str, ...], kind: dict) -> Path | None:
    """The cached snapshot folder of ``repo`` at ``revision`` holding one of ``required`` and a file of
    one of ``choices`` (when there are any), else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=files, **kind))
    except (LocalEntryNotFoundError, OSError, ValueError):  # IncompleteSnapshotError is an OSError
        return None
    names = [p.name for p in folder.iterdir()]
    chosen = not choices or any(_matches(names, choice) for choice in choices)
    return folder if (not required or _matches(names, list(required))) and chosen else None


def _download(spec, repo: str, revision: str, files: list[str], choices: tuple[list[str], ...], kind: dict,
              what: str) -> Path:
    """Downloads ``files`` (huggingface_hub turns a failed connection into LocalEntryNotFoundError), then
    the first of ``choices`` that matches a file the repository lists."""
    from huggingface_hub import HfApi, errors, snapshot_download

    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=files, **kind))
        names = HfApi().list_repo_files(repo, revision=folder.name, repo_type=kind["repo_type"]) if choices else []
        chosen = next((choice for choice in choices if _matches(names, choice)), None)
        if chosen is not None:
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=chosen, **kind))
    except errors.RevisionNotFoundError:
        raise BadInput(f"{spec}: {repo} has no revision {revision!r} on the Hugging Face Hub") from None
    except errors.GatedRepoError:
        raise BadInput(f"{spec}: a gated repository: accept its terms on huggingface.co, then log in with "
                       "`hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise BadInput(f"{spec}: not a local directory, and no such repository on the Hugging Face Hub (a private "
                       "one needs `hf auth login`)") from None
    except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInput(f"{spec}: not a local directory, not in the Hugging Face cache ({cache_dir()}), and the "
                       f"Hub cannot be reached ({first}); fetch the {what} where there is network with "
                       f"`{_fetch_command(repo, revision, kind['repo_type'])}` (same HF_HOME)") from None
    return folder


def _matches(names: list[str], patterns: list[str]) -> bool:
    """Whether any of ``names`` (file paths in a repository) matches any of ``patterns``."""
    return any(fnmatch(name, pattern) for name in names for pattern in patterns)


def _fetch_command(repo: str, revision: str, repo_type: str) -> str:
    return (f"hf download {repo}" + (f" --repo-type {repo_type}" if repo_type != "model" else "")
            + (f" --revision {revision}" if revision != "main" else ""))
