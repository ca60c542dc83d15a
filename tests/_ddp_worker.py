"""torchrun worker for the engine tests: `nlvr OUT BATCH [compile]` trains the tiny NLVR2 model (compiled: DDP under
torch.compile) and saves its final weights;
`negatives OUT 0` trains with ITM negatives drawn over both ranks; `ranklog OUT 2` logs a loss that differs per
rank and micro-step; `neighbours OUT BATCH DATA` fine-tunes retrieval with nearest-neighbour images on the files
of DATA (tests/test_neighbours.py); `streams OUT BATCH` trains the toy three-stream task (tests/test_streams.py)."""
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__) + "/..")
from blip import distributed as dist  # noqa: E402
from blip.training.engine import fit  # noqa: E402
from blip.tasks import NLVRTask, PretrainTask, RetrievalTask  # noqa: E402
from tests._tiny import PairData, StreamsTask, tiny_config, tiny_model  # noqa: E402


def nlvr(out_dir, batch, device, compile=""):
    cfg = tiny_config(task="nlvr", batch_size=batch, max_epoch=1, init_lr=1e-3, num_workers=0, seed=3,
                      compile=compile == "compile")
    model = tiny_model(NLVRTask, cfg)
    fit(NLVRTask(cfg), model, PairData(32, "nlvr"), out_dir, device=device)
    if dist.is_main():
        torch.save(model.state_dict(), f"{out_dir}/final.pt")


def negatives(out_dir, batch, device):
    """Pretraining and retrieval with ITM negatives drawn over both ranks' batches."""
    for task_cls, kind in ((PretrainTask, "pretrain"), (RetrievalTask, "retrieval")):
        cfg = tiny_config(task=kind, batch_size=4, max_epoch=1, queue_size=16, negative_all_rank=True, seed=3)
        fit(task_cls(cfg), tiny_model(task_cls, cfg), PairData(16, kind), f"{out_dir}/{kind}", device=device)


def neighbours(out_dir, batch, device, data_dir):
    from blip.tasks.retrieval import RetrievalTrainDataset
    from blip.data.transforms import test_transform
    cfg = tiny_config("hard_negatives={images: 2}", task="retrieval", batch_size=batch, max_epoch=1, queue_size=8,
                      seed=2)
    data = RetrievalTrainDataset(f"{data_dir}/karpathy_train.json", data_dir, test_transform(32))
    fit(RetrievalTask(cfg), tiny_model(RetrievalTask, cfg), data, out_dir, device=device)


class RankLoss(NLVRTask):
    """NLVR2's loss, plus a logged term 10·rank + micro-step index (weight 0: it trains nothing)."""
    micro = 0

    def losses(self, forward, batch, progress):
        out = super().losses(forward, batch, progress)
        out["loss_rank"] = out["loss_nlvr"].detach() * 0 + 10 * dist.get_rank() + self.micro % 2
        self.micro += 1
        return out


def ranklog(out_dir, accum, device):
    cfg = tiny_config("loss_weights={loss_rank: 0.0}", task="nlvr", batch_size=2, grad_accum_steps=accum,
                      max_epoch=1, log_every=1, seed=3)
    fit(RankLoss(cfg), tiny_model(NLVRTask, cfg), PairData(16, "nlvr"), out_dir, device=device)


def streams(out_dir, batch, device):
    """Three streams of different lengths and batch sizes (per rank: `batch` pairs and texts, 1.5 x images)."""
    cfg = tiny_config("task=streams", f"batch_size_streams={{text: {batch}, images: {3 * batch // 2}}}", batch_size=batch,
                      max_epoch=2, init_lr=1e-2, warmup_steps=0, num_workers=0, seed=3)
    task = StreamsTask(cfg, {"pairs": 16, "text": 8, "images": 48})
    model = task.build_model()
    fit(task, model, task.train_data(model), out_dir, device=device)
    if dist.is_main():
        torch.save(model.state_dict(), f"{out_dir}/final.pt")


if __name__ == "__main__":
    _, _, _, dev = dist.init_distributed("cpu")
    modes = {"nlvr": nlvr, "negatives": negatives, "ranklog": ranklog, "neighbours": neighbours, "streams": streams}
    modes[sys.argv[1]](sys.argv[2], int(sys.argv[3]), dev, *sys.argv[4:])
    dist.cleanup()
