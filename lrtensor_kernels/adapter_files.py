"""An adapter directory on disk: its two files written all or nothing, read as a consistent pair.

A directory holds ``adapter_config.json`` and the tensors file that config names (format 3:
``"files": {"tensors": "adapters-<hash>.safetensors"}``, ``<hash>`` the first 16 hex digits of
the file's SHA-256; formats 1 and 2 always used ``adapters.safetensors``). The config is the switch:

- :func:`write_pair` writes the tensors file under its content name, then the config, each to a
  temporary name unique to the call (created with mode 0666, so the umask decides the permissions,
  as for any file the user writes), flushed to disk and renamed into place; the config's rename is
  the one step that replaces the old pair by the new. Saves into one directory are serialised by an
  exclusive lock on the directory (``flock``, across threads and processes; a lock per directory in
  this process where ``flock`` does not exist), and after the switch the save removes the tensors
  files no config names any more. A failed or interrupted save removes what it wrote and leaves the
  old pair in place.
- :func:`open_pair` reads the config, then opens the file it names and reads everything from that
  open file: a save that replaces the pair meanwhile cannot mix the two (a file named by its content
  always holds that content; one removed after it was opened stays readable); if the named file was
  removed before it was opened, the config is read again.

:func:`read_header` checks a safetensors header as the format requires, and :func:`read_tensors`
reads the tensors it lists from the same open file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import struct
import threading
from typing import Callable, Optional

import torch
from safetensors.torch import save as safetensors_bytes

from .errors import AdapterFileError

try:
    import fcntl
except ImportError:  # not on Windows: the lock per directory in this process remains
    fcntl = None

CONFIG_FILE = "adapter_config.json"
LEGACY_TENSORS_FILE = "adapters.safetensors"  # formats 1 and 2
_CONTENT_NAMED = re.compile(r"adapters-[0-9a-f]{16}\.safetensors")
_TEMPORARY = re.compile(r"\.lrtensor-[0-9a-f]{16}\.tmp")
_OPEN_ATTEMPTS = 20

# bytes per element of every safetensors dtype, and the torch dtype it is read as
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
                 "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
                 "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit


def shown(value) -> str:
    """A JSON value as an error message shows it: its kind and its first characters."""
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return f"{kind} ({text[:60]}{'...' if len(text) > 60 else ''})"


def is_shape(value) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def is_tensors_file_name(value) -> bool:
    """A file name inside the directory (no path), of a safetensors file."""
    return isinstance(value, str) and value.endswith(".safetensors") and os.path.basename(value) == value \
        and value not in (".", "..") and "/" not in value and "\\" not in value


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
_process_locks: dict = {}
_process_locks_guard = threading.Lock()


@contextlib.contextmanager
def locked(directory: str):
    """Exclusive use of ``directory`` for one save: a lock per directory among this process's
    threads, and ``flock`` on the directory among processes (where the platform has it)."""
    with _process_locks_guard:
        lock = _process_locks.setdefault(os.path.realpath(directory), threading.Lock())
    with lock:
        if fcntl is None:
            yield
            return
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


def _write_new_file(path: str, data: bytes) -> None:
    """``data`` in a new file at ``path`` (mode 0666 less the umask), flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(directory: str) -> None:
    """Makes the renames in ``directory`` durable (where directories can be opened: not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _names_in(config_path: str) -> set:
    """The tensors file names a config names (none if it is missing or unreadable)."""
    try:
        with open(config_path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return set()
    if not isinstance(config, dict):
        return set()
    files = config.get("files")
    if isinstance(files, dict):
        return {name for name in files.values() if is_tensors_file_name(name)}
    return {LEGACY_TENSORS_FILE}


# steps of a save, for tests that interleave other work between them: a function of the step's
# name, called after each ("tensors", "config", "cleanup")
_after_step: Optional[Callable[[str], None]] = None


def _step_done(name: str) -> None:
    if _after_step is not None:
        _after_step(name)


def _put(directory: str, name: str, content: bytes) -> None:
    """``content`` under ``name`` in ``directory``: written to a temporary name unique to the call,
    flushed, then renamed into place (readers see the old file or the new one, never part of one)."""
    temporary = os.path.join(directory, f".lrtensor-{secrets.token_hex(8)}.tmp")
    try:
        _write_new_file(temporary, content)
        os.replace(temporary, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_pair(directory: str, tensors: dict, metadata: dict, config: dict) -> None:
    """Replace the pair in ``directory`` by ``tensors`` (a safetensors file with ``metadata``) and
    ``config`` (JSON; its ``"files"`` entry is set here), all or nothing (see the module doc)."""
    data = safetensors_bytes(tensors, metadata=metadata)
    tensors_name = f"adapters-{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    text = json.dumps(dict(config, files=dict(tensors=tensors_name)), indent=2).encode("utf-8")
    os.makedirs(directory, exist_ok=True)
    with locked(directory):
        previous = _names_in(os.path.join(directory, CONFIG_FILE))
        written = []  # what this save put in place beside the old pair: removed if it fails before the switch
        try:
            _put(directory, tensors_name, data)
            if tensors_name not in previous:
                written.append(os.path.join(directory, tensors_name))
            _step_done("tensors")
            _put(directory, CONFIG_FILE, text)  # the switch
            written = []
            _step_done("config")
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise
        _sync_directory(directory)
        _remove_unnamed(directory, {tensors_name})
        _step_done("cleanup")


def _remove_unnamed(directory: str, named: set) -> None:
    """Removes the tensors files of earlier saves that the config no longer names, and the temporary
    files of saves that were interrupted (the caller holds the directory's lock, so no save is
    writing any)."""
    for entry in os.listdir(directory):
        stale = entry not in named and (_CONTENT_NAMED.fullmatch(entry) or entry == LEGACY_TENSORS_FILE)
        if stale or _TEMPORARY.fullmatch(entry):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, entry))


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise AdapterFileError(f"load_adapters: {path} cannot be read: {err.strerror or err}", path) from err


def open_pair(directory: str, parse_config: Callable[[bytes, str], tuple]):
    """``(parsed, tensors_path, handle)``: ``parse_config(raw, path)`` of the config, which returns
    ``(parsed, tensors file name)``, and the tensors file it names, opened (the caller closes it)."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise AdapterFileError(f"load_adapters: {config_path} does not exist", config_path)
    raw = _read_bytes(config_path)
    for attempt in range(_OPEN_ATTEMPTS):
        parsed, tensors_name = parse_config(raw, config_path)
        tensors_path = os.path.join(directory, tensors_name)
        try:
            return parsed, tensors_path, open(tensors_path, "rb")
        except FileNotFoundError:
            again = _read_bytes(config_path)
            if again == raw:
                named = "" if tensors_name == LEGACY_TENSORS_FILE else f" (named by {CONFIG_FILE})"
                raise AdapterFileError(f"load_adapters: {tensors_path}{named} does not exist", tensors_path) from None
            raw = again  # a save replaced the pair meanwhile: read the new one
        except OSError as err:
            raise AdapterFileError(f"load_adapters: {tensors_path} cannot be read: {err.strerror or err}",
                                   tensors_path) from err
    raise AdapterFileError(f"load_adapters: {directory} changed {_OPEN_ATTEMPTS} times while it was read; saves "
                           "into it are still running", directory)


