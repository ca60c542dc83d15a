"""`blip demo`: BLIP in the browser (gradio) — caption, VQA, image-text matching with a Grad-CAM map per word, and
text->image search over a gallery made by `blip embed`.

    pip install -r requirements-demo.txt
    blip demo --checkpoint output/shapes_main --gallery gallery.safetensors      # http://127.0.0.1:7860

`--checkpoint` serves every tab whose model it loads as (a pretraining checkpoint: all of them);
`--caption-checkpoint`, `--vqa-checkpoint` and `--itm-checkpoint` give a tab its own. A tab without a model says why.
Offline: no analytics, no share link, system fonts (no CDN), bound to 127.0.0.1 unless --host says otherwise.
Requests wait in gradio's queue and `--concurrency` run at once, so a crowd cannot exhaust memory. An upload is
read by the command line's rules (blip.data.datasets.read_image) after a pixel-count check: a broken or oversized file
gets a one-line message on the page, never a traceback, and the server stays up. gradio is imported only here.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path

import torch

log = logging.getLogger(__name__)
TABS = ("caption", "vqa", "itm")  # the model each tab needs (itm: matching and search)
OUTBOX_SECONDS = 600  # an output image file lives this long (gradio copies it into its own cache when it answers)


def read_upload(path, max_pixels: int):
    """The uploaded file as RGB, or ValueError naming it: nothing uploaded, too many pixels, unreadable."""
    from PIL import Image

    from ..data.datasets import read_image_or_refuse
    if not path:
        raise ValueError("upload an image first")
    name = Path(path).name  # not gradio's cache folder
    try:
        with Image.open(path) as im:  # the header only: refuse before decoding
            width, height = im.size
    except Exception:
        width = height = 0  # read_image names what is wrong with it
    if width * height > max_pixels:
        raise ValueError(f"{name}: {width}x{height} pixels, over this demo's limit of {max_pixels:,} (--max-pixels)")
    try:
        return read_image_or_refuse(path, name=name)
    except ValueError as e:  # PIL's own text repeats the full path: the name is enough on a page
        raise ValueError(str(e).replace(str(path), name)) from None


def load_models(args, device) -> dict:
    """{tab: model, or the reason it has none}. A tab's own checkpoint that does not load is an error; --checkpoint
    serves the tabs it fits and the others say why."""
    from .loading import ITC_TASKS, load
    from ..models.checkpoint import read_metadata, resolve_checkpoint
    from ..errors import one_line, user_errors
    own = {"caption": args.caption_checkpoint, "vqa": args.vqa_checkpoint, "itm": args.itm_checkpoint}
    anything = args.checkpoint is not None or any(own.values())
    models = {}
    for tab in TABS:
        checkpoint = own[tab] or args.checkpoint
        if checkpoint is None and anything:  # with nothing at all given every tab runs random weights (warned)
            models[tab] = f"no model: give --{tab}-checkpoint or --checkpoint"
            continue
        checkpoint = None if checkpoint is None else str(resolve_checkpoint(checkpoint))
        task = tab
        if tab == "itm" and checkpoint is not None:
            stored = read_metadata(checkpoint).get("task")
            task = stored if stored in ITC_TASKS else "itm"
        try:
            models[tab] = load(task, Namespace(checkpoint=checkpoint, set=args.set, bf16=args.bf16), device)
        except user_errors() as e:
            if own[tab]:
                raise
            models[tab] = f"no model: {checkpoint} does not load as a {tab!r} model ({one_line(e).removeprefix('error: ')})"
    return models


class Demo:
    """The handlers behind the page: plain functions of the inputs, each returning its outputs and a status line."""

    def __init__(self, models: dict, device, precision: str, max_pixels: int, gallery=None):
        self.models, self.device, self.precision, self.max_pixels = models, device, precision, max_pixels
        self.gallery = gallery  # (image ids, features) or None
        self.outbox = tempfile.TemporaryDirectory(prefix="blip-demo-")  # the images the page shows, one file each
        # a CUDA decode step is captured once per shape and replayed (blip.models.generation): one request at a time there
        self.decode_lock = threading.Lock() if torch.device(device).type == "cuda" else nullcontext()

    def model(self, tab):
        model = self.models[tab]
        if isinstance(model, str):
            raise ValueError(model)
        return model

    def pixels(self, path, tab):
        from ..data.images import load_images
        image = read_upload(path, self.max_pixels)
        model = self.model(tab)
        return image, load_images([image], model.cfg.image_size, self.device).to(next(model.parameters()).dtype)

    def shown(self, image) -> str:
        """An output image as a file of its own. gradio rewrites its cached copy of a PIL output in place each time
        a request makes the same pixels, so a concurrent download could read it half-written (seen: 1 in 4 runs of
        20 concurrent requests); a path is copied into gradio's cache once, atomically."""
        now = time.time()  # gradio has copied older ones into its cache: a long-running page keeps its disk bounded
        for old in Path(self.outbox.name).glob("*.png"):
            if now - old.stat().st_mtime > OUTBOX_SECONDS:
                old.unlink(missing_ok=True)
        fd, path = tempfile.mkstemp(suffix=".png", dir=self.outbox.name)
        os.close(fd)
        image.save(path)
        return path

    def autocast(self):
        from ..precision import autocast
        return autocast(self.device, self.precision)

    def preview(self, path):
        from .explain import display_copy
        return (self.shown(display_copy(read_upload(path, self.max_pixels), 512)),)

    def caption(self, path, method, beams, top_p):
        _, x = self.pixels(path, "caption")
        sample = method == "nucleus sampling"
        with torch.inference_mode(), self.autocast(), self.decode_lock:
            generator = torch.Generator(self.device).manual_seed(0) if sample else None
            (text,) = self.models["caption"].generate(x, num_beams=int(beams), sample=sample, top_p=float(top_p),
                                                      repetition_penalty=1.1 if sample else 1.0, generator=generator)
        return (text,)

    def answer(self, path, question):
        from ..data.tokenizer import pre_question
        if not question or not question.strip():
            raise ValueError("ask a question")
        _, x = self.pixels(path, "vqa")
        with torch.inference_mode(), self.autocast(), self.decode_lock:
            (text,) = self.models["vqa"].answer(x, [pre_question(question)])
        return (text,)

    def match(self, path, text):
        from .explain import display_copy, itm_gradcam, overlay
        from ..data.tokenizer import pre_caption
        if not text or not text.strip():
            raise ValueError("give a text to match")
        image, x = self.pixels(path, "itm")
        model = self.models["itm"]
        with torch.inference_mode(), self.autocast():
            _, image_feat = model.image_features(x)
            itc = float(image_feat.float() @ model.text_features([pre_caption(text)])[2].float().t())
        with self.autocast():
            cam = itm_gradcam(model, x, text)
        shown = display_copy(image, 384)
        maps = [(self.shown(overlay(shown, cam.text_map)), "whole text")]
        maps += [(self.shown(overlay(shown, heat)), word) for word, heat in zip(cam.words, cam.word_maps)]
        return f"match probability {cam.itm:.3f}, ITC similarity {itc:.3f} (Grad-CAM layer {cam.layer})", maps

    def search(self, query, k):
        from .predict import search
        from ..data.datasets import UnreadableImage, read_image
        if self.gallery is None:
            raise ValueError("no gallery: start the demo with --gallery (made by `blip embed`)")
        if not query or not query.strip():
            raise ValueError("give a query")
        ids, feats = self.gallery
        found = []
        with torch.inference_mode():
            rows = list(search(self.model("itm"), ids, feats, [query], k=int(k), workers=0,
                                         precision=self.precision))
        for r in rows:
            try:
                image = read_image(r["image"])
            except UnreadableImage:  # moved or deleted since it was embedded: named, not shown
                image = None
            if image is not None:
                image.thumbnail((256, 256))
            found.append((None if image is None else self.shown(image), f"{r['rank']}. {Path(r['image']).name}  {r['score']:.3f}"))
        return [(im, label) for im, label in found if im is not None], "\n".join(label for _, label in found)


