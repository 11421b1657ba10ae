"""Turn a user's model reference into a local path: folder, file or hub repo id."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import MergeError
from .model import COMPANION_FILES, Model, open_local_model

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
HUB_PATTERNS = ["*.safetensors", "model.safetensors.index.json", *COMPANION_FILES]


def open_model(reference: str | Path) -> Model:
    """Open a local model, or resolve ``org/name[@revision]`` through the hub cache."""
    path = Path(reference).expanduser()
    if path.exists():
        return open_local_model(path)
    text = str(reference)
    if not HUB_ID.match(text):
        raise MergeError(f"{text}: no such file or folder, and not a hub repo id (org/name)")
    return open_local_model(resolve_hub(text), label=text)


def resolve_hub(repo: str) -> Path:
    """Download (or find in the cache) only the safetensors, config and tokenizer files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except LocalEntryNotFoundError as exc:
        raise MergeError(
            f"{repo}: not in the local Hugging Face cache and the hub cannot be reached"
            f" (HF_HUB_OFFLINE set or no network): {exc}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise MergeError(f"{repo}: cannot fetch from the Hugging Face hub: {exc}") from None
    return Path(folder)
