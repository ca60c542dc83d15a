"""Image-text retrieval fine-tuning (COCO / Flickr30k Karpathy splits): ITC with the image-index queue + ITM on
hard negatives; ITC top-k + ITM re-rank recall on val and test after every epoch.

    python train_retrieval.py --config configs/shapes_retrieval.yaml                 # offline: the shapes world
    torchrun --nproc_per_node=8 train_retrieval.py --config configs/retrieval_coco.yaml
    python train_retrieval.py --config configs/retrieval_flickr.yaml --evaluate      # the `pretrained` weights
"""
from __future__ import annotations

from blip.evaluation import evaluate_retrieval
from blip.run import ann_file, finetune, start_run, train_transform_for
from blip.tasks import RetrievalObjective, build_model
from data.datasets import RetrievalEvalDataset, RetrievalTrainDataset
from data.transforms import test_transform


def main(argv=None):
    args, cfg, device, out = start_run("BLIP retrieval fine-tuning", argv)
    kind = cfg.dataset  # coco | flickr | shapes
    model = build_model("retrieval", cfg).to(device)
    train_set = lambda: RetrievalTrainDataset(ann_file(cfg, kind, "train"), cfg.image_root, train_transform_for(cfg),
                                              max_words=cfg.max_words)
    evaluations = {}
    for split in ("val", "test"):
        gallery = RetrievalEvalDataset(ann_file(cfg, kind, split), cfg.image_root, test_transform(cfg.image_size),
                                       max_words=cfg.max_words)
        evaluations[split] = lambda m, g=gallery: evaluate_retrieval(m, g, k_test=cfg.k_test,
                                                                     batch_size=cfg.test_batch_size,
                                                                     num_workers=cfg.num_workers)
    return finetune(args, cfg, out, model, RetrievalObjective(cfg.alpha), train_set, evaluations,
                    best=lambda m: m["val_r_mean"], device=device)


if __name__ == "__main__":
    main()
