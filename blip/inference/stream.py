"""Run an inference function over a whole collection into a file: resume, torchrun ranks, progress, summary.

    rows_of = lambda items, unreadable: inference.caption(model, items, unreadable=unreadable)
    summary = stream_to_file(rows_of, items, "caps.jsonl", fields=["image", "caption"])

* Items whose rows are already in the output (or in a part file a killed run left) are skipped: a rerun
  continues where the last one stopped and never writes a row twice.
* Under torchrun, rank r takes every world-th pending item and appends to its own part file; rank 0 then merges
  the parts into the output in input order (so 2 ranks write what 1 process writes).
* Rows are flushed as they come; the summary (done, already done, every unreadable image with its reason,
  images/s) is printed and written beside the output (`caps.jsonl.summary.json`).
* `request` (what the rows depend on: checkpoint, task, texts, decoding, precision) goes into that side file
  before the first row; a rerun with another request into the same output is refused, naming what differs.
"""
from __future__ import annotations

import json
import sys
import time

from .. import distributed as dist
from .inputs import Item
from .outputs import RowWriter, check_request, done_rows, merge_parts, part_path, side_path, write_side_file



def _gather_counts(n_new, unreadable, start) -> list[dict]:
    """Every rank's {new, unreadable, seconds}, once all ranks have finished writing."""
    everyone = dist.all_gather_object({"new": n_new, "unreadable": [(it.id, why) for it, why in unreadable],
                                       "seconds": time.perf_counter() - start})
    dist.barrier()
    return everyone

def _key(image, text):
    return f"{image}\t{text}" if text is not None else str(image)


