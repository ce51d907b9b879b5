"""Zero-shot vs linear probe of a toy CLIP on toy datasets re-rendered in other domains (looks).

Where a linear probe on the image features beats zero-shot by far, the features still hold the classes but the
text side does not reach them: that is room for prompt tuning. Used to choose the look of each suite dataset.

Usage: python benchmarks/toy_domains.py MODEL_DIR shapes,texture clean,sketch,inverted [ROOT]
-> one line per (dataset, domain): zero-shot %, linear probe % (all training images), then a JSON summary.
Datasets are written under ROOT (default /tmp/vlprompt_toy_domains) as toy_<dataset>__<domain>.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_features import feats, probe  # noqa: E402

from vlprompt.backbones import load_backbone  # noqa: E402
from vlprompt.toyworld import suite  # noqa: E402


def main(model: str, names: list[str], domains: list[str], root: str) -> dict:
    backbone = load_backbone(model)
    backbone.model.eval()
    size = backbone.image_size
    out = {}
    for name in names:
        base = suite.SUITE[suite.resolve_toy_name(name)]
        for domain in domains:
            key = f"{base.name}__{domain}"
            # a throwaway spec in this process only: the same classes and scenes, another look
            suite.SUITE[key] = dataclasses.replace(base, name=key, scene_key=base.name, domains=tuple(domain.split("+")))
            data = suite.load_toy(key, root=root)
            y_train = torch.tensor([s.label for s in data.train])
            y_test = torch.tensor([s.label for s in data.test])
            f_train, f_test = feats(backbone, data.train, size), feats(backbone, data.test, size)
            with torch.no_grad():
                text = F.normalize(backbone.encode_texts([data.template.format(c) for c in data.classnames]), dim=-1)
            zero_shot = ((f_test @ text.T).argmax(-1) == y_test).float().mean().item()
            f_val, y_val = feats(backbone, data.val, size), torch.tensor([s.label for s in data.val])
            linear = probe(f_train, y_train, f_test, y_test, len(data.classnames), f_val, y_val)
            out[key] = [round(100 * zero_shot, 1), round(100 * linear, 1)]
            print(key, out[key], flush=True)
    return out


if __name__ == "__main__":
    root = sys.argv[4] if len(sys.argv) > 4 else "/tmp/vlprompt_toy_domains"
    print(json.dumps(main(sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(","), root)))
