"""Weights on disk and on the Hugging Face Hub: atomic files, checksums, and errors that name the file.

Used by :class:`~tatok_core.pipeline.tokenizer.Tokenizer` (``save_pretrained`` / ``from_pretrained`` /
``push_to_hub``) and by the generation priors (:func:`~tatok_core.workflows.generation.save_prior`). The layout
follows huggingface_hub's ``PyTorchModelHubMixin`` (a ``model.safetensors`` next to a ``config.json``),
and the Hub itself is an optional extra (``tatok[hub]``): local folders and shipped names never need it.

* **Atomic**: every file is written to a fresh temporary file in the target folder, flushed to disk and
  renamed over the target, so a reader (or a crash) sees the old file or the new one, never a part.
  The manifest that records the weights' checksum is written last, so an interrupted save is caught
  as a checksum mismatch, not loaded. Files are created with mode 0o666 minus the user's umask, as any
  file the user writes.
* **Integrity**: the sha256 of the weights file is recorded at save time and verified at load; a
  missing, empty, truncated, corrupt or non-safetensors file, or one made for another architecture,
  raises :class:`~tatok_core.contract.errors.WeightsFileError` with one line naming the file and the fault.
* **Digest**: :func:`state_digest` hashes the tensors themselves (names, dtypes, shapes, bytes), so it
  identifies the weights independently of the file format and of the device they sit on.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from tatok_core.contract.errors import WeightsFileError
from tatok_core.io.atomic import atomic_write
from tatok_core.contract.extras import require

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name", as the Hub spells repositories


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 (hex) of a state dict's contents: each entry's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict (weights and persistent buffers) as contiguous CPU tensors."""
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_weights(path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Any]:
    """Write ``state`` as safetensors (atomically); returns the manifest entry that :func:`load_weights` checks."""
    data = safetensors.torch.save(dict(state), metadata=dict(metadata))
    atomic_write(path, data)
    return {"file": path.name, "bytes": len(data), "sha256": sha256_hex(data), "digest": state_digest(state)}


def load_weights(path: Path, recorded: Mapping[str, Any] | None) -> dict[str, Tensor]:
    """The tensors of a safetensors file, verified against the manifest entry ``recorded`` when there is one."""
    if not path.is_file():
        raise WeightsFileError(f"{path}: weights file not found")
    data = path.read_bytes()
    if not data:
        raise WeightsFileError(f"{path}: empty weights file (0 bytes)")
    if recorded is not None:
        expected, actual = recorded.get("sha256"), sha256_hex(data)
        if expected != actual:
            size = recorded.get("bytes")
            detail = f", {len(data)} bytes instead of {size}" if size is not None and size != len(data) else ""
            raise WeightsFileError(
                f"{path}: checksum mismatch (recorded sha256 {str(expected)[:12]}…, file {actual[:12]}…{detail}): "
                "the file is corrupt, truncated or was replaced after saving"
            )
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises several types for a damaged header or body
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsFileError(f"{path}: not a readable safetensors weights file ({reason})") from None


def fit_state(module: nn.Module, state: Mapping[str, Tensor], path: Path, what: str) -> None:
    """Load ``state`` into ``module`` exactly; weights of another architecture name the first differences."""
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{label} {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", reshaped))
                if items]
    if problems:
        raise WeightsFileError(f"{path}: weights of another architecture than {what}: {'; '.join(problems)}")
    module.load_state_dict(dict(state))


def is_repo_id(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` reads as a Hub repository id (``owner/name``) rather than a local path."""
    return isinstance(name, str) and bool(REPO_ID.match(name)) and not Path(name).exists()


def hub_snapshot(repo_id: str, files: list[str], *, revision: str | None = None, cache_dir: str | None = None,
                 token: str | bool | None = None, local_files_only: bool = False) -> Path:
    """A local folder with ``files`` of Hub repository ``repo_id`` (huggingface_hub's cache; ``tatok[hub]``)."""
    hub = require("huggingface_hub", f"{repo_id!r} is no local folder; loading it from the Hugging Face Hub")
    folder = hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=local_files_only, allow_patterns=files)
    return Path(folder)


def push_folder(folder: Path, repo_id: str, *, commit_message: str, private: bool | None = None,
                token: str | None = None, branch: str | None = None, create_pr: bool | None = None) -> Any:
    """Upload ``folder`` to Hub repository ``repo_id`` (created if needed); huggingface_hub's ``CommitInfo``."""
    hub = require("huggingface_hub", "push_to_hub")
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             revision=branch, create_pr=create_pr)
