"""Hub names from the local Hugging Face cache, never from the network.

A cluster's compute nodes are usually offline: models and data sets are downloaded once on a
login node into a shared cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
~/.cache/huggingface/hub), in huggingface_hub's layout (`models--org--name/refs/main` naming
the commit whose files are in `snapshots/<commit>/`). A hub id (`org/name`, optionally
`@revision`) is resolved there with huggingface_hub's own `snapshot_download(...,
local_files_only=True)`, which reads the cache and never opens a connection; a name that is
not in the cache is one line naming the command that downloads it.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

from trainer.runtime.errors import ConfigError

# What a model folder needs for training, export and evaluation: its weights, in one of the
# layouts transformers loads (safetensors, or PyTorch's pickles, sharded or not).
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def split_revision(hub_id: str) -> tuple[str, str | None]:
    """`org/name@revision` -> ("org/name", "revision"); no `@`: the default branch (None)."""
    repo_id, _, revision = hub_id.partition("@")
    return repo_id, revision or None


def download_command(repo_id: str, repo_type: str = "model", revision: str | None = None,
                     files: tuple[str, ...] = ()) -> str:
    """The `hf download` command (huggingface_hub's command line) that puts `repo_id` into the cache."""
    parts = ["hf", "download", repo_id, *files]
    if repo_type != "model":
        parts += ["--repo-type", repo_type]
    if revision:
        parts += ["--revision", revision]
    return " ".join(parts)


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub reads (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub)."""
    return Path(constants.HF_HUB_CACHE)


def hub_snapshot(hub_id: str, key: str, repo_type: str = "model", files: tuple[str, ...] = (),
                 fetch: str | None = None) -> Path:
    """The cached snapshot folder of `hub_id` (`org/name[@revision]`). `files`: what the caller
    needs from it (e.g. config.json alone for an estimate); a cache that holds fewer files than the
    repository is complete for them. `fetch`: how the message says to download it (default: the
    whole repository)."""
    repo_id, revision = split_revision(hub_id)
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True,
                                   allow_patterns=list(files) or None)
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        folder = None
    if folder is None or not all((Path(folder) / name).is_file() for name in files):
        what = "a data set" if repo_type == "dataset" else "a model"
        raise ConfigError(f"{key}: {hub_id} is not in the Hugging Face cache {hub_cache_dir()} (nor a local folder); "
                          f"download {what} once where there is network access: "
                          f"{fetch or download_command(repo_id, repo_type, revision)} "
                          "(and point HF_HOME or HF_HUB_CACHE at that cache here)")
    return Path(folder)


def model_snapshot(hub_id: str, key: str, weights: bool) -> Path:
    """The snapshot folder of a hub model: config.json at least, and with `weights` its weights
    too (a cache that holds only config.json serves the estimate and `finetrain check`)."""
    repo_id, revision = split_revision(hub_id)
    whole = download_command(repo_id, "model", revision)
    fetch = whole if weights else (f"{download_command(repo_id, 'model', revision, ('config.json',))} (config.json "
                                   f"is all that is read here; training needs the whole model: {whole})")
    folder = hub_snapshot(hub_id, key, files=("config.json",), fetch=fetch)
    if weights and not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ConfigError(f"{key}: the Hugging Face cache holds {hub_id}'s config.json but not its weights "
                          f"({folder}); download them where there is network access: "
                          f"{whole}")
    return folder
