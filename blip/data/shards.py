"""Tar shards as the `webdataset` library reads them (SPEC §9), with the checks it leaves out.

* URLs: a string or a list; each string may join several sources with `::` and use brace expansion
  (`cc12m-{00000..01242}.tar`); a local path may also be a glob (`shards/*.tar`). `pipe:CMD` streams a command's
  stdout (`pipe:aws s3 cp s3://bucket/shard-000.tar -`), `http(s)://` goes through curl, as in webdataset.
* A sample is the run of ADJACENT members sharing a key (member path up to the first dot of its name:
  `./000001.jpg` -> key `./000001`, ext `jpg`; extensions lower-cased; names without a dot are ignored), as in
  webdataset. webdataset turns non-adjacent members of one key into two partial samples without a word; here a key
  that comes back after another key started is refused with `ShardOrderError`, naming the shard and the fix.
  Plain `tar -C dir -cf shard.tar .` writes members in directory order and produces exactly such shards.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "sftp://", "scp://", "hf://")
ORDER_FIX = ("write the shard with its sample members adjacent: `tar --sort=name -cf shard.tar -C dir .` "
             "(GNU tar), or webdataset's TarWriter/ShardWriter, or img2dataset")


class ShardOrderError(ValueError):
    """A shard whose sample members are not adjacent (or hold one file twice)."""


def is_remote(url: str) -> bool:
    return str(url).startswith(REMOTE_PREFIXES)


def expand_shards(spec) -> list[str]:
    """Every shard URL of `spec` (str or list of str): `::`-joined sources, braces, and globs for local paths."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls = []
    for item in items:
        for url in expand_urls(str(item)):
            if not is_remote(url) and any(c in url for c in "*?["):
                urls += sorted(glob.glob(url)) or [url]
            else:
                urls.append(url)
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def tar_key_ext(member_name: str) -> tuple[str | None, str | None]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'); './a.b.JPG' -> ('./a', 'b.jpg'); (None, None) without a dot."""
    key, ext = base_plus_ext(member_name)
    return (None, None) if key is None else (key, ext.lower())


class _KeyOrder:
    """Follows the keys of one shard's members; raises ShardOrderError when a finished key comes back."""

    def __init__(self, shard):
        self.shard, self.done, self.key, self.exts = shard, set(), None, set()

    def see(self, key, ext, member):
        if key != self.key:
            if key in self.done:
                raise ShardOrderError(
                    f"{self.shard}: the members of sample {key!r} are not adjacent ({member} comes after members of "
                    f"other samples), so its image and caption cannot be paired while streaming. This is what plain "
                    f"`tar` writes in directory order. Fix: {ORDER_FIX}.")
            if self.key is not None:
                self.done.add(self.key)
            self.key, self.exts = key, set()
        if ext in self.exts:
            raise ShardOrderError(f"{self.shard}: sample {key!r} holds {ext!r} twice ({member}). Fix: {ORDER_FIX}.")
        self.exts.add(ext)


def tar_headers(path):
    """(key, ext, TarInfo) of every regular member of a local tar, in order, reading headers only (seeks over the
    data); refuses non-adjacent samples."""
    if is_remote(path):
        raise ValueError(f"{path}: needs a local, seekable .tar file (this reader seeks by offset); "
                         f"copy the shard locally first")
    order = _KeyOrder(path)
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isreg():
                continue
            key, ext = tar_key_ext(m.name)
            if key is None or re.match(r"__[^/]*__($|/)", m.name):  # webdataset's metadata members
                continue
            order.see(key, ext, m.name)
            yield key, ext, m


def count_samples(path, image_exts) -> int:
    """Samples of a local shard holding an image and a caption file (txt or json): headers only."""
    samples: dict[str, set] = {}
    for key, ext, _ in tar_headers(path):
        samples.setdefault(key, set()).add(ext)
    return sum(1 for exts in samples.values() if exts & set(image_exts) and exts & {"txt", "json"})


def stream_samples(urls):
    """(shard, key, {ext: bytes}) from the shards in order, read by webdataset's opener (files, `pipe:`, http) and
    tar expander; members grouped when adjacent, a non-adjacent shard refused."""
    files = tar_file_expander(url_opener({"url": u} for u in urls))  # yields {} at the end of every shard
    order, shard, key, sample = None, None, None, {}
    for f in files:
        if not f:  # end of a shard
            if sample:
                yield shard, key, sample
            order, key, sample = None, None, {}
            continue
        if order is None:
            shard = f["__url__"]
            order = _KeyOrder(shard)
        k, ext = tar_key_ext(f["fname"])
        if k is None:
            continue
        order.see(k, ext, f["fname"])
        if k != key:
            if sample:
                yield shard, key, sample
            key, sample = k, {}
        sample[ext] = f["data"]
    if sample:
        yield shard, key, sample


def tar_caption(files: dict, name=""):
    """A sample's caption: KEY.txt when not empty, else the 'caption' (or 'text') of KEY.json; None if neither.
    A json that does not parse raises ValueError naming `name`.json and the line/column."""
    if "txt" in files:
        text = files["txt"].decode("utf-8", errors="replace")
        if text.strip() or "json" not in files:
            return text if text.strip() else None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise ValueError(f"{name}.json: not valid JSON ({where})") from None
        caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
        return caption if isinstance(caption, str) and caption.strip() else None
    return None
