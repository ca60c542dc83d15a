"""Command line: caption images, answer questions about them, score image-text matches.

    python -m blip caption IMG... [--checkpoint PATH] [--beams 3 --max-length 20 --min-length 5]
                                  [--sample --top-p 0.9] [--prompt 'a picture of ']
    python -m blip answer IMG... --question "..." [--checkpoint PATH] [--rank --answer-list FILE]
    python -m blip itm IMG... --text "..." [--text "..."] [--checkpoint PATH]

Common: --set KEY=VALUE ... (model options, values read as YAML/JSON: `--set vit=large image_size=480`,
`--set 'med_config={"hidden_size": 256}'` or `--set med_config.hidden_size=256`), --device cuda|cpu
(default: cuda when available), --bf16 (bfloat16 autocast), --batch-size, --json (one JSON object per
line). Without --checkpoint the model has random weights (a warning says so): useful only offline, to try
the pipeline. Our .safetensors and transformers directories carry their model options; an original .pth
does not: give its sizes with --set (e.g. `--set vit=large` for model_large_caption.pth).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import nullcontext
from pathlib import Path

# The original's evaluation image sizes, used when neither --set nor the checkpoint gives one.
DEFAULT_IMAGE_SIZE = {"caption": 384, "itm": 384, "vqa": 480}
COMMAND_TASK = {"caption": "caption", "answer": "vqa", "itm": "itm"}


def parse_sets(items) -> dict:
    """['image_size=64', 'med_config.hidden_size=32', ...] -> model options (values parsed as YAML/JSON)."""
    from .config import parse_override
    out: dict = {}
    for item in items or []:
        key, value = parse_override(item)
        if key.startswith("med_config."):
            med = out.setdefault("med_config", {})
            if not isinstance(med, dict):
                raise ValueError(f"--set {item}: med_config is already a path ({med!r}), not a dict")
            med[key.split(".", 1)[1]] = value
        elif key == "med_config" and isinstance(out.get("med_config"), dict) and isinstance(value, dict):
            out["med_config"].update(value)
        else:
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blip", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("images", nargs="+", help="image files")
    common.add_argument("--checkpoint", help="original .pth, our .safetensors or a transformers directory "
                                             "(none: random weights)")
    common.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="model options (see blip.ModelConfig), e.g. vit=large image_size=480")
    common.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    common.add_argument("--bf16", action="store_true", help="run under bfloat16 autocast")
    common.add_argument("--batch-size", type=int, default=8)
    common.add_argument("--json", action="store_true", help="one JSON object per line")
    common.add_argument("-v", "--verbose", action="store_true", help="log what the checkpoint loader did")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("caption", parents=[common], help="caption images (beam search or nucleus sampling)")
    c.add_argument("--beams", type=int, default=3)
    c.add_argument("--max-length", type=int, default=20, help="tokens, the prompt's included")
    c.add_argument("--min-length", type=int, default=5)
    c.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--repetition-penalty", type=float,
                   help="default 1.0 for beam search, 1.1 for sampling (the original's)")
    c.add_argument("--prompt", help="default: the model's ('a picture of ')")
    c.add_argument("--seed", type=int, default=0, help="sampling seed")

    a = sub.add_parser("answer", parents=[common], help="answer a question about each image (VQA)")
    a.add_argument("--question", required=True)
    a.add_argument("--rank", action="store_true", help="rank --answer-list instead of generating")
    a.add_argument("--answer-list", help="JSON list of answers (answer_list.json) or a text file, one a line")
    a.add_argument("--k", type=int, default=128, help="answers re-ranked in full (rank mode)")
    a.add_argument("--beams", type=int, default=3)
    a.add_argument("--max-length", type=int, default=10)
    a.add_argument("--min-length", type=int, default=1)

    m = sub.add_parser("itm", parents=[common], help="image-text matching probability and ITC similarity")
    m.add_argument("--text", action="append", required=True, help="repeat for several texts")
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


def load(task: str, args):
    import torch

    from . import load_model
    from .checkpoint import read_metadata
    options = parse_sets(args.set)
    if args.checkpoint is None:
        print(f"warning: no --checkpoint given: the {task} model has RANDOM weights, its outputs mean nothing",
              file=sys.stderr)
    stored = args.checkpoint is not None and bool(read_metadata(args.checkpoint))  # carries its sizes
    if "image_size" not in options and not stored:
        options["image_size"] = DEFAULT_IMAGE_SIZE[task]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but CUDA is not available")
    model = load_model(task, args.checkpoint, **options).to(device)
    return model, device


def batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "answer" and args.rank != bool(args.answer_list):
        parser.error("--rank and --answer-list go together")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .checkpoint import CheckpointMismatchError
    try:
        rows = run(args)
    except (FileNotFoundError, ValueError, TypeError, CheckpointMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        if args.json:
            print(json.dumps(r))
        elif args.command == "caption":
            print(f"{r['image']}\t{r['caption']}")
        elif args.command == "answer":
            print(f"{r['image']}\t{r['answer']}")
        else:
            print(f"{r['image']}\t{r['text']}\titm={r['itm']:.4f}\titc={r['itc']:.4f}")
    return 0


def run(args) -> list[dict]:
    """The command's results, one dict per output line."""
    import torch

    from . import load_images
    from .tokenizer import pre_caption, pre_question

    answers = read_answer_list(args.answer_list) if args.command == "answer" and args.rank else None
    model, device = load(COMMAND_TASK[args.command], args)
    size = model.cfg.image_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    rows = []
    generator = torch.Generator(device).manual_seed(args.seed) if args.command == "caption" else None
    for paths in batches(args.images, args.batch_size):
        x = load_images(paths, size, device=device)
        with torch.inference_mode(), autocast:
            if args.command == "caption":
                rep = args.repetition_penalty
                rep = (1.1 if args.sample else 1.0) if rep is None else rep
                caps = model.generate(x, num_beams=args.beams, max_length=args.max_length,
                                      min_length=args.min_length, repetition_penalty=rep, sample=args.sample,
                                      top_p=args.top_p, prompt=args.prompt, generator=generator)
                rows += [{"image": str(p), "caption": c} for p, c in zip(paths, caps)]
            elif args.command == "answer":
                q = pre_question(args.question)
                out = model.answer(x, [q] * len(paths), method="rank" if args.rank else "generate",
                                   answer_list=answers, k=args.k, num_beams=args.beams,
                                   max_length=args.max_length, min_length=args.min_length)
                rows += [{"image": str(p), "question": q, "answer": a} for p, a in zip(paths, out)]
            else:
                texts = [pre_caption(t) for t in args.text]
                n = len(texts)
                prob = model.itm_score(x.repeat_interleave(n, 0), texts * len(paths)).view(len(paths), n)
                sim = model.itc_similarity(x, texts).float()
                rows += [{"image": str(p), "text": t, "itm": prob[i, j].item(), "itc": sim[i, j].item()}
                         for i, p in enumerate(paths) for j, t in enumerate(texts)]
    return rows


if __name__ == "__main__":
    sys.exit(main())