def guarded(handler, n_outputs: int):
    """`handler`'s outputs and an empty status, or empty outputs and its one-line error: bad input gets a message on
    the page; a program error is logged here with its traceback and named there."""
    from ..errors import one_line, user_errors

    def run(*inputs):
        try:
            return (*handler(*inputs), "")
        except user_errors() as e:
            return (*[None] * n_outputs, one_line(e))
        except Exception as e:
            log.exception("demo request failed")
            return (*[None] * n_outputs, f"error: internal error ({type(e).__name__}), logged on the server")
    return run


def build(demo: Demo, gr):
    """The page: one upload shared by the tabs, then caption / VQA / matching with Grad-CAM / search."""
    def status(name):
        return gr.Markdown(elem_id=f"{name}-status")

    # delete_cache: gradio's copies of uploads and outputs older than an hour go, checked every 10 minutes
    with gr.Blocks(title="BLIP demo", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown("## BLIP: caption, ask, match (Grad-CAM per word) and search")
        with gr.Row():
            upload = gr.File(label="Image", type="filepath", elem_id="upload")
            preview = gr.Image(label="Preview", type="pil", interactive=False, height=256, elem_id="preview")
        upload_status = status("upload")
        upload.change(guarded(demo.preview, 1), upload, [preview, upload_status])
        with gr.Tab("Caption"):
            with gr.Row():
                method = gr.Radio(["beam search", "nucleus sampling"], value="beam search", label="Decoding")
                beams = gr.Slider(1, 5, value=3, step=1, label="Beams")
                top_p = gr.Slider(0.1, 1.0, value=0.9, label="top-p (sampling)")
            caption = gr.Textbox(label="Caption", elem_id="caption")
            gr.Button("Caption", elem_id="caption-button").click(
                guarded(demo.caption, 1), [upload, method, beams, top_p], [caption, status("caption")],
                api_name="caption")
        with gr.Tab("VQA"):
            question = gr.Textbox(label="Question", elem_id="question")
            answer = gr.Textbox(label="Answer", elem_id="answer")
            gr.Button("Answer", elem_id="answer-button").click(
                guarded(demo.answer, 1), [upload, question], [answer, status("answer")], api_name="answer")
        with gr.Tab("Match + Grad-CAM"):
            text = gr.Textbox(label="Text", elem_id="match-text")
            score = gr.Textbox(label="Match", elem_id="match-score")
            maps = gr.Gallery(label="Where each word is (Grad-CAM)", columns=4, elem_id="gradcam")
            gr.Button("Match", elem_id="match-button").click(
                guarded(demo.match, 2), [upload, text], [score, maps, status("match")], api_name="match")
        with gr.Tab("Search"):
            query = gr.Textbox(label="Query", elem_id="query")
            k = gr.Slider(1, 20, value=5, step=1, label="Top k")
            found = gr.Gallery(label="Gallery images", columns=5, elem_id="search-results")
            ranks = gr.Textbox(label="Ranking", elem_id="search-ranking")
            gr.Button("Search", elem_id="search-button").click(
                guarded(demo.search, 2), [query, k], [found, ranks, status("search")], api_name="search")
        for tab, why in demo.models.items():
            if isinstance(why, str):
                gr.Markdown(f"*{tab} tab:* {why}")
    return page


def serve(args, device, precision) -> int:
    """`blip demo`: load the models, build the page, serve it until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("blip demo needs gradio: pip install -r requirements-demo.txt") from None
    if args.concurrency < 1:
        raise ValueError(f"--concurrency {args.concurrency}: at least 1")
    models = load_models(args, device)
    from ..data.tokenizer import get_tokenizer
    get_tokenizer()  # built before the first requests: transformers' lazy imports race when threads trigger them
    itm_checkpoint = args.itm_checkpoint or args.checkpoint
    gallery = None if args.gallery is None else load_gallery(args.gallery, models["itm"], itm_checkpoint, device)
    page = build(Demo(models, device, precision, args.max_pixels, gallery), gr)
    page.queue(default_concurrency_limit=args.concurrency)
    system_fonts = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                     font_mono=["ui-monospace", "monospace"])  # the default's come from a CDN
    page.launch(server_name=args.host, server_port=args.port, share=False, theme=system_fonts, ssr_mode=False,
                max_file_size="50mb", show_error=False, quiet=True, inbrowser=False)
    return 0


def load_gallery(path, model, checkpoint, device):
    """(image ids, features on `device`) of a `blip embed` output, refused when another model embedded it."""
    from .loading import check_gallery
    from . import read_embeddings
    if isinstance(model, str):
        raise ValueError(f"--gallery needs the matching model: {model}")
    gallery = read_embeddings(path)
    if "image_embeds" not in gallery:
        raise ValueError(f"{path}: holds no image embeddings")
    from ..models.checkpoint import resolve_checkpoint
    checkpoint = None if checkpoint is None else str(resolve_checkpoint(checkpoint))
    check_gallery(gallery, path, model, Namespace(checkpoint=checkpoint))
    return gallery["image_ids"], gallery["image_embeds"].to(device)
