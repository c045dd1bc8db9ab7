"""Data sets from the local Hugging Face cache: `hf:org/name[@revision][:split]`, or
`hf:org/name[@revision]:config:split` (default split: train).

The data set's snapshot is found in the hub cache as a model's is (trainer/model/hub.py, no
network); which of its files make up a config's split is decided by the `datasets` library's own
rules for a data set folder (the `configs` of its README's YAML, else its file-name patterns:
`data/train-*.parquet`, `train.jsonl`, ...), read offline from that folder. The files are then
read by finetrain's own streaming readers (trainer/data/sources.py), one after another, so a bad
row is reported as `hf:org/name:split: row N` (with the file and line where a line of a JSON
Lines file cannot be read) as a local file's would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config.schema import HUB_DATA_PREFIX, HUB_ID
from trainer.data.sources import READABLE_SUFFIXES
from trainer.model.hub import hub_snapshot
from trainer.runtime.errors import ConfigError, first_line

DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class HubDataSet:
    hub_id: str  # org/name[@revision]
    config: str | None
    split: str


def is_hub_data(path: str) -> bool:
    return path.startswith(HUB_DATA_PREFIX)


def parse_hub_data(path: str, key: str) -> HubDataSet:
    """`hf:org/name[@revision][:split]` or `hf:org/name[@revision]:config:split`."""
    hub_id, *rest = path.removeprefix(HUB_DATA_PREFIX).split(":")
    if not HUB_ID.fullmatch(hub_id) or len(rest) > 2 or not all(rest):
        raise ConfigError(f"{key}.path: {path!r} is not hf:org/name[@revision][:split] or "
                          "hf:org/name[@revision]:config:split")
    config, split = (None, rest[0] if rest else DEFAULT_SPLIT) if len(rest) < 2 else rest
    return HubDataSet(hub_id, config, split)


def hub_data_files(path: str, key: str, cache_dir: Path) -> tuple[Path, ...]:
    """The cached files of the data set's split, in the order `datasets` reads them."""
    # Imported here, where an hf: data set is read: `datasets` takes a second to import and a
    # training image without it (every other source reads without it) still trains.
    import datasets

    spec = parse_hub_data(path, key)
    folder = hub_snapshot(spec.hub_id, f"{key}.path", repo_type="dataset")
    try:
        builder = datasets.load_dataset_builder(str(folder), name=spec.config, cache_dir=str(cache_dir))
    except (ValueError, FileNotFoundError) as err:  # an unknown config; a folder with no data files
        raise ConfigError(f"{key}.path: {path}: {first_line(err)}") from None
    splits = dict(builder.config.data_files or {})
    if spec.split not in splits:
        raise ConfigError(f"{key}.path: {path}: no split {spec.split!r} in {spec.hub_id}"
                          f"{' (config ' + spec.config + ')' if spec.config else ''}; its splits: "
                          f"{', '.join(map(str, splits)) or 'none'}")
    files = tuple(Path(file) for file in splits[spec.split])
    unreadable = [file for file in files if file.suffix.lower() not in READABLE_SUFFIXES]
    if unreadable:
        raise ConfigError(f"{key}.path: {path}: {unreadable[0].name} is not a file finetrain reads "
                          f"({', '.join(READABLE_SUFFIXES)})")
    return files
