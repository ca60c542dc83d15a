"""Command line (`blip ...` once installed, or `python -m blip ...`): run BLIP over whole image collections.

    blip caption  SOURCES... [-o caps.jsonl] [--beams 3 --max-length 20 --min-length 5] [--sample --top-p 0.9
                  --num-captions N] [--prompt 'a picture of ']
    blip answer   SOURCES... (--question "..." | --questions q.json|q.csv) [--rank --answer-list FILE]
    blip itm      SOURCES... [--text "..." ...]      every image x every text; without --text: the pairs of a JSON
                                                     annotation file ([{image, caption}])
    blip embed    SOURCES... -o gallery.safetensors [--text "..." | --texts FILE]   (or gallery.npy + .ids.json)
    blip search   --gallery gallery.safetensors --query "..." [--queries FILE] [--k 5] [--rerank 20] [--faiss]
    blip classify SOURCES... [--labels a,b,c | --labels-file F] [--template "a photo of a {}."] [--k 5]
                  [--rerank 3] [--truth labels.csv]   accuracy when sub-folders (one per class) or --truth give labels
    blip explain  IMAGE --text "..." -o out/ [--layer N] [--overwrite]   Grad-CAM: one overlay PNG per word + gradcam.json (peaks)
    blip demo     [--port 7860] [--gallery gallery.safetensors]   web demo on 127.0.0.1 (pip install -r
                  requirements-demo.txt)

SOURCES: image files, folders (recursive), globs ('photos/**/*.jpg'), a .txt file of paths, a .json annotation
file, local .tar shards (`shards/{000..009}.tar`). Images are decoded in --workers DataLoader workers and run
in batches of --batch-size; --bf16 (bfloat16 weights) / --fp16 (autocast); --device. Unreadable images are skipped and named.

With -o/--output FILE (.jsonl or .csv) rows are streamed to the file, flushed as they come; a rerun of the same
request (checkpoint, task, texts, decoding options, precision) into the same output skips what is done; another
request is refused, naming what differs (--overwrite moves the old output aside). The request and the summary go
to `FILE.summary.json`. Under `torchrun --nproc_per_node N
-m blip ...` each rank takes a part and rank 0 merges them. Without --output rows are printed (--json: one JSON
object a line).

Model: --checkpoint (original .pth, our .safetensors or a transformers directory; none: RANDOM weights, a
warning says so), --set KEY=VALUE model options (`--set vit=large image_size=480`, `--set med_config.hidden_size=256`;
an original .pth carries no sizes: give them here). A checkpoint that names its task (ours) is loaded as that task;
one of another task than the command runs is refused unless --task asks for it (and its weights fit). Without a
stored task, embed/search/classify/itm build `--task itm` (the original's ITM model, [CLS] first); a retrieval or
pretraining checkpoint: `--task retrieval|pretrain` ([ENC] first).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .inference.loading import (COMMAND_TASK, DEFAULT_IMAGE_SIZE, ITC_TASKS, check_gallery, load,  # noqa: F401
                                model_identity, model_task, parse_sets)

# the options each command's rows depend on (besides checkpoint, task, --set and precision): the request an output
# keeps in its side file; files given by name count by their identity (path, size, mtime)
ROW_OPTIONS = {"caption": ("beams", "max_length", "min_length", "sample", "top_p", "num_captions",
                           "repetition_penalty", "prompt", "seed"),
               "answer": ("question", "questions", "rank", "answer_list", "k", "beams", "max_length", "min_length"),
               "itm": ("text", "texts"), "embed": ("text", "texts"),
               "classify": ("labels", "labels_file", "template", "k", "rerank", "truth")}
FILE_OPTIONS = ("questions", "answer_list", "texts", "labels_file", "truth")
FIELDS = {"caption": ["image", "caption"], "answer": ["image", "question", "answer"],
          "itm": ["image", "text", "itm", "itc"], "classify": ["image", "labels", "scores", "label"],
          "search": ["query", "rank", "image", "score", "itc"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    one_model = argparse.ArgumentParser(add_help=False)  # what loads a model (every command)
    one_model.add_argument("--checkpoint", help="original .pth, our .safetensors, a training output folder or its "
                                                "checkpoint_latest.pt, or a transformers directory (none: random "
                                                "weights)")
    one_model.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                           help="model options (see blip.ModelConfig), e.g. vit=large image_size=480")
    one_model.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    prec = one_model.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="bfloat16 weights and compute")
    prec.add_argument("--fp16", action="store_true", help="float16 autocast")
    one_model.add_argument("-v", "--verbose", action="store_true", help="log what the checkpoint loader did")
    model = argparse.ArgumentParser(add_help=False, parents=[one_model])  # ... and runs it over a collection
    model.add_argument("--batch-size", type=int, default=8)
    model.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (0: in-process)")
    model.add_argument("-o", "--output", help="stream rows to this .jsonl or .csv (resumable)")
    model.add_argument("--overwrite", action="store_true",
                       help="move an existing output (and its summary) aside to STEM.old-TIME.EXT and start afresh "
                            "(without it, an output of another request is refused)")
    model.add_argument("--json", action="store_true", help="printed rows: one JSON object per line")
    model.add_argument("--no-progress", action="store_true", help="no progress bar")
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("images", nargs="+", metavar="SOURCE",
                        help="image files, folders, globs, a .txt of paths, a .json annotation file, .tar shards")
    itc = argparse.ArgumentParser(add_help=False)
    itc.add_argument("--task", choices=ITC_TASKS,
                     help="the model class the checkpoint is loaded into (itm: [CLS] first for ITM; "
                          "retrieval/pretrain: [ENC] first); default: the task the checkpoint names, else itm")

    def own_task(task):  # caption/answer: --task only to load a checkpoint of another task as this one
        one = argparse.ArgumentParser(add_help=False)
        one.add_argument("--task", choices=[task], help=f"load a checkpoint saved as another task as a {task} "
                                                        f"model anyway (its weights must fit)")
        return one
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("caption", parents=[images, model, own_task("caption")], help="caption images (beam search or nucleus sampling)")
    c.add_argument("--beams", type=int, default=3)
    c.add_argument("--max-length", type=int, default=20, help="tokens, the prompt's included")
    c.add_argument("--min-length", type=int, default=5)
    c.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--num-captions", type=int, default=1, help="captions per image (with --sample)")
    c.add_argument("--repetition-penalty", type=float,
                   help="default 1.0 for beam search, 1.1 for sampling (the original's)")
    c.add_argument("--prompt", help="default: the model's ('a picture of ')")
    c.add_argument("--seed", type=int, default=0, help="sampling seed")

    a = sub.add_parser("answer", parents=[images, model, own_task("vqa")], help="answer questions about images (VQA)")
    q = a.add_mutually_exclusive_group(required=True)
    q.add_argument("--question", help="one question for every image")
    q.add_argument("--questions", help="per-image questions: JSON {image: question} / [{image, question}] or CSV")
    a.add_argument("--rank", action="store_true", help="rank --answer-list instead of generating")
    a.add_argument("--answer-list", help="JSON list of answers (answer_list.json) or a text file, one a line")
    a.add_argument("--k", type=int, default=128, help="answers re-ranked in full (rank mode)")
    a.add_argument("--beams", type=int, default=3)
    a.add_argument("--max-length", type=int, default=10)
    a.add_argument("--min-length", type=int, default=1)

    m = sub.add_parser("itm", parents=[images, model, itc], help="image-text matching probability and ITC similarity")
    m.add_argument("--text", action="append", help="repeat for several texts (every image x every text)")
    m.add_argument("--texts", help="a file of texts, one a line")

    e = sub.add_parser("embed", parents=[model, itc], help="ITC features of images and/or texts to one file")
    e.add_argument("images", nargs="*", metavar="SOURCE")
    e.add_argument("--text", action="append", help="texts to embed too (repeat)")
    e.add_argument("--texts", help="a file of texts to embed, one a line")

    s = sub.add_parser("search", parents=[model, itc], help="text queries against an embedded gallery")
    s.add_argument("--gallery", required=True, help="the output of `blip embed` (.safetensors or .npy)")
    s.add_argument("--query", action="append", help="repeat for several queries")
    s.add_argument("--queries", help="a file of queries, one a line")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--rerank", type=int, default=0, help="re-rank the top N by ITM (reads those images)")
    s.add_argument("--faiss", action="store_true", help="use FAISS (pip install faiss-cpu); by default it is "
                                                        "used when installed and the gallery is over 100,000 images")

    k = sub.add_parser("classify", parents=[images, model, itc], help="zero-shot classification")
    k.add_argument("--labels", help="comma-separated label names (default: the class sub-folders' names)")
    k.add_argument("--labels-file", help="label names, one a line")
    k.add_argument("--template", action="append", help="prompt template with {} (repeat; default: "
                                                       "'a picture of a {}.' and 'a photo of a {}.')")
    k.add_argument("--k", type=int, default=5, help="labels per image")
    k.add_argument("--rerank", type=int, default=0, help="re-rank the top N labels by ITM")
    k.add_argument("--truth", help="CSV `image,label` of true labels (for accuracy)")

    x = sub.add_parser("explain", parents=[one_model, itc], help="Grad-CAM: where each word of a text is in an "
                                                                 "image (one overlay PNG per word)")
    x.add_argument("image", metavar="IMAGE")
    x.add_argument("--text", required=True)
    x.add_argument("-o", "--output", required=True, help="folder for NN_word.png, text.png and gradcam.json")
    x.add_argument("--overwrite", action="store_true", help="a folder holding an earlier explanation is moved aside")
    x.add_argument("--layer", type=int, help="cross-attention layer of the ITM text encoder (0-based; default: "
                                             "two thirds up, 8 of 12 for BLIP-base, never the last)")

    d = sub.add_parser("demo", parents=[one_model], help="a web demo in the browser (pip install -r "
                                                         "requirements-demo.txt): caption, VQA, ITM + Grad-CAM, "
                                                         "search")
    d.add_argument("--caption-checkpoint", help="the caption tab's model (default: --checkpoint as a caption model)")
    d.add_argument("--vqa-checkpoint", help="the VQA tab's model (default: --checkpoint as a VQA model)")
    d.add_argument("--itm-checkpoint", help="the matching and search tabs' model (default: --checkpoint)")
    d.add_argument("--gallery", help="the search tab's gallery: the output of `blip embed` by the matching model")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--concurrency", type=int, default=2, help="requests run at once; the rest wait in a queue")
    d.add_argument("--max-pixels", type=int, default=40_000_000, help="larger uploads are refused")
    return p


def read_answer_list(path) -> list[str]:
    text = Path(path).read_text()
    try:
        answers = json.loads(text)
    except json.JSONDecodeError:
        answers = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(answers, list) or not answers or not all(isinstance(x, str) for x in answers):
        raise ValueError(f"{path}: expected a non-empty JSON list of strings or one answer a line")
    return answers


def read_lines(path) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message on bad input, or when no image
    could be read at all)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "answer" and args.rank != bool(args.answer_list):
        parser.error("--rank and --answer-list go together")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import one_line, user_errors
    try:
        return run(args)
    except user_errors() as e:
        print(one_line(e), file=sys.stderr)
        return 2


def _print_row(args, r):
    if args.json:
        print(json.dumps(r, ensure_ascii=False), flush=True)
    elif args.command == "caption":
        print(f"{r['image']}\t{r['caption'] if 'caption' in r else ' | '.join(r['captions'])}", flush=True)
    elif args.command == "answer":
        print(f"{r['image']}\t{r['answer']}", flush=True)
    elif args.command == "itm":
        print(f"{r['image']}\t{r['text']}\titm={r['itm']:.4f}\titc={r['itc']:.4f}", flush=True)
    elif args.command == "classify":
        tops = ", ".join(f"{label} {s:.3f}" for label, s in zip(r["labels"], r["scores"]))
        print(f"{r['image']}\t{tops}", flush=True)
    elif args.command == "search":
        print(f"{r['query']}\t{r['rank']}\t{r['image']}\t{r['score']:.4f}", flush=True)


def run(args) -> int:
    import torch

    from . import distributed as dist
    from . import inference as inf

    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    if args.checkpoint is not None:  # a training folder: the weights file it holds, named in every message
        from .models.checkpoint import resolve_checkpoint
        args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if not getattr(args, "output", None) and args.command != "search":
            raise ValueError("under torchrun give --output: the ranks' parts are merged into it")
        _, _, _, device = dist.init_distributed(args.device)
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but CUDA is not available")
    if args.command == "explain":
        return _explain(args, device, precision)
    if args.command == "demo":
        from .inference.demo import serve
        return serve(args, device, precision)
    try:
        return _run(args, device, precision, dist, inf)
    finally:
        dist.cleanup()


def request_of(args, model, precision) -> dict:
    """What every row of an output depends on: the command, the model (task, checkpoint file, --set), precision
    and the command's row options (files by identity). Kept in the output's side file; see stream_to_file."""
    from .models.checkpoint import file_identity
    req = {"command": args.command, "task": model.task,
           "checkpoint": None if args.checkpoint is None else file_identity(args.checkpoint),
           "set": list(args.set), "precision": precision}
    for opt in ROW_OPTIONS.get(args.command, ()):
        value = getattr(args, opt)
        req[opt] = file_identity(value) if opt in FILE_OPTIONS and value else value
    return req


def _overwrite(args, inf, dist):
    """--overwrite: rank 0 moves the earlier output aside before any rank reads what it holds."""
    if args.output and args.overwrite:
        if dist.is_main():
            aside = inf.outputs.move_output_aside(args.output)
            if aside:
                print(f"--overwrite: the earlier {args.output} moved aside to {aside}", file=sys.stderr)
        dist.barrier()


def _texts(args) -> list[str] | None:
    texts = list(args.text or [])
    if getattr(args, "texts", None):
        texts += read_lines(args.texts)
    return texts or None


def _run(args, device, precision, dist, inf) -> int:
    from .data.tokenizer import pre_caption, pre_question
    common = dict(precision=precision, workers=args.workers)
    settings = {"precision": precision, "device": device.type}
    if args.command == "search":
        return _search(args, device, common, dist, inf)
    items = inf.collect(args.images) if args.images else []
    text_field, clean, extra = None, None, None
    if args.command == "caption":
        model = load(model_task(args), args, device)
        rows_of = lambda its, bad: inf.caption(  # noqa: E731
            model, its, batch_size=args.batch_size, num_beams=args.beams, max_length=args.max_length,
            min_length=args.min_length, repetition_penalty=args.repetition_penalty, sample=args.sample,
            top_p=args.top_p, prompt=args.prompt, num_captions=args.num_captions, seed=args.seed, unreadable=bad,
            **common)
        fields = ["image", "caption"] if args.num_captions == 1 else ["image", "captions"]
        if args.num_captions > 1 and not args.sample:
            raise ValueError("--num-captions > 1 needs --sample (beam search gives one caption per image)")
    elif args.command == "answer":
        answers = read_answer_list(args.answer_list) if args.rank else None
        if args.questions:
            asked = inf.with_texts(items, args.questions)
            listed = {it.id for it in asked}
            without = [it.id for it in items if it.id not in listed]
            if without:  # named, not skipped in silence
                print(f"warning: {args.questions} has no question for {len(without)} of the {len(items)} images "
                      f"(not answered): {', '.join(without[:10])}{' ...' if len(without) > 10 else ''}",
                      file=sys.stderr)
            items, settings["without_question"] = asked, without
            text_field, clean = "question", pre_question
        model = load(model_task(args), args, device)
        rows_of = lambda its, bad: inf.answer(  # noqa: E731
            model, its, args.question, batch_size=args.batch_size, method="rank" if args.rank else "generate",
            answer_list=answers, k=args.k, num_beams=args.beams, max_length=args.max_length,
            min_length=args.min_length, unreadable=bad, **common)
        fields = FIELDS["answer"]
    elif args.command == "itm":
        texts = _texts(args)
        if texts is None:
            text_field, clean = "text", pre_caption
            if not any(it.text for it in items):
                raise ValueError("itm needs --text (every image x every text) or a JSON annotation file of pairs")
        model = load(model_task(args), args, device)
        rows_of = lambda its, bad: inf.itm(model, its, texts, batch_size=args.batch_size,  # noqa: E731
                                           unreadable=bad, **common)
        fields = FIELDS["itm"]
    elif args.command == "embed":
        return _embed(args, device, common, dist, inf, items)
    else:  # classify
        labels = _labels(args, items, inf)
        model = load(model_task(args), args, device)
        templates = tuple(args.template) if args.template else inf.DEFAULT_TEMPLATES
        rows_of = lambda its, bad: inf.classify(  # noqa: E731
            model, its, labels, templates=templates, k=args.k, rerank=args.rerank, batch_size=args.batch_size,
            unreadable=bad, **common)
        fields = FIELDS["classify"]

        def extra(rows):
            k = min(args.k, len(labels))  # a row holds at most one entry per label
            acc = inf.accuracy(rows, k)
            return {} if not acc else {"accuracy_n": acc["n"], "accuracy_top1": acc["top1"],
                                       "accuracy_topk": acc[f"top{k}"], "k": k}

    if not items:
        raise ValueError(f"no images in {args.images}")
    if args.output:
        _overwrite(args, inf, dist)
        summary = inf.stream_to_file(rows_of, items, args.output, fields, text_field=text_field, clean=clean,
                                     progress=not args.no_progress, extra_summary=extra, settings=settings,
                                     request=request_of(args, model, precision))
        inf.print_summary(summary)
        if summary is not None and summary["done_now"] == 0 and summary["already_done"] == 0 and summary["unreadable"]:
            return 2
        return 0
    bad, rows = [], []
    for row in rows_of(items, bad):
        _print_row(args, row)
        rows.append(row) if extra is not None else None
    for it, why in bad:
        print(f"unreadable: {why}", file=sys.stderr)
    if extra is not None:
        for k, v in extra(rows).items():
            print(f"{k}: {v}", file=sys.stderr)
    if bad:
        done = len(items) - len(bad)
        print(f"{done} of {len(items)} images done, {len(bad)} unreadable (listed above)", file=sys.stderr)
        if done == 0:
            return 2
    return 0


def _labels(args, items, inf) -> list[str]:
    if args.truth:
        truth = inf.read_labels_csv(args.truth)
        items[:] = [inf.Item(it.id, it.tar, it.offset, it.size, truth.get(it.id, truth.get(os.path.abspath(it.id), it.label)), it.text) for it in items]
    if args.labels:
        return [x.strip() for x in args.labels.split(",") if x.strip()]
    if args.labels_file:
        return read_lines(args.labels_file)
    found = sorted({it.label for it in items if it.label is not None})
    if not found:
        raise ValueError("classify needs --labels, --labels-file, class sub-folders or --truth")
    return found


def _embed(args, device, common, dist, inf, items) -> int:
    texts = _texts(args)
    if not args.output:
        raise ValueError("embed needs --output FILE.safetensors (or FILE.npy)")
    if not items and texts is None:
        raise ValueError("embed needs image sources and/or --text/--texts")
    model = load(model_task(args), args, device)
    rows_of = lambda its, bad: inf.embed_images(model, its, batch_size=args.batch_size,  # noqa: E731
                                                unreadable=bad, **common)
    texts_rows = None if texts is None else inf.embed_texts(model, texts, precision=common["precision"])
    _overwrite(args, inf, dist)
    summary = inf.embed_to_file(rows_of, items, args.output, texts_rows=texts_rows, progress=not args.no_progress,
                                request=request_of(args, model, common["precision"]),
                                model=model_identity(model, args))
    inf.print_summary(summary, "embedded")
    return 0


def _search(args, device, common, dist, inf) -> int:
    queries = list(args.query or []) + (read_lines(args.queries) if args.queries else [])
    if not queries:
        raise ValueError("search needs --query or --queries")
    gallery = inf.read_embeddings(args.gallery)
    if "image_embeds" not in gallery:
        raise ValueError(f"{args.gallery}: holds no image embeddings")
    model = load(model_task(args), args, device)
    check_gallery(gallery, args.gallery, model, args)
    bad = []
    rows = inf.search(model, gallery["image_ids"], gallery["image_embeds"].to(device), queries, k=args.k,
                      rerank=args.rerank, use_faiss=True if args.faiss else None, unreadable=bad, **common)
    if dist.is_main():
        writer = None
        if args.output:
            if os.path.exists(args.output):
                os.remove(args.output)  # a search is quick: rerun whole
            writer = inf.outputs.RowWriter(args.output, FIELDS["search"])
        for r in rows:
            writer.write([r]) if writer else _print_row(args, r)
        if writer:
            writer.close()
        for it, why in bad:
            print(f"unreadable: {why}", file=sys.stderr)
    return 0


def _explain(args, device, precision) -> int:
    from .inference.explain import explain_to_folder
    from .precision import autocast
    model = load(model_task(args), args, device)
    with autocast(device, precision):
        report = explain_to_folder(model, args.image, args.text, args.output, layer=args.layer,
                                   overwrite=args.overwrite)
    peaks = ", ".join(f"{w['word']} ({w['peak']['x']:.0f},{w['peak']['y']:.0f})" for w in report["words"])
    print(f"itm={report['itm']:.4f} layer {report['layer']}: {peaks}; {len(report['words']) + 1} overlays and "
          f"gradcam.json in {args.output}")
    return 0


def main_exit():
    """The `blip` console script."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
