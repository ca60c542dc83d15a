"""The entry scripts' `prepare`: the offline world a config's `shapes:` describes, whichever kind it is (one module
above the worlds, so that none of them imports another's loader)."""
from __future__ import annotations

import json
from pathlib import Path

from blip import distributed as dist
from data.shapes import ensure_scene_world
from data.shapes_probes import ensure_pair_world


def ensure_shapes_world(cfg) -> dict | None:
    """Generate the world a config describes (`shapes:`, the arguments of its generator) unless the same one is on
    disk; rank 0 writes, the others wait. Accepts a Config or the `shapes` dict itself; returns the manifest (None
    when the config describes no world). `world: pairs`: two-shape scenes and the compositional probe set."""
    spec = cfg if isinstance(cfg, dict) else cfg.shapes
    if not spec:
        return None
    if spec.get("world") == "pairs":
        manifest = ensure_pair_world({k: v for k, v in spec.items() if k != "world"}) if dist.is_main() else None
        dist.barrier()
        return manifest or json.loads((Path(spec["out_dir"]) / "manifest.json").read_text())
    return ensure_scene_world(spec)
