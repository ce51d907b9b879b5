"""Zero-shot and linear-probe accuracy of a toy CLIP folder on the ten main toy datasets (all training images).

Usage: python benchmarks/toy_features.py MODEL_DIR [IMAGE_SIZE]   -> JSON {dataset: [zero-shot %, linear probe %], avg_zs, avg_lp}
"""
import sys, json, time, torch, torch.nn.functional as F, numpy as np
from pathlib import Path
from PIL import Image
from vlprompt.pretraining.clip_pretrain import MEAN, STD
from vlprompt.backbones import load_backbone
from vlprompt.toyworld.suite import load_toy

def feats(bb, samples, size):
    xs = []
    for s in samples:
        im = Image.open(s.path).convert("RGB")
        if im.size[0] != size: im = im.resize((size, size), Image.BICUBIC)
        xs.append(np.asarray(im))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.cat([F.normalize(bb.encode_image(x[i:i + 512]), dim=-1) for i in range(0, len(x), 512)])

def probe(ftr, ytr, fte, yte, n, fval=None, yval=None):
    """Test accuracy of a logistic-regression probe whose weight decay is chosen on the validation split.

    (Before 2026-11-23 the weight decay was chosen on the test split: a best-of-3, slightly optimistic.)"""
    best_val, best_test = -1.0, 0.0
    for wd in (1e-4, 1e-3, 1e-2):
        W = torch.zeros(ftr.shape[1], n, requires_grad=True); b = torch.zeros(n, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], max_iter=200, line_search_fn="strong_wolfe")
        def closure():
            opt.zero_grad(); l = F.cross_entropy(ftr @ W * 10 + b, ytr) + wd * (W ** 2).sum(); l.backward(); return l
        opt.step(closure)
        with torch.no_grad():
            test = ((fte @ W * 10 + b).argmax(-1) == yte).float().mean().item()
            val = ((fval @ W * 10 + b).argmax(-1) == yval).float().mean().item() if fval is not None else test
        if val > best_val:
            best_val, best_test = val, test
    return best_test

def evaluate(folder, size, names=("shapes", "fine_shapes", "colours", "combo", "texture", "count", "relation", "position", "size", "background")):
    bb = load_backbone(str(folder)); bb.model.eval()
    out = {}
    for n in names:
        d = load_toy(n)
        ytr = torch.tensor([s.label for s in d.train]); yte = torch.tensor([s.label for s in d.test])
        ftr, fte, fva = feats(bb, d.train, size), feats(bb, d.test, size), feats(bb, d.val, size)
        yva = torch.tensor([s.label for s in d.val])
        with torch.no_grad():
            t = F.normalize(bb.encode_texts([d.template.format(c) for c in d.classnames]), dim=-1)
        zs = ((fte @ t.T).argmax(-1) == yte).float().mean().item()
        lp = probe(ftr, ytr, fte, yte, len(d.classnames), fva, yva)
        out[n] = (round(100 * zs, 1), round(100 * lp, 1))
    out["avg_zs"] = round(np.mean([v[0] for k, v in out.items()]), 1)
    out["avg_lp"] = round(np.mean([v[1] for k, v in out.items() if k != "avg_zs"]), 1)
    return out

if __name__ == "__main__":
    print(json.dumps(evaluate(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 48)))
