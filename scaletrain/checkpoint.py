"""Checkpoints: atomic save, discovery of the latest one, load for resume. Two formats:

- full: one file `<run_dir>/checkpoints/step_XXXXXXX.pt` holding model, optimizer, scheduler,
  data-loader state, RNG states, step, tokens seen and the resolved config (under FSDP2 the shards
  are gathered to rank 0 first). Written to a temporary file in the same folder, fsynced, renamed.
- sharded: a folder `<run_dir>/checkpoints/step_XXXXXXX/` written by torch.distributed.checkpoint
  (DCP, as torchtitan): every rank writes its own shards of model and optimizer in parallel, no rank
  ever holds the whole model; `extra.pt` beside them holds the rest. Written into a hidden
  temporary folder and renamed by rank 0 once every rank has finished. DCP reshards on load: a
  sharded checkpoint resumes on any number of ranks, or in one plain process (`extra.pt` holds nothing
  per rank: the loader's state is a global position). `checkpoint_convert.py` turns one into a full file.

A crash mid-write leaves the previous checkpoint untouched and never a partial one under a checkpoint
name. `train.ckpt_format` picks the format (auto: sharded under FSDP2 with several ranks, else full).
Names, discovery (`list_checkpoints`, `is_sharded_checkpoint`) and `atomic_write` are the shared
contracts of `records.py`, so the report finds exactly the checkpoints that resume would.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import random
import shutil
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from scaletrain import distributed
from scaletrain.config import BadInput, Resume, resume_role
from scaletrain.records import (
    CKPT_DIR,
    DCP_METADATA,
    SHARDED_EXTRA,
    atomic_write,
    checkpoint_name,
    checkpoint_step,
    fsync_dir,
    is_sharded_checkpoint,
    list_checkpoints,
)

DIGEST = "digest"  # key of the {path: CRC-32} manifest of the whole state inside every checkpoint file
CHECKSUMS = "checksums"  # its predecessor, tensors only: checkpoints written before 2026-12-07
FILES = "files"  # key of the {file name: CRC-32} manifest of a sharded folder's other files, in its extra.pt
ITEMS = "items"  # key of the {file@offset+length: CRC-32} manifest of a sharded folder's stored items (DCP's)

log = logging.getLogger("scaletrain")


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint file cannot be used; the message names the file and why."""

    kind = "checkpoint"


class ResumeNotFound(BadInput, FileNotFoundError):
    """`train.resume` names no checkpoint; the message says what the key accepts."""

    kind = "config"


