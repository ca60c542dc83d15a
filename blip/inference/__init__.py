"""Inference over whole collections: the functions yield results (notebooks), `stream_to_file` / `embed_to_file`
write them with resume, torchrun ranks and a summary (the `blip` command line is a thin layer over both).

    from blip import inference
    for row in inference.caption(model, "photos/"): ...
"""
from .inputs import Item, collect, image_batches, read_labels_csv, resolve, with_texts
from .outputs import read_rows
from .predict import (DEFAULT_TEMPLATES, accuracy, answer, caption, classify, embed_images, embed_texts, itm,
                      label_features, search, top_k)
from .stream import embed_to_file, print_summary, read_embeddings, stream_to_file, write_embeddings

__all__ = ["Item", "collect", "image_batches", "read_labels_csv", "resolve", "with_texts", "read_rows",
           "DEFAULT_TEMPLATES", "accuracy", "answer", "caption", "classify", "embed_images", "embed_texts", "itm",
           "label_features", "search", "top_k", "embed_to_file", "print_summary", "read_embeddings",
           "stream_to_file", "write_embeddings"]
