"""torchrun worker: train the tiny NLVR2 model a few steps and save its final weights (rank 0)."""
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__) + "/..")
import blip  # noqa: E402
from blip import distributed as dist  # noqa: E402
from blip.engine import fit  # noqa: E402
from blip.tasks import NLVRObjective, model_options  # noqa: E402
from tests._tiny import PairData, tiny_config  # noqa: E402


def main(out_dir, batch):
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
