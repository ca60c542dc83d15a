"""Compositional probes (ARO, What'sUp, SugarCrepe, the shapes world's) scored by BLIP's own heads: ITC, ITM,
ITC+ITM and the captioner's length-normalised log-likelihood; accuracy per subset as JSON and a bar chart.

    python evaluate_compositional.py --model model_base_retrieval_coco.pth --task retrieval --image-size 384 \\
        --captioner model_base_caption_capfilt_large.pth \\
        --probe vg_relation aro/visual_genome_relation.json aro/images \\
        --probe whatsup_a whatsup/controlled_images_dataset.json whatsup \\
        --probe sugarcrepe sugarcrepe/ coco/val2017 --out output/compositional
    python evaluate_compositional.py --model output/shapes_retrieval/model.safetensors --task retrieval \\
        --probe shapes output/shapes_pairs/probes.json output/shapes_pairs --out output/probes
"""
import argparse

import torch

from blip import load_model
from blip.evaluation.compositional import BENCHMARKS, ProbeScorer, evaluate, write_report
from blip.errors import exit_on_user_error


def _options(pairs):
    from blip.training.config import parse_override
    return dict(parse_override(p) for p in pairs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="ITC/ITM checkpoint (itm, retrieval or pretrain)")
    p.add_argument("--task", default="retrieval", choices=("itm", "retrieval", "pretrain"))
    p.add_argument("--captioner", help="caption checkpoint for the log-likelihood head (a pretrain model has its own)")
    p.add_argument("--image-size", type=int, default=None, help="e.g. 384 for fine-tuned base checkpoints")
    p.add_argument("--model-option", nargs="*", default=[], metavar="KEY=VALUE", help="load_model options (vit=large)")
    p.add_argument("--probe", nargs=3, action="append", required=True, metavar=("NAME", "ANNOTATION", "IMAGE_ROOT"),
                   help=f"NAME in {sorted(BENCHMARKS)}; SugarCrepe: a file or the folder of its 7 files")
    p.add_argument("--out", default="output/compositional")
    p.add_argument("--batch-size", type=int, default=32, help="images per ViT pass")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="first N cases of each probe (a quick look)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    opts = _options(a.model_option)
    if a.image_size:
        opts["image_size"] = a.image_size
    model = load_model(a.task, a.model, **opts).to(a.device) if a.model else None
    captioner = load_model("caption", a.captioner, **opts).to(a.device) if a.captioner else None
    scorer = ProbeScorer(model, captioner, batch_size=a.batch_size, num_workers=a.num_workers)
    results = evaluate(scorer, [tuple(x) for x in a.probe], limit=a.limit)
    json_path, png_path = write_report(results, a.out)
    for report, r in results.items():
        heads = "  ".join(f"{h} {r[h]['accuracy']:.1f}" for h in scorer.heads)
        print(f"{report:28s} {r['scored']:6d} cases  {heads}  (chance {r['chance']})")
    print(f"wrote {json_path} and {png_path}")
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
