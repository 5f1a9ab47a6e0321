"""Which model files the user trusts to run code: exactly the files named, or the files under a folder named.

By default nothing in a model folder runs code: checkpoints are read with ``torch.load(weights_only=True)`` and
pickles with an allow-list (:mod:`.checkpoints`), plans name only allowed classes (:mod:`.allowlist`), and a
TorchScript file (a program) is not run at all. ``--trust-checkpoint PATH`` (repeatable) lifts that for:

* ``PATH`` a file: that file only;
* ``PATH`` a folder: every file under it, at any depth (``--model M --trust-checkpoint M`` trusts M's checkpoints).

A manifest can never grant trust. A trusted file is still first read safely; full unpickling is used only when
the safe read refuses it (and a TorchScript file is run). Each member records the files it loaded that way
(``trusted_files`` in its provenance), and the result's JSON lists them all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from .errors import ModelError

TRUST_OPTION = "--trust-checkpoint"


class TrustedFiles:
    """The files and folders the user trusts (resolved), and :meth:`covers` to ask about one file."""

    def __init__(self, paths: Iterable[str | Path] = (), *, everything: bool = False) -> None:
        self.files: set[Path] = set()
        self.folders: set[Path] = set()
        #: trust every file (library callers that pass ``trust_checkpoint=True`` for one member)
        self.everything = everything
        for given in paths:
            path = Path(given).expanduser()
            if not path.exists():
                raise ModelError(f"{TRUST_OPTION} {given}: no such file or folder. Give the checkpoint or TorchScript "
                                 "file you trust (or the folder that holds it).")
            resolved = path.resolve()
            (self.folders if resolved.is_dir() else self.files).add(resolved)

    @classmethod
    def of(cls, value: "TrustedFiles | bool | Sequence[str | Path] | None") -> "TrustedFiles":
        """``value`` as TrustedFiles: itself, True (everything), False/None (nothing), or a list of paths."""
        if isinstance(value, TrustedFiles):
            return value
        if value is True:
            return cls(everything=True)
        if value is False or value is None:
            return cls()
        return cls(value)

    def covers(self, path: str | Path) -> bool:
        """Whether the user trusts ``path``: it is a trusted file, or lies under a trusted folder."""
        if self.everything:
            return True
        resolved = Path(path).expanduser().resolve()
        return resolved in self.files or any(folder == resolved or folder in resolved.parents
                                             for folder in self.folders)

    def __bool__(self) -> bool:
        return self.everything or bool(self.files or self.folders)


def trust_advice(path: Path) -> str:
    """How to trust one file, for error messages."""
    return (f"Do so only if you trust its source: pass {TRUST_OPTION} {path} (that file only; in Slicer, confirm the "
            "question about it). A manifest cannot grant this.")


#: The files a ``torchscript`` member's folder may hold (as :data:`.members.torchscript.MODEL_FILE_SUFFIXES`).
_MODEL_FILE_SUFFIXES = (".ts", ".pt", ".pth", ".ckpt")


def torchscript_files(manifest: str | Path) -> list[Path]:
    """The TorchScript files a model-set manifest would run (its ``torchscript`` members' files that exist), for
    asking the user before passing ``--trust-checkpoint`` (the Slicer module does). Reads the manifest only (no
    torch import); an unreadable manifest gives [] (running it then reports the problem)."""
    from .jsonfiles import MANIFEST_MAX_BYTES, read_json_file

    manifest = Path(manifest).expanduser().resolve()
    try:
        data, _ = read_json_file(manifest, "model-set manifest", MANIFEST_MAX_BYTES)
    except ModelError:
        return []
    found: list[Path] = []
    for member in data.get("members", []) if isinstance(data, dict) else []:
        if not isinstance(member, dict) or member.get("framework") != "torchscript":
            continue
        if not isinstance(member.get("path"), str):
            continue
        path = Path(member["path"]).expanduser()
        path = (path if path.is_absolute() else manifest.parent / path).resolve()
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.is_file()
                                and p.suffix.lower() in _MODEL_FILE_SUFFIXES))
        elif path.is_file():
            found.append(path)
    return found
