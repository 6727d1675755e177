"""Resolve a model argument to a local directory: a path as is, a Hugging Face hub id through huggingface_hub."""

from __future__ import annotations

from pathlib import Path

# What a checkpoint directory needs; weights in pickle format are never fetched.
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.tiktoken", "*.model"]


def resolve(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: no such checkpoint directory (and not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, ...: one clear message instead of a network trace
        raise FileNotFoundError(
            f"{name}: not a local directory, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). When offline, pass the path of "
            "a local checkpoint directory instead."
        ) from e
