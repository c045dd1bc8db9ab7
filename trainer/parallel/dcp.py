"""DCP checkpoint files: the model and optimizer saved (sharded when the model is), blocking
or in the background, and loaded back without running code from the folder (its metadata
through an allow-list unpickler, plain values with weights_only)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from trainer.model.quantization import quantized_linears, without_quantized_weights
from trainer.parallel.safe_load import load_plain
from trainer.runtime.errors import UserError, first_line
from trainer.runtime.faults import exempt


def checkpointed_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model and optimizer state a checkpoint holds: all of it but frozen 4-bit weights,
    which re-quantizing the base model reproduces bit for bit (trainer/model/quantization.py)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return without_quantized_weights(model, model_sd), optim_sd



def dcp_save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer as a DCP checkpoint (sharded when the model is). The learning-rate
    schedule is not saved: it is a function of the step and the config (trainer/optim.py)."""
    model_sd, optim_sd = checkpointed_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "dcp"))



class BackgroundWriter:
    """What asynchronous DCP saves keep from one save to the next: a process group of their own
    (two threads issuing collectives on one group could interleave them differently on each
    rank), the host buffers the state is copied into (allocated on the first save and reused,
    pinned and filled by non-blocking copies on CUDA), and DCP's save plan, which is the same
    at every save of a run."""

    def __init__(self, device: torch.device):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        on_cuda = device.type == "cuda"
        self.process_group = torch.distributed.new_group(backend="gloo")
        exempt(self.process_group)  # its collectives wait for the slowest rank's disk: no step timeout
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=on_cuda, use_shared_memory=False,
                                                   use_async_staging=False, use_non_blocking_copy=on_cuda))
        self.planner = dcp.DefaultSavePlanner(enable_plan_caching=True)

    def save(self, state: dict, path: Path):
        """Copy `state` into the host buffers, then write it in a background thread; returns its future."""
        return dcp.async_save(state, checkpoint_id=str(path), process_group=self.process_group,
                              async_stager=self.stager, planner=self.planner)

    def close(self) -> None:
        self.stager.close()



def dcp_save_async(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, writer: BackgroundWriter):
    """dcp_save whose write goes on in a background thread: the state is copied to host memory
    before this returns (training may then change it), the files are written from that copy."""
    model_sd, optim_sd = checkpointed_state(model, optimizer)
    return writer.save({"model": model_sd, "optim": optim_sd}, path / "dcp")



# What DCP's `.metadata` pickle may name: its own metadata classes and the torch values they
# hold. torch's FileSystemReader unpickles the file with plain `pickle.load`, which would run
# whatever a planted file names; SafeReader admits these and refuses anything else.
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
}



class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")



def read_dcp_metadata(folder: Path):
    """The `.metadata` of the DCP checkpoint in `folder`, read through an unpickler that admits
    DCP's metadata classes only, every shard it names a plain file name of the folder."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError, TypeError, IndexError) as err:
        reason = " ".join(str(err).split())  # one line, whatever the unpickler said
        raise UserError(f"{path}: not a DCP checkpoint's metadata ({reason}); refusing to load it") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{path}: holds a {type(metadata).__name__}, not a DCP checkpoint's metadata; refusing to load it")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise UserError(f"{path}: names a shard outside its folder ({name!r}); refusing to load it")
    return metadata



class SafeReader(dcp.FileSystemReader):
    """A FileSystemReader that runs no code from the folder (see read_dcp_metadata); the
    metadata is read as the reader is made, so a refusal comes before any collective."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.metadata = read_dcp_metadata(Path(folder))

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata



class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP stores non-tensor values (the optimizer's hyperparameters) as pickles, which
    DefaultLoadPlanner reads with `torch.load(weights_only=False)`; here weights_only=True."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        loaded = load_plain(value, f"{self.folder}: the value of {fqn}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded



def read_dcp(state: dict, folder: Path) -> None:
    """Fill `state` in place from the DCP checkpoint in `folder`, running no code from it."""
    from torch.distributed.checkpoint.api import CheckpointException

    reader = SafeReader(folder)
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(folder))
    except CheckpointException as err:  # every rank has it: DCP gathers each rank's failure
        failures = [failure[0] if isinstance(failure, tuple) else failure for failure in err.failures.values()]
        refused = [failure for failure in failures if isinstance(failure, UserError)]
        if refused:
            raise UserError(str(refused[0])) from None
        # Shards that do not hold what the metadata says (cut short, replaced): data, not a bug.
        raise UserError(f"{folder}: its shards cannot be read as its metadata describes them "
                        f"({type(failures[0]).__name__}: {first_line(failures[0])[:200]}); refusing to load it") from None



def dcp_load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Inverse of dcp_save; DCP reshards, so the world size may differ from the saver's. Without
    an optimizer only the model's weights are read (export, in one process)."""
    if optimizer is None:
        state = {"model": without_quantized_weights(model, get_model_state_dict(model))}
    else:
        model_sd, optim_sd = checkpointed_state(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    read_dcp(state, path / "dcp")
    # Only the frozen 4-bit weights (rebuilt from model.path) may be absent from the checkpoint.
    options = StateDictOptions(strict=not quantized_linears(model))
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)
