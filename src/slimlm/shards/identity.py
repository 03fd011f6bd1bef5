"""Who and what made a set of token shards: the tokenizer's identity, one record per source
(path, size, mtime, digest; or hub name, config, split), the identity a manifest records, and
the ``*_difference`` helpers saying why a recorded identity is not the current one."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

from slimlm import outputs
from slimlm.data import padding_id, source_paths
from slimlm.errors import InputError
from slimlm.shards.options import FORMAT, LAYOUT_SETTINGS, VERSION, TokenizeOptions, token_dtype, vocab_bound

HUB_PREFIXES = ("hub:", "hf://")


def tokenizer_identity(tokenizer) -> dict:
    """Who made a set of shards: the tokenizer's ``name_or_path``, vocabulary size, special ids and
    a digest of its whole definition (a fast tokenizer's JSON without its truncation and padding
    state, else its vocabulary), so the same tokenizer loaded from elsewhere matches."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
    else:
        definition = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""), "vocab_size": vocab_bound(tokenizer),
            "digest": digest, "eos_id": tokenizer.eos_token_id, "bos_id": tokenizer.bos_token_id,
            "pad_id": padding_id(tokenizer)}


def _tokenizer_difference(recorded: dict, current: dict) -> str | None:
    if all(recorded.get(key) == current[key] for key in ("digest", "vocab_size", "eos_id", "bos_id")):
        return None
    return (f"made by another tokenizer ({recorded.get('name_or_path')!r}: {recorded.get('vocab_size')} tokens, "
            f"digest {recorded.get('digest')}, eos {recorded.get('eos_id')}, bos {recorded.get('bos_id')}), not "
            f"{current['name_or_path']!r} ({current['vocab_size']} tokens, digest {current['digest']}, eos "
            f"{current['eos_id']}, bos {current['bos_id']})")


def _hub_name(spec) -> str | None:
    spec = os.fspath(spec)
    for prefix in HUB_PREFIXES:
        if spec.startswith(prefix):
            return spec[len(prefix):].removeprefix("datasets/")
    return None


def _specs(sources) -> list[str]:
    specs = [os.fspath(sources)] if isinstance(sources, (str, os.PathLike)) else [os.fspath(s) for s in sources]
    if not specs:
        raise InputError("no data sources given")
    return specs


def local_sources(sources) -> list[str]:
    """The sources that are local paths or globs (not hub ids), for the output checks."""
    return [spec for spec in _specs(sources) if _hub_name(spec) is None]


def _size_and_mtime(path: str) -> tuple[int, float]:
    if os.path.isfile(path):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime
    stats = [os.stat(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names]
    return sum(s.st_size for s in stats), max((s.st_mtime for s in stats), default=0.0)


def source_name(record: dict) -> str:
    """A data source's short name, as a mix names it: a file's or folder's name without its
    extensions (``docs.part1.jsonl`` → ``docs``), a hub dataset's name without its owner."""
    if "hub" in record:
        return record["hub"].rsplit("/", 1)[-1]
    return os.path.basename(record["path"].rstrip(os.sep)).split(".")[0] or record["path"]


def source_names(sources, where: str) -> list[str]:
    """The names (``source_name``) of ``sources`` — paths, globs, hub ids as ``write_shards`` takes
    them, or its source records — in reading order; InputError naming ``where`` when two share one."""
    if isinstance(sources, list) and all(isinstance(record, dict) for record in sources):
        records = sources
    else:
        records = []
        for spec in _specs(sources):
            hub = _hub_name(spec)
            records += [{"hub": hub.partition(":")[0]}] if hub is not None else \
                [{"path": path} for path in source_paths(spec)]
    names = []
    for record in records:
        name = source_name(record)
        if name in names:
            raise InputError(f"{where}: two data sources are named {name!r}; rename one file so that each source of "
                             "the mix has its own name")
        names.append(name)
    return names


def source_records(sources, split: str | None = None, *, known: Iterable[dict] = ()) -> list[dict]:
    """One record per source in reading order: a local file or saved dataset as its absolute
    path, size, mtime and SHA-256 (``outputs.file_digest``), a hub dataset as its name, config
    and split. A digest of ``known`` is reused for a path whose size and mtime are unchanged."""
    previous = {record.get("path"): record for record in known}
    records = []
    for spec in _specs(sources):
        name = _hub_name(spec)
        if name is not None:
            try:
                import datasets  # noqa: F401
            except ImportError:
                raise InputError(f"data {spec}: streaming a hub dataset needs the `datasets` package, which is not "
                                 "installed (pip install datasets), or save the data locally") from None
            name, _, config = name.partition(":")
            records.append({"hub": name, "config": config or None, "split": split or "train"})
            continue
        for path in source_paths(spec):
            path = os.path.abspath(path)
            size, mtime = _size_and_mtime(path)
            old = previous.get(path)
            same = old is not None and old.get("size") == size and old.get("mtime") == mtime
            records.append({"path": path, "size": size, "mtime": mtime,
                            "sha256": old["sha256"] if same else outputs.file_digest(path)})
    return records


def _sources_difference(recorded: list[dict], current: list[dict]) -> str | None:
    def key(record):
        return record.get("path") or f"hub:{record.get('hub')}"

    if [key(r) for r in recorded] != [key(r) for r in current]:
        return (f"made from other sources ({', '.join(map(key, recorded))}), not "
                f"{', '.join(map(key, current))}")
    for old, new in zip(recorded, current):
        if "hub" in new:
            if (old.get("config"), old.get("split")) != (new["config"], new["split"]):
                return (f"made from {key(new)} config {old.get('config')!r} split {old.get('split')!r}, not config "
                        f"{new['config']!r} split {new['split']!r}")
        elif old.get("size") != new["size"]:
            return f"source {new['path']} changed since the shards were written ({old.get('size')} → {new['size']} bytes)"
        elif old.get("sha256") != new["sha256"]:
            return f"source {new['path']} changed since the shards were written (its SHA-256 differs)"
    return None


def _settings_difference(recorded: dict, current: dict, names) -> str | None:
    changed = [name for name in names if recorded.get(name) != current.get(name)]
    if not changed:
        return None
    return "made with " + ", ".join(f"{name}={recorded.get(name)!r}, not {current.get(name)!r}" for name in changed)


def _identity_difference(recorded: dict, current: dict, settings=LAYOUT_SETTINGS) -> str | None:
    """Why shards recorded as ``recorded`` are not those ``current`` describes (None: they are)."""
    if (recorded.get("format"), recorded.get("version")) != (FORMAT, VERSION):
        return f"written in another format ({recorded.get('format')} version {recorded.get('version')})"
    return (_tokenizer_difference(recorded.get("tokenizer") or {}, current["tokenizer"])
            or _settings_difference(recorded.get("settings") or {}, current["settings"], settings)
            or _sources_difference(recorded.get("sources") or [], current["sources"]))


def _identity(tokenizer, sources, options: TokenizeOptions, known=()) -> dict:
    for flag, token_id, token in ((options.add_eos, tokenizer.eos_token_id, "EOS"),
                                  (options.add_bos, tokenizer.bos_token_id, "BOS")):
        if flag and token_id is None:
            raise InputError(f"add_{token.lower()} is on but the tokenizer has no {token} token")
    identity = tokenizer_identity(tokenizer)
    return {"format": FORMAT, "version": VERSION, "dtype": token_dtype(identity["vocab_size"]).name,
            "tokenizer": identity, "settings": {name: getattr(options, name) for name in LAYOUT_SETTINGS},
            "sources": source_records(sources, options.split, known=known)}