@dataclasses.dataclass
class Header:
    """A checked safetensors header: ``tensors`` ``{name: (dtype, shape)}``, ``offsets``
    ``{name: (begin, end)}`` within the data section, which starts at byte ``data_start``."""

    tensors: dict
    offsets: dict
    data_start: int


def read_header(handle, path: str) -> Header:
    """The header of the open safetensors file, checked as the format requires: known dtypes,
    offsets that tile the data section exactly, sizes that match the shapes."""
    def fail(problem):
        return AdapterFileError(f"load_adapters: {path}: {problem}", path)

    try:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(0)
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise fail(f"not a safetensors file: {size} bytes, fewer than the 8 of the header length")
        length = struct.unpack("<Q", prefix)[0]
        if length > min(size - 8, _MAX_HEADER):
            raise fail(f"the header length field says {length} bytes, but "
                       + (f"the file holds {size - 8} after it (truncated or not safetensors)"
                          if length > size - 8 else f"headers are limited to {_MAX_HEADER}"))
        raw = handle.read(length)
    except OSError as err:
        raise AdapterFileError(f"load_adapters: {path} cannot be read: {err.strerror or err}", path) from err
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise fail(f"the header is not valid JSON ({type(err).__name__}: {str(err)[:100]})") from None
    if not isinstance(header, dict):
        raise fail(f"the header must be a JSON object, found {shown(header)}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail(f"'__metadata__' must map names to strings, found {shown(metadata)}")
    data_size, spans, found, offsets = size - 8 - length, [], {}, {}
    for name, info in header.items():
        fields_ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in _ITEMSIZE \
            and is_shape(info.get("shape")) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(type(o) is int for o in info["data_offsets"])
        if not fields_ok:
            raise fail(f"tensor {name}: expected dtype (one of {list(_ITEMSIZE)}), shape and data_offsets, found "
                       f"{shown(info)}")
        begin, end = info["data_offsets"]
        nbytes = math.prod(info["shape"]) * _ITEMSIZE[info["dtype"]]
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise fail(f"tensor {name}: data_offsets {info['data_offsets']} do not hold its {nbytes} bytes "
                       f"({info['dtype']} {info['shape']}) within the {data_size}-byte data section")
        spans.append((begin, end, name))
        found[name] = (info["dtype"], tuple(info["shape"]))
        offsets[name] = (begin, end)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise fail(f"tensor {name} starts at byte {begin} of the data section, expected {position} "
                       "(tensors must tile the data section without gaps or overlaps)")
        position = end
    if position != data_size:
        raise fail(f"the tensors end at byte {position} of the {data_size}-byte data section")
    return Header(found, offsets, 8 + length)


def read_tensors(handle, path: str, header: Header, keys: list) -> dict:
    """``{key: tensor}`` read from the open file whose checked header is ``header`` (little-endian,
    as safetensors stores them)."""
    tensors = {}
    try:
        for key in keys:
            dtype, shape = header.tensors[key]
            begin, end = header.offsets[key]
            data = bytearray(end - begin)
            handle.seek(header.data_start + begin)
            if handle.readinto(data) != len(data):
                raise AdapterFileError(f"load_adapters: {path}: tensor {key} ends past the end of the file (it "
                                       "changed while it was read)", path)
            flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            tensors[key] = flat.view(_TORCH_DTYPES[dtype]).reshape(shape)
    except OSError as err:
        raise AdapterFileError(f"load_adapters: {path} cannot be read: {err.strerror or err}", path) from err
    return tensors