class CheckpointIncompatible(BadInput, ValueError):
    """A sound checkpoint that this run's config cannot continue (the message lists each key, both values)."""

    kind = "checkpoint"


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # type: ignore[misc]
    numpy_state = {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rotate(ckpt_dir: Path, keep: int, step: int) -> None:
    """Keep the `keep` newest checkpoints up to `step` (the one just written). Checkpoints of later steps are
    not this lineage's past (a run resumed from an earlier step, or another run's): never touched here."""
    if keep > 0:
        mine = [p for p in list_checkpoints(ckpt_dir) if (checkpoint_step(p.name) or 0) <= step]
        for old in mine[:-keep]:
            _remove(old)


class NoSpaceError(BadInput, OSError):
    """Not enough free disk space to write a checkpoint; the message says how much is needed, where."""

    kind = "disk"


def state_nbytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state (for a DTensor: this rank's shard)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, torch.Tensor):
        t = obj.to_local() if isinstance(obj, DTensor) else obj
        return t.numel() * t.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return sum(state_nbytes(v) for v in items)


@contextlib.contextmanager
def _disk_full_is_named(ckpt_dir: Path, step: int):
    """A disk that fills up during a save (other writers, a low estimate) gives one clear NoSpaceError instead
    of torch's "[enforce fail at inline_container.cc] unexpected pos" or a bare errno 28."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        text = str(err).strip()
        full = getattr(err, "errno", None) == errno.ENOSPC or any(
            s in text for s in ("unexpected pos", "file write failed", "No space left")
        )
        if not full:
            raise
        raise NoSpaceError(
            f"the disk holding {ckpt_dir} is full: checkpointing step {step} failed ({type(err).__name__}: "
            f"{text.splitlines()[0] if text else 'no space left'}); the previous checkpoints are kept. Free space "
            "there, lower train.ckpt_keep, or run in a folder on a larger disk (hydra.run.dir=...)"
        ) from None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(run_dir: Path) -> None:
    """Rank 0 at the start of a run: the run folder and its checkpoints/ take files (a probe file is created and
    removed in each), so a read-only or misplaced folder is found before training, not at the first save with the
    steps since the start lost. NotWritable names the folder and the error. (A probe, not os.access: root passes
    os.access on a read-only mount, and only a write shows a full or read-only file system.)"""
    import tempfile

    ckpt_dir = Path(run_dir) / CKPT_DIR
    for folder in (Path(run_dir), ckpt_dir):
        if folder == ckpt_dir and not ckpt_dir.exists():
            continue  # created in the run folder, which takes files, at the first save
        try:
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe.", suffix=".tmp"):
                pass
        except OSError as err:
            raise NotWritable(
                f"{folder}: cannot write there ({type(err).__name__}: {err.strerror or err}); checkpoints and records "
                "go there: fix its permissions or run in another folder (hydra.run.dir=...)"
            ) from None


class NotWritable(BadInput, OSError):
    """The run folder or its checkpoints/ cannot take files; the message names the folder and why."""

    kind = "disk"


def check_free_space(ckpt_dir: Path, step: int, need: int) -> None:
    """Fail with NoSpaceError before writing `need` bytes (plus 5% and 16 MiB for metadata and the file
    system) into `ckpt_dir` when the disk has less free; the previous checkpoints stay untouched. A save needs
    room for one more checkpoint: the rotation removes old ones only after the new one is complete."""
    need = int(need * 1.05) + (16 << 20)
    have = shutil.disk_usage(_existing(Path(ckpt_dir))).free
    if have < need:
        raise NoSpaceError(
            f"not enough free disk space to checkpoint step {step}: need ~{need / 2**20:,.0f} MiB, have "
            f"{have / 2**20:,.0f} MiB free in {ckpt_dir}; the previous checkpoints are kept. Free space there, "
            "lower train.ckpt_keep, or run in a folder on a larger disk (hydra.run.dir=...)"
        )


def tensor_checksums(obj: Any, prefix: str = "") -> dict[str, int]:
    """CRC-32 of every tensor's bytes in a nested state, by its path ("model.W_ue.weight"): the manifest of
    checkpoints written before `state_digest` (kept to verify them)."""
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return {prefix: zlib.crc32(data.data)}  # contiguous above, so its buffer is the tensor's bytes
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out: dict[str, int] = {}
    for key, value in items:
        out.update(tensor_checksums(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _tensor_crc(t: torch.Tensor) -> int:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data.data, zlib.crc32(f"tensor:{t.dtype}:{tuple(t.shape)}".encode()))


def state_digest(obj: Any, prefix: str = "") -> dict[str, int]:
    """The manifest of a whole state: one CRC-32 per leaf and per container, by path ("model.W_ue.weight",
    "step", "rng.python.1.5"). A tensor's covers its dtype, shape and bytes; any other leaf's its type and exact
    value (repr: floats round-trip); a container's its type and its keys (with their types), so a changed,
    added or dropped key, a list turned tuple, a step 40 turned 37, a shape [2, 8] turned [8, 2] all differ. So a
    state that unpickles and matches its digest IS the saved state, whatever bytes of the file changed.

    Written by hand because neither torch.save (no integrity check at all: a flipped bit loads silently) nor its
    zip reader (which ignores the zip's own CRCs) verifies anything. CRC-32 detects every change of up to 32
    consecutive bits in one leaf with certainty; it is for corruption, not tampering (weights_only loading and
    the metadata allowlist guard against malicious files)."""
    root = prefix or "<root>"
    if isinstance(obj, torch.Tensor):
        return {root: _tensor_crc(obj)}
    if isinstance(obj, dict):
        items = list(obj.items())
        out = {f"{root}/": zlib.crc32(f"dict:{[repr(k) for k in obj]}".encode())}
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
        out = {f"{root}/": zlib.crc32(f"{type(obj).__name__}:{len(obj)}".encode())}
    else:
        return {root: zlib.crc32(f"{type(obj).__name__}:{obj!r}".encode())}
    for key, value in items:
        out.update(state_digest(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with its digest (`DIGEST`) inside: what every scaletrain checkpoint file holds."""
    return {**state, DIGEST: state_digest(state)}


def _save_verified(path: Path, state: dict[str, Any]) -> None:
    """torch.save of the sealed state, atomically."""
    atomic_write(path, lambda f: torch.save(seal(state), f))


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Full format: atomically write `state` (with checksums) as the checkpoint of `step`; keep the `keep`
    newest (0 = all)."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    check_free_space(ckpt_dir, step, state_nbytes(state))
    path = ckpt_dir / checkpoint_name(step, sharded=False)
    with _disk_full_is_named(ckpt_dir, step):
        _save_verified(path, state)
    _rotate(ckpt_dir, keep, step)
    return path


def save_weights(path: Path, state: dict[str, Any]) -> Path:
    """A weights file (model state, step, config) written like a full checkpoint: checksummed, atomic, after a
    free-space check; `load_checkpoint` reads and verifies it."""
    check_free_space(Path(path).parent, int(state.get("step", 0)), state_nbytes(state))
    with _disk_full_is_named(Path(path).parent, int(state.get("step", 0))):
        _save_verified(Path(path), state)
    return Path(path)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns whenever no process group exists; a sharded checkpoint in one process is a supported case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int,
    is_main: bool,
) -> Path:
    """Sharded format; every rank calls this. Each rank writes its shards of model and optimizer (DCP),
    rank 0 adds `extra` and publishes the folder under its checkpoint name with one rename."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    ckpt_dir = Path(run_dir) / CKPT_DIR
    final = ckpt_dir / checkpoint_name(step, sharded=True)
    tmp = ckpt_dir / f".{final.name}.tmp"  # hidden: never listed; one name that every rank can compute
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # every rank sees the same disk and (FSDP2) holds a like-sized shard: all take the same decision
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    check_free_space(ckpt_dir, step, state_nbytes([model_sd, optim_sd]) * world)
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove(tmp)  # left by a crash during an earlier save of this step
        tmp.mkdir()
    _barrier()
    try:
        with _single_process_is_intended(), _disk_full_is_named(ckpt_dir, step):
            metadata = dcp_save(
                {"model": model_sd, "optimizer": optim_sd},
                checkpoint_id=tmp,  # returns once all ranks wrote, with the global metadata on every rank
                no_dist=not torch.distributed.is_initialized(),
            )
        items = _gather_dicts(item_checksums(tmp, metadata.storage_data, *_rank_and_world()))
    except BaseException:
        if is_main:
            _remove(tmp)
        raise
    if is_main:  # every rank has written and checksummed its share: the manifest covers every item
        files = {DCP_METADATA: _file_crc(tmp / DCP_METADATA)}
        _save_verified(tmp / SHARDED_EXTRA, {**extra, FILES: files, ITEMS: items})
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run that stopped right after saving)
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        _rotate(ckpt_dir, keep, step)
    _barrier()  # nobody goes on (or saves again) before the checkpoint has its name
    return final


def file_checksums(folder: Path) -> dict[str, int]:
    """CRC-32 of every file in a sharded checkpoint folder but extra.pt (which holds this map), streamed in
    16 MiB chunks (the manifest of folders written before per-item checksums). By hand for the reason
    `state_digest` gives: DCP writes no checksums of its own."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != SHARDED_EXTRA)
    return {file.name: _file_crc(file) for file in files}


def _file_crc(file: Path) -> int:
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_dicts(mine: dict[str, int]) -> dict[str, int]:
    """The union of every rank's dict, on every rank (small: one entry per stored item)."""
    if not torch.distributed.is_initialized():
        return mine
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def item_key(info: Any) -> str:
    """A stored item's name in the manifest: its file, offset and length (DCP's `_StorageInfo`)."""
    return f"{info.relative_path}@{info.offset}+{info.length}"


def _read_crc(folder: Path, info: Any, handles: dict[str, Any]) -> int:
    f = handles.get(info.relative_path)
    if f is None:
        f = handles[info.relative_path] = open(folder / info.relative_path, "rb")
    f.seek(info.offset)
    crc, left = 0, info.length
    while left > 0 and (chunk := f.read(min(left, 1 << 24))):
        crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    return crc if left == 0 else -1  # a short file: never the saved CRC


def item_checksums(folder: Path, storage_data: Mapping[Any, Any], rank: int, world: int) -> dict[str, int]:
    """CRC-32 of this rank's share of the stored items of a DCP folder: the files, sorted, dealt round-robin to
    the ranks, so each rank reads back ~1/world of the checkpoint (DCP writes one file per rank, like-sized under
    FSDP2), never the whole of it. By hand for the reason `state_digest` gives: DCP writes no checksums."""
    infos = sorted({item_key(i): i for i in storage_data.values()}.items())
    files = sorted({i.relative_path for _, i in infos})
    mine = set(files[rank::world])
    handles: dict[str, Any] = {}
    try:
        return {key: _read_crc(folder, info, handles) for key, info in infos if info.relative_path in mine}
    finally:
        for f in handles.values():
            f.close()


def _verify_files(path: Path, saved: Any, only_listed: bool = False) -> None:
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: no file checksums in its {SHARDED_EXTRA} (not a scaletrain sharded checkpoint)")
    if only_listed:
        now = {name: _file_crc(path / name) for name in saved if (path / name).is_file()}
    else:
        now = file_checksums(path)
    missing = sorted(set(saved) - set(now))
    changed = sorted(name for name in saved if name in now and now[name] != saved[name])
    if missing or changed:
        what = [f"{n} missing" for n in missing] + [f"{n} changed since it was saved" for n in changed]
        raise CheckpointError(f"{path}: damaged: {'; '.join(what)}")


# What DCP's `.metadata` pickle may name: its own record types, tensor shapes/dtypes/layouts and paths.
# DCP reads that file with plain pickle.load, which runs whatever a crafted file names; scaletrain first
# unpickles it with this allowlist (the Python docs' "restricting globals"), so such a file is refused.
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = (
            super().find_class(module, name) if module.split(".")[0] in ("torch", "pathlib", "collections") else None
        )
        allowed = (module, name) in _METADATA_GLOBALS or isinstance(found, torch.dtype)
        # the record classes (dataclasses, enums) of DCP's metadata module, never a function
        allowed = allowed or (module == _METADATA_MODULE and isinstance(found, type))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return found


def _check_metadata(path: Path) -> None:
    """Refuse a sharded checkpoint whose `.metadata` would run code when DCP unpickles it."""
    meta = path / DCP_METADATA
    try:
        with open(meta, "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{meta}: refused: {err}; DCP would unpickle it with plain pickle") from None
    except (OSError, EOFError, ValueError, AttributeError, ImportError) as err:
        raise CheckpointError(f"{meta}: unreadable ({type(err).__name__}: {err})") from None


def load_sharded_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The DCP part of a sharded checkpoint: model and optimizer, resharded to the current layout. The folder's
    extra.pt and `.metadata` are verified first (small); then each rank checks the bytes of exactly the items it
    reads against the manifest, as it reads them: I/O for checksums ~ what the rank loads, not the checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    path = Path(path)
    _, items = _sharded_manifest(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # also creates the optimizer state to load into
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        with _single_process_is_intended():
            dcp_load(
                state,
                storage_reader=_verifying_reader(path, items),
                no_dist=not torch.distributed.is_initialized(),
            )
    except CheckpointException as err:  # DCP gathers each rank's exception: name the first one
        first = next(iter(err.failures.values()))
        cause = first[0] if isinstance(first, tuple) else first
        if isinstance(cause, CheckpointError):
            raise CheckpointError(str(cause)) from None
        raise CheckpointError(f"{path}: cannot be loaded: {type(cause).__name__}: {_first_line(cause)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _sharded_manifest(path: Path) -> tuple[dict[str, Any], dict[str, int] | None]:
    """(extra state, item manifest) of a sharded folder, after checking extra.pt (its digest), `.metadata` (CRC,
    allowlist) and that every shard file is there; the shards' bytes are checked as each rank reads its items
    (`load_sharded_state`). A folder from before 2026-12-07 has no item manifest: its files are checked whole."""
    extra = load_checkpoint(path / SHARDED_EXTRA)
    files, items = extra.pop(FILES, None), extra.pop(ITEMS, None)
    if items is None:
        _verify_files(path, files)
    else:
        _verify_files(path, files, only_listed=True)
        absent = sorted({key.rsplit("@", 1)[0] for key in items} - {p.name for p in path.iterdir()})
        if absent:
            raise CheckpointError(f"{path}: damaged: {', '.join(absent)} missing")
    _check_metadata(path)
    return extra, items


def _verifying_reader(path: Path, items: dict[str, int] | None) -> Any:
    """DCP's FileSystemReader that first checks the CRC-32 of every item it is asked to read (`items`: the
    manifest from extra.pt; None for a folder from before 2026-12-07, whose files were checked whole)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class VerifyingReader(FileSystemReader):
        def read_data(self, plan: Any, planner: Any) -> Any:
            if items is not None:
                infos = {item_key(i): i for i in (self.storage_data[r.storage_index] for r in plan.items)}
                handles: dict[str, Any] = {}
                try:
                    for key, info in sorted(infos.items()):
                        if key not in items:
                            raise CheckpointError(f"{path}: damaged: {key} is not in its manifest")
                        if not (path / info.relative_path).is_file():
                            raise CheckpointError(f"{path}: damaged: {info.relative_path} missing")
                        if _read_crc(path, info, handles) != items[key]:
                            end = info.offset + info.length
                            raise CheckpointError(
                                f"{path}: damaged: {info.relative_path} bytes {info.offset}..{end} changed since saved"
                            )
                finally:
                    for f in handles.values():
                        f.close()
            return super().read_data(plan, planner)

    return VerifyingReader(path)


def verify_all_items(path: Path) -> None:
    """Check every stored item of a sharded folder (what one process that reads it all, e.g. the converter, does)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    path = Path(path)
    _, items = _sharded_manifest(path)
    if items is None:
        return  # an older folder: load_checkpoint checked its files whole
    now = item_checksums(path, FileSystemReader(path).read_metadata().storage_data, 0, 1)
    bad = sorted(k for k in items if now.get(k) != items[k]) + sorted(k for k in now if k not in items)
    if bad:
        files = sorted({key.rsplit("@", 1)[0] for key in bad})
        raise CheckpointError(
            f"{path}: damaged: {', '.join(files)} changed since it was saved ({len(bad)} stored item(s) differ)"
        )


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _implied(key: str, saved: dict[str, Any]) -> Any:
    """The value a key added to the schema later had, implicitly, in a config saved before it existed: the
    attention's (model/attention, added with plugins) was the built-in SDPA, the MLP's (model/mlp) the built-in
    MLP; an optimizer's builder its own."""
    from scaletrain.config import AttentionConfig, MLPConfig, optimizer_schemas

    for node, schema in (("model.attention.", AttentionConfig), ("model.mlp.", MLPConfig)):
        if key.startswith(node):
            return {"name": schema.name, "_target_": schema._target_}.get(key.removeprefix(node))
    if key == "optim._target_":
        schema = optimizer_schemas().get(saved.get("optim", {}).get("name", ""))
        return getattr(schema, "_target_", None)
    return object()  # nothing implied: never equal


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that forbid resuming, changes that apply from here on), one 'key: now (checkpoint: saved)'
    line each, by each key's role as its schema field declares it (config.resume_role): identity keys (shapes,
    tokenizer, optimizer kind, data order) forbid, hyperparameters (lr, schedule, max_steps, cadences, dropout,
    ...) apply, placement keys (paths, device, launcher, W&B) are not reported."""
    a, b = _flatten(saved), _flatten(now)
    blocking, applied = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        role = resume_role(key, now if key in b else saved)  # a component's fields: in the schema its config names
        if role == Resume.placement:
            continue
        if key not in a and b.get(key) == _implied(key, saved):  # a key added after the checkpoint was written
            continue
        line = f"{key}: {b.get(key, '(absent)')} (checkpoint: {a.get(key, '(absent)')})"
        (blocking if role == Resume.identity else applied).append(line)
    return blocking, applied


def check_compatible(path: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """Raise CheckpointIncompatible, listing each key with both values, when the checkpoint at `path` (config
    `saved`) cannot be continued under the config `now`; else the lines of the changes that apply from here on."""
    if saved is None:
        return []
    blocking, applied = config_changes(saved, now)
    if blocking:
        raise CheckpointIncompatible(
            f"cannot resume from {path}: these settings differ from the checkpoint's and cannot change in a "
            "running training (start a new run folder, or restore them):\n  " + "\n  ".join(blocking)
        )
    return applied


def saved_config(path: Path) -> dict[str, Any] | None:
    """The config stored in a checkpoint (either format), read memory-mapped without verifying it, so a 7B
    checkpoint is checked in a moment (the trainer verifies everything when it loads it). A weights file
    (model.pt: final weights, no optimizer or data position) is refused here: it cannot continue a training."""
    path = Path(path)
    file = path / SHARDED_EXTRA if is_sharded_checkpoint(path) else path
    expected = "train.resume expects a step_*.pt file or sharded step_* folder written by scaletrain"
    if file.is_dir():
        load_checkpoint(file)  # raises: names what the folder lacks
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(
            f"{file}: not a readable checkpoint ({type(err).__name__}: {_first_line(err)}); {expected}"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file}: not a scaletrain checkpoint (no training state in it); {expected}")
    if "loader" not in state:
        raise CheckpointError(
            f"{file}: a weights file (model weights, step and config: no optimizer state or data position), not a "
            f"training checkpoint; {expected}, e.g. <run>/{CKPT_DIR}/ or train.resume=auto in the run's folder"
        )
    config = state.get("config")
    return config if isinstance(config, dict) else None


def check_resumable(resume: str, run_dir: Path, now: dict[str, Any], overwrite: bool = False) -> None:
    """`train.resume` before any data or model work: it must name checkpoints (ResumeNotFound naming the key
    and what it accepts), and the newest readable one must hold a config `now` can continue
    (CheckpointIncompatible), as the trainer would find after minutes of setup. Each candidate that is not
    readable is named in a warning and the next older one is tried (the trainer does the same, verifying every
    byte). When there are candidates but none is readable, the run is refused (CheckpointError naming each and
    why): a run never silently starts fresh over a run's checkpoints, unless `overwrite` (train.overwrite=true)
    with resume=auto, which removes them and starts fresh, saying so."""
    candidates = resume_candidates(resume, run_dir)
    problems = []
    for path in candidates:
        try:
            saved = saved_config(path)
        except CheckpointError as err:
            problems.append(str(err))
            log.warning("WARNING: skipping checkpoint %s: %s", path, err)
            continue
        check_compatible(path, saved, now)
        return
    if not problems:
        return
    if overwrite and resume == "auto":
        if distributed.detect_env().is_main:
            for path in candidates:
                _remove(path)
        log.warning("train.overwrite=true: removed %d unusable checkpoint(s); starting fresh", len(candidates))
        return
    raise CheckpointError(
        f"train.resume={resume}: no usable checkpoint, so the run would start fresh over them: "
        + "; ".join(problems)
        + ". Repair or remove them, point train.resume at a good one, or set train.overwrite=true to start over"
    )


def _checkpoint_like(folder: Path) -> list[Path]:
    """Every entry of `folder` under a checkpoint name, complete or not, newest step first: what resume must
    either use or name (an incomplete sharded folder is a candidate that fails, never silently skipped)."""
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p.name), p.name, p) for p in folder.iterdir()]
    return [p for step, _, p in sorted((f for f in found if f[0] is not None), reverse=True)]


def remove_leftovers(ckpt_dir: Path) -> list[Path]:
    """Remove the hidden temporary files and folders (`.step_*...tmp`) that a save killed midway left in
    `ckpt_dir`; returns what was removed. Call before the run's first save, on the rank that writes."""
    if not ckpt_dir.is_dir():
        return []
    leftovers = sorted(p for p in ckpt_dir.iterdir() if p.name.startswith(".step_") and p.name.endswith(".tmp"))
    for path in leftovers:
        _remove(path)
    return leftovers


def resume_candidates(resume: str, run_dir: Path) -> list[Path]:
    """The checkpoints `train.resume` may continue from, newest first: none -> [], auto -> run_dir's (or []),
    PATH -> that file or sharded folder alone, or the checkpoints of that run directory / checkpoints folder.
    The trainer takes the first that loads and verifies, warning about each damaged one it skips."""
    if resume == "none":
        return []
    if resume == "auto":
        return _checkpoint_like(Path(run_dir) / CKPT_DIR)
    path = Path(resume).expanduser()
    if path.is_file() or (path.is_dir() and checkpoint_step(path.name) is not None):
        return [path]
    for folder in (path / CKPT_DIR, path):
        ckpts = _checkpoint_like(folder)
        if ckpts:
            return ckpts
    raise ResumeNotFound(
        f"train.resume={resume!r}: no checkpoint found; expected a step_*.pt file, a sharded step_* folder, "
        f"a run directory with {CKPT_DIR}/step_*, or 'auto' / 'none'"
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A full checkpoint's state, or a sharded one's `extra` state (the shards are read by
    `load_sharded_state`). Unpickled with weights_only=True (tensors, containers and plain values only, so a
    file cannot run code while it loads) and checked against the digest saved in it (`state_digest`: every
    value, not only the tensors); for a sharded folder every shard and `.metadata` is also checked against the
    manifest in its extra.pt, and `.metadata` against an allowlist of what it may unpickle. CheckpointError,
    naming the file and what is wrong, for anything else: refused, unreadable (truncated, zeroed, a damaged zip
    directory), damaged (bytes changed), or any exception the damage provokes on the way."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _sharded_manifest(path)[0]
    if path.is_dir():
        missing = [name for name in (DCP_METADATA, SHARDED_EXTRA) if not (path / name).is_file()]
        raise CheckpointError(
            f"{path}: an incomplete sharded checkpoint: no {' and no '.join(missing)} in it "
            "(a save that did not finish, or files removed since)"
        )
    state = _unpickle(path)
    try:
        return _verified(path, state)
    except CheckpointError:
        raise
    except Exception as err:  # a damaged structure that unpickled: whatever it provokes is the file's fault
        raise CheckpointError(f"{path}: damaged: {type(err).__name__}: {_first_line(err)}") from None


def _verified(path: Path, state: Any) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a scaletrain checkpoint (holds a {type(state).__name__}, not a state)")
    if DIGEST in state:
        saved = state.pop(DIGEST)
        now = state_digest(state)
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path}: damaged: its digest is not a map")
    elif CHECKSUMS in state:  # before 2026-12-07: only the tensors can be verified
        saved = state.pop(CHECKSUMS)
        now = tensor_checksums(state)
        log.warning("%s: written before whole-state digests (2026-12-07): only its tensors are verified", path)
    else:
        raise CheckpointError(f"{path}: no digest in it (not a checkpoint written by scaletrain)")
    bad = sorted({key for key in saved if now.get(key) != saved[key]} | {key for key in now if key not in saved})
    if bad:
        raise CheckpointError(
            f"{path}: damaged: {len(bad)} value(s) differ from the digest saved with them "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        )
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unpickle(path: Path) -> Any:
    """torch.load(weights_only=True) -> the state, or CheckpointError saying what was found. Never passes on
    torch's advice to retry with weights_only=False: that is what the refusal protects against."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = [ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln]
        if found:
            raise CheckpointError(
                f"{path}: refused: it names Python objects beyond tensors and plain values ({found[0]}), so "
                "loading it could run code; scaletrain reads checkpoints with torch.load(weights_only=True). "
                "Checkpoints written before 2026-11-27 stored numpy RNG state that way and cannot be resumed"
            ) from None
        reason = [ln.strip() for ln in str(err).splitlines() if ln.strip().startswith(("Unsupported", "invalid"))]
        raise CheckpointError(
            f"{path}: unreadable: damaged or not a torch.save file ({reason[0] if reason else 'not a pickle'})"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (removed while the run was starting?)") from None
    except Exception as err:  # truncated or zeroed file, broken zip directory, random bytes, I/O error
        raise CheckpointError(
            f"{path}: unreadable: damaged or not a torch.save file ({type(err).__name__}: {_first_line(err)})"
        ) from None


# ----------------------------------------------------------------------------------------------------
# The checkpointer: what a training run saves and restores


class RNGState:
    """Every RNG of the process (python, numpy, torch, CUDA) as a Stateful."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_state(state_dict)


class Checkpointer:
    """Saves and restores a run: the model and optimizer (the format's business: one gathered file, or DCP
    shards each rank writes and reads), and every other component as a `Stateful`
    (torch.distributed.checkpoint.stateful: `state_dict()` / `load_state_dict()`) under its name, plus the
    progress counters at the top level and the config (what a resume is checked against). A new component is
    one more entry of `statefuls`, not one more hand-named key.

    Restore order: the config check, then `statefuls["loader"]` (the data order must continue, or nothing is
    loaded), then model and optimizer, then the other statefuls in their order, then the progress. Changes of
    hyperparameters in the config apply from the resumed step (`apply_hyperparameters`)."""

    def __init__(
        self,
        run_dir: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        statefuls: Mapping[str, Stateful],
        progress: Stateful,
        config: dict[str, Any],
        is_main: bool,
    ):
        self.run_dir, self.model, self.optimizer, self.statefuls = Path(run_dir), model, optimizer, statefuls
        self.progress, self.config, self.is_main = progress, config, is_main

    def save(self, step: int, sharded: bool, keep: int) -> None:
        """Checkpoint `step` (every rank calls this). `sharded`: DCP folder; else one full file written by rank 0
        from gathered state dicts (FSDP2: every rank takes part in the gather)."""
        extra = {name: obj.state_dict() for name, obj in self.statefuls.items()}
        extra.update(self.progress.state_dict())
        extra["config"] = self.config
        if sharded:
            save_sharded_checkpoint(self.run_dir, step, self.model, self.optimizer, extra, keep, self.is_main)
            return
        model_sd, optim_sd = distributed.full_state(self.model, self.optimizer)
        if self.is_main:
            save_checkpoint(self.run_dir, step, {"model": model_sd, "optimizer": optim_sd, **extra}, keep)

    def restore(self, path: Path) -> dict[str, Any]:
        """Load checkpoint `path` (either format, verified) into every component -> the saved state (its
        top-level values: step, wandb_id, ...)."""
        state = load_checkpoint(path)
        sharded = is_sharded_checkpoint(path)
        missing = [k for k in [*([] if sharded else ["model", "optimizer"]), *self.statefuls, "step"] if k not in state]
        if missing:
            what = "a weights file, not a training checkpoint" if "loader" in missing else "not this trainer's state"
            raise CheckpointError(f"{path}: {what}: no {', '.join(missing)} in it")
        for line in check_compatible(path, state.get("config"), self.config):
            log.info("resume: %s -> applied from here on", line)
        try:
            self._load(path, state, sharded)
        except (CheckpointError, CheckpointIncompatible):
            raise
        except Exception as err:  # verified bytes that still do not fit: named, and resume=auto tries the next
            raise CheckpointError(f"{path}: cannot be restored: {type(err).__name__}: {_first_line(err)}") from None
        return state

    def _load(self, path: Path, state: dict[str, Any], sharded: bool) -> None:
        loader = self.statefuls.get("loader")
        if loader is not None:  # a global position: any number of ranks continues it
            try:
                loader.load_state_dict(state["loader"])
            except ValueError as err:
                raise CheckpointIncompatible(f"cannot resume from {path}: {err}") from None
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if sharded:  # each rank reads the shards it holds now (DCP reshards)
            load_sharded_state(path, self.model, self.optimizer)
        else:  # every rank read the file; FSDP2 ranks keep their shards
            distributed.load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        for name, obj in self.statefuls.items():
            if name != "loader":
                obj.load_state_dict(state[name])
        scheduler = self.statefuls.get("scheduler")
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            apply_hyperparameters(self.optimizer, scheduler, fresh)
        self.progress.load_state_dict(state)

    def restore_newest_good(self, candidates: list[Path]) -> dict[str, Any]:
        """Restore the newest checkpoint that loads and verifies; each damaged one is skipped with a warning
        naming it and why. Fails when none is usable."""
        problems = []
        for path in candidates:
            try:
                state = self.restore(path)
                log.info("resumed from %s at step %d", path, state["step"])
                return state
            except CheckpointError as err:
                problems.append(str(err))
                log.warning("WARNING: skipping checkpoint %s: %s", path, err)
        raise CheckpointError("no usable checkpoint: " + "; ".join(problems))


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, fresh: list[dict[str, Any]]
) -> None:
    """After loading: the optimizer's hyperparameters come from this run's config (`fresh`: its param groups as
    built, before load_state_dict restored the checkpoint's), and the lr is re-derived for the resumed step."""
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, lr_lambda, base in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