def stream_to_file(rows_of, items: list[Item], output, fields, *, text_field=None, clean=None, progress=True,
                   extra_summary=None, echo=None, settings=None, request=None) -> dict:
    """Write `rows_of(pending_items, unreadable)`'s rows to `output`; returns the summary dict.

    text_field: the row field that, with `image`, identifies an item (answer: "question", itm pairs: "text";
    None: the image alone); `clean(item.text)` gives that field's value from an item. extra_summary(rows) adds
    entries computed over every row of the output (e.g. classification accuracy). echo(row): called per new row
    (printing to stdout). settings: how the rows were computed (precision, device), written into the summary.
    request: what every row depends on (a JSON-able dict); an output made by another request is refused."""
    rank, world = dist.get_rank(), dist.get_world_size()
    clean = clean or (lambda t: t)
    check_request(output, request)

    def item_key(it):
        return _key(it.id, None if text_field is None else clean(it.text))

    def row_key(r):
        return _key(r["image"], None if text_field is None else r.get(text_field))

    done = {row_key(r) for r in done_rows(output)}
    pending = [it for it in items if item_key(it) not in done and not done.add(item_key(it))]  # dedup too
    already = len(items) - len(pending)
    mine = pending[rank::world]
    dist.barrier()  # every rank has read what is done before any rank writes: one pending list for all
    _record_request(output, request)
    writer = RowWriter(output if world == 1 else part_path(output, rank), fields)
    unreadable: list = []
    bar = None
    if progress and dist.is_main():
        from tqdm import tqdm
        bar = tqdm(total=len(mine), unit="img", desc=f"{output}" if world == 1 else f"{output} (rank 0 of {world})",
                   file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    start, n_new, last, batch = time.perf_counter(), 0, None, []

    def flush():
        nonlocal batch, n_new
        if batch:
            writer.write(batch)
            n_new += 1
            batch = []
        if bar is not None:
            bar.update(n_new + len(unreadable) - bar.n)

    try:
        for row in rows_of(mine, unreadable):
            key = row_key(row)
            if key != last:  # an item's rows (itm: one per text) are written together
                flush()
            batch.append(row)
            last = key
            if echo is not None:
                echo(row)
        flush()
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    everyone = _gather_counts(n_new, unreadable, start)
    summary = None
    if dist.is_main():
        if world > 1:
            position = {item_key(it): i for i, it in enumerate(items)}
            merge_parts(output, fields, order_key=lambda r: position.get(row_key(r), len(position)), row_key=row_key)
        new = sum(e["new"] for e in everyone)
        bad = [b for e in everyone for b in e["unreadable"]]
        seconds = max(e["seconds"] for e in everyone)
        summary = {"output": str(output), "items": len(items), "done_now": new, "already_done": already,
                   "unreadable": [{"image": i, "reason": why} for i, why in bad], "seconds": round(seconds, 3),
                   "images_per_s": round(new / seconds, 2) if seconds > 0 else None, "ranks": world,
                   **(settings or {}), "request": request}
        if extra_summary is not None:
            from .outputs import read_rows
            summary.update(extra_summary(read_rows(output)))
        write_side_file(output, summary)
    dist.barrier()
    return summary


def _record_request(output, request):
    """Rank 0, before the first row: the request in the side file, so a run killed now is known by it."""
    if request is not None and dist.is_main():
        import os
        os.makedirs(os.path.dirname(os.path.abspath(str(output))), exist_ok=True)
        write_side_file(output, {"output": str(output), "request": request, "complete": False})


def print_summary(summary: dict, what: str = "done", file=None):
    """One line of counts, then each unreadable image by name; the side file's path."""
    if summary is None:
        return
    file = file or sys.stderr
    bad = summary["unreadable"]
    speed = f", {summary['images_per_s']} img/s" if summary.get("images_per_s") else ""
    speed += f", {summary['precision']}" if summary.get("precision") else ""
    print(f"{summary['done_now']} {what} now, {summary['already_done']} already in {summary['output']}, "
          f"{len(bad)} unreadable ({summary['seconds']:.1f} s{speed})", file=file)
    for b in bad:
        print(f"  unreadable: {b['reason']}", file=file)
    for k in ("accuracy_top1", "accuracy_topk"):
        if k in summary:
            print(f"  {k}: {summary[k]:.2f}% over {summary['accuracy_n']} labelled images", file=file)
    print(f"  summary: {side_path(summary['output'])}", file=file)


# ---- embeddings: a tensor file, not rows ----

def read_embeddings(path) -> dict:
    """{"image_ids", "image_embeds", "text_ids", "text_embeds", "model"} (absent ones left out) of an `embed`
    output: a .safetensors file (ids and the model's identity in its metadata) or a .npy (+ `.ids.json`, texts in
    `.text.npy`)."""
    import os

    import numpy as np
    import torch
    path = str(path)
    out = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            for kind in ("image", "text"):
                if f"{kind}_embeds" in f.keys():
                    out[f"{kind}_embeds"] = f.get_tensor(f"{kind}_embeds")
                    out[f"{kind}_ids"] = json.loads(meta[f"{kind}_ids"])
            if "model" in meta:
                out["model"] = json.loads(meta["model"])
        return out
    if path.endswith(".npy"):
        stem = path[:-4]
        ids = json.load(open(stem + ".ids.json"))
        if ids.get("model") is not None:
            out["model"] = ids["model"]
        if ids.get("images") is not None:
            out["image_embeds"], out["image_ids"] = torch.from_numpy(np.load(path)), ids["images"]
        if os.path.exists(stem + ".text.npy"):
            out["text_embeds"], out["text_ids"] = torch.from_numpy(np.load(stem + ".text.npy")), ids["texts"]
        return out
    raise ValueError(f"{path}: embeddings are .safetensors or .npy")


def write_embeddings(path, image_ids=None, image_embeds=None, text_ids=None, text_embeds=None, model=None):
    """The embed output, written atomically (temp file + rename). model: the identity of the model that made the
    features (task, model_config, checkpoint), which `search` compares with its own."""
    import os

    import numpy as np
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        tensors, meta = {}, {"format": "blip-embeddings"}
        if model is not None:
            meta["model"] = json.dumps(model)
        for kind, ids, emb in (("image", image_ids, image_embeds), ("text", text_ids, text_embeds)):
            if ids is not None:
                tensors[f"{kind}_embeds"] = emb.float().contiguous()
                meta[f"{kind}_ids"] = json.dumps(list(ids))
        save_file(tensors, path + ".tmp", metadata=meta)
        os.replace(path + ".tmp", path)
        return
    if not path.endswith(".npy"):
        raise ValueError(f"{path}: embeddings are written to .safetensors or .npy")
    stem = path[:-4]
    if image_ids is not None:
        np.save(stem + ".tmp.npy", image_embeds.float().numpy())
        os.replace(stem + ".tmp.npy", path)
    if text_ids is not None:
        np.save(stem + ".tmp.npy", text_embeds.float().numpy())
        os.replace(stem + ".tmp.npy", stem + ".text.npy")
    with open(stem + ".ids.json.tmp", "w") as f:
        json.dump({"images": None if image_ids is None else list(image_ids),
                   "texts": None if text_ids is None else list(text_ids), "model": model}, f)
    os.replace(stem + ".ids.json.tmp", stem + ".ids.json")


def embed_to_file(rows_of, items: list[Item], output, *, texts_rows=None, chunk_size=1024, progress=True,
                  request=None, model=None) -> dict:
    """Image embeddings of `items` (rows {"image", "embedding"} from rows_of(pending, unreadable)) and optionally
    text embeddings (`texts_rows`: rows {"text", "embedding"}) into `output`. Image features are saved every
    `chunk_size` images to `OUT.chunks/` (the resume points; a kill loses at most one chunk), then merged with
    an earlier output's rows into `output` in input order. request: as stream_to_file's (an output of another
    request is refused); model: the model's identity, stored in the output (see write_embeddings)."""
    import glob
    import os
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    rank, world = dist.get_rank(), dist.get_world_size()
    chunk_dir = str(output) + ".chunks"
    check_request(output, request)
    os.makedirs(chunk_dir, exist_ok=True)
    dist.barrier()

    def chunks():
        return sorted(glob.glob(os.path.join(chunk_dir, "*.safetensors")))

    done = set()
    previous = read_embeddings(output) if os.path.exists(output) else {}
    done.update(previous.get("image_ids", []))
    for c in chunks():
        with safe_open(c, "pt") as f:
            done.update(json.loads(f.metadata()["ids"]))
    pending = [it for it in items if it.id not in done and not done.add(it.id)]
    already = len(items) - len(pending)
    mine = pending[rank::world]
    dist.barrier()  # every rank has listed the chunks before any rank writes one
    _record_request(output, request)
    unreadable: list = []
    bar = None
    if progress and dist.is_main():
        from tqdm import tqdm
        bar = tqdm(total=len(mine), unit="img", desc=str(output), file=sys.stderr, dynamic_ncols=True, mininterval=1)
    ids, feats, n_new = [], [], 0
    start = time.perf_counter()

    def save():
        nonlocal ids, feats
        if ids:
            name = os.path.join(chunk_dir, f"chunk-{time.time_ns()}-rank{rank}.safetensors")
            save_file({"embeds": torch.stack(feats)}, name + ".tmp", metadata={"ids": json.dumps(ids)})
            os.replace(name + ".tmp", name)
            ids, feats = [], []

    for row in rows_of(mine, unreadable) if mine else []:
        ids.append(row["image"])
        feats.append(row["embedding"])
        n_new += 1
        if len(ids) >= chunk_size:
            save()
        if bar is not None:
            bar.update(n_new + len(unreadable) - bar.n)
    save()
    if bar is not None:
        bar.close()
    everyone = _gather_counts(n_new, unreadable, start)
    summary = None
    if dist.is_main():
        got = {}
        for i, f in zip(previous.get("image_ids", []), previous.get("image_embeds", [])):
            got[i] = f
        for c in chunks():
            with safe_open(c, "pt") as f:
                for i, e in zip(json.loads(f.metadata()["ids"]), f.get_tensor("embeds")):
                    got.setdefault(i, e)
        order = [it.id for it in items if it.id in got]
        listed = set(order)
        order += [i for i in got if i not in listed]  # rows of an earlier run over other inputs stay
        text_ids = text_feats = None
        if texts_rows is not None:
            trows = list(texts_rows)
            text_ids, text_feats = [r["text"] for r in trows], torch.stack([r["embedding"] for r in trows])
        elif "text_ids" in previous:
            text_ids, text_feats = previous["text_ids"], previous["text_embeds"]
        write_embeddings(output, order or None, torch.stack([got[i] for i in order]) if order else None,
                         text_ids, text_feats, model=model)
        shutil.rmtree(chunk_dir)
        bad = [b for e in everyone for b in e["unreadable"]]
        new = sum(e["new"] for e in everyone)
        seconds = max(e["seconds"] for e in everyone)
        summary = {"output": str(output), "items": len(items), "done_now": new, "already_done": already,
                   "unreadable": [{"image": i, "reason": why} for i, why in bad], "seconds": round(seconds, 3),
                   "images_per_s": round(new / seconds, 2) if seconds > 0 else None, "ranks": world,
                   "images": len(order), "texts": 0 if text_ids is None else len(text_ids), "request": request}
        write_side_file(output, summary)
    dist.barrier()
    return summary
