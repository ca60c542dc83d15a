"""torchrun worker: train the tiny NLVR2 model a few steps and save its final weights (rank 0)."""
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__) + "/..")
import blip  # noqa: E402
from blip import distributed as dist  # noqa: E402
from blip.engine import fit  # noqa: E402
from blip.tasks import NLVRObjective, model_options  # noqa: E402
from tests._tiny import PairData, tiny_config  # noqa: E402


def all_rank_negatives(out_dir):
    """Pretraining and retrieval with ITM negatives drawn over both ranks' batches."""
    from blip.tasks import PretrainObjective, RetrievalObjective
    from tests._tiny import PairData as P
    _, _, _, device = dist.init_distributed("cpu")
    for task, objective in (("pretrain", PretrainObjective(0.4)), ("retrieval", RetrievalObjective(0.4))):
        cfg = tiny_config(task=task, batch_size=4, max_epoch=1, queue_size=16, negative_all_rank=True, seed=3)
        model = blip.load_model(task, **model_options(cfg))
        data = P(16) if task == "pretrain" else IndexedPairs(16)
        fit(model, objective, data, cfg, f"{out_dir}/{task}", device=device)
    dist.cleanup()


class IndexedPairs(PairData):
    def __getitem__(self, i):
        return (*super().__getitem__(i), i // 2)  # two captions per image index


def main(out_dir, batch):
    if batch == 0:
        return all_rank_negatives(out_dir)
    _, _, _, device = dist.init_distributed("cpu")
    cfg = tiny_config(task="nlvr", batch_size=batch, max_epoch=1, init_lr=1e-3, num_workers=0, seed=3)
    torch.manual_seed(0)
    model = blip.load_model("nlvr", **model_options(cfg))
    fit(model, NLVRObjective(), PairData(32, "nlvr"), cfg, out_dir, device=device)
    if dist.is_main():
        torch.save(model.state_dict(), f"{out_dir}/final.pt")
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
