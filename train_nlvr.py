"""NLVR2 fine-tuning: is the sentence true of the image pair? Accuracy on dev and test-P after every epoch.

    python train_nlvr.py --config configs/shapes_nlvr.yaml                           # offline: the shapes world
    torchrun --nproc_per_node=8 train_nlvr.py --config configs/nlvr.yaml
    python train_nlvr.py --config configs/nlvr.yaml --evaluate                       # the `pretrained` weights
"""
from __future__ import annotations

from blip.evaluation import evaluate_nlvr
from blip.run import ann_file, finetune, start_run, train_transform_for
from blip.tasks import NLVRObjective, build_model
from data.datasets import NLVRDataset
from data.transforms import test_transform


def main(argv=None):
    args, cfg, device, out = start_run("BLIP NLVR2 fine-tuning", argv)
    model = build_model("nlvr", cfg).to(device)
    train_set = lambda: NLVRDataset(ann_file(cfg, "nlvr", "train"), cfg.image_root, train_transform_for(cfg),
                                    train=True)
    evaluations = {}
    for split in ("dev", "test"):
        data = NLVRDataset(ann_file(cfg, "nlvr", split), cfg.image_root, test_transform(cfg.image_size), train=False)
        evaluations[split] = lambda m, d=data: evaluate_nlvr(m, d, cfg.test_batch_size, cfg.num_workers)
    return finetune(args, cfg, out, model, NLVRObjective(), train_set, evaluations,
                    best=lambda m: m["dev_acc"], device=device)


if __name__ == "__main__":
    main()
