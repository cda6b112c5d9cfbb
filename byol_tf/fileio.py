"""One I/O layer: every path byol-tf reads or writes goes through `tf.io.gfile`.

So every entry point takes local paths and any file system TensorFlow knows (`gs://`,
`hdfs://`, `s3://` with the plugin, `ram://` in tests) alike, and no component stages files
locally to copy them back. TensorFlow is imported on first use, so modules that only parse
configs stay light.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any


def _gfile():
    import tensorflow as tf  # deferred: see the module docstring

    return tf.io.gfile


def is_remote(path: str) -> bool:
    """Whether `path` names a file system other than the local one (`scheme://...`)."""
    return "://" in path


def join(path: str, *parts: str) -> str:
    """Joins path components; URLs keep forward slashes."""
    if is_remote(path):
        return posixpath.join(path, *parts)
    return os.path.join(path, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path.rstrip(os.sep))


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path.rstrip(os.sep))


def absolute(path: str) -> str:
    """Local paths made absolute; URLs unchanged."""
    return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return _gfile().exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path)


def isfile(path: str) -> bool:
    gfile = _gfile()
    return gfile.exists(path) and not gfile.isdir(path)


def makedirs(path: str) -> None:
    _gfile().makedirs(path)


def listdir(path: str) -> list[str]:
    return [name.rstrip("/") for name in _gfile().listdir(path)]


def glob(pattern: str) -> list[str]:
    return _gfile().glob(pattern)


def walk(path: str):
    return _gfile().walk(path)


def rmtree(path: str) -> None:
    """Removes a folder and everything in it; nothing happens when it does not exist."""
    gfile = _gfile()
    if gfile.exists(path):
        gfile.rmtree(path)


def remove(path: str) -> None:
    gfile = _gfile()
    if gfile.exists(path):
        gfile.remove(path)


def size(path: str) -> int:
    return _gfile().stat(path).length


def open_file(path: str, mode: str = "r"):
    """A file object for `path` (`tf.io.gfile.GFile`)."""
    return _gfile().GFile(path, mode)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as stream:
        return stream.read()


def read_text(path: str) -> str:
    with open_file(path, "r") as stream:
        return stream.read()


def write_text(path: str, text: str) -> None:
    """Writes `text` atomically: to a temporary name beside `path`, then renamed over it.

    A reader (or a rerun after a kill) sees the old file or the new one, never half of one.
    Object stores rename by copying, which is still all-or-nothing for one file.
    """
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` atomically (see `write_text`)."""
    gfile = _gfile()
    parent = dirname(path)
    if parent:
        gfile.makedirs(parent)
    temporary = temporary_sibling(path)
    try:
        with gfile.GFile(temporary, "wb") as stream:
            stream.write(data)
        gfile.rename(temporary, path, overwrite=True)
    except BaseException:
        if gfile.exists(temporary):
            gfile.remove(temporary)
        raise


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_json(path: str, value: Any) -> None:
    """Writes `value` as indented JSON with sorted keys, atomically."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def temporary_sibling(path: str) -> str:
    """A fresh hidden name beside `path` (`.NAME.tmp-XXXXXXXX`) to write its next version under.

    Being a sibling (same parent, same file system), it can be renamed into place.
    """
    return join(dirname(absolute(path)), f".{basename(path)}.tmp-{uuid.uuid4().hex[:8]}")


def staging_dir(destination: str) -> str:
    """A fresh, empty sibling folder of `destination` to build its contents in (`temporary_sibling`)."""
    staging = temporary_sibling(destination)
    makedirs(staging)
    return staging


def remove_leftovers(path: str) -> None:
    """Removes what writers of `path` killed mid-write left beside it.

    That is their temporaries (`temporary_sibling`: a half-written file or staging folder)
    and the previous folder `replace_dir` had moved aside. Call it before writing `path`
    anew, from its only writer: a concurrent writer's temporary would go too.
    """
    parent, name = dirname(absolute(path)), basename(path)
    if not isdir(parent):
        return
    for entry in listdir(parent):
        if entry.startswith((f".{name}.tmp-", f"{name}.old-")):
            leftover = join(parent, entry)
            if isdir(leftover):
                rmtree(leftover)
            else:
                remove(leftover)


def copy_tree(source: str, destination: str) -> None:
    """Copies folder `source` into `destination` (created), file by file."""
    gfile = _gfile()
    source = source.rstrip("/")
    for root, _, files in gfile.walk(source):
        relative = root[len(source):].lstrip("/")
        target = join(destination, relative) if relative else destination
        gfile.makedirs(target)
        for name in files:
            gfile.copy(join(root, name), join(target, name), overwrite=True)


def replace_dir(source: str, destination: str) -> None:
    """Moves folder `source` to `destination`, replacing an existing one.

    On a local file system this is a rename, atomic: readers (a model server watching the
    folder) never see a half-written folder; an existing destination is moved aside first and
    deleted after, and moved back if the rename fails. Object stores (gs://, ...) have no
    folder rename: there the files are copied, then the source is removed.
    """
    gfile = _gfile()
    if is_remote(destination):
        if gfile.exists(destination):
            gfile.rmtree(destination)
        copy_tree(source, destination)
        gfile.rmtree(source)
        return
    if not gfile.exists(destination):
        gfile.rename(source, destination)
        return
    old = f"{destination.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
    gfile.rename(destination, old)
    try:
        gfile.rename(source, destination)
    except BaseException:
        gfile.rename(old, destination)
        raise
    gfile.rmtree(old)
