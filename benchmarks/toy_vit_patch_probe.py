"""How fast a small ViT (the toy CLIP's vision config) learns toy:shapes supervised, per image size and patch size.

Usage: python benchmarks/toy_vit_patch_probe.py SIZE PATCH SECONDS [LR]   (1 thread; prints steps, loss, test acc every 30 s)
e.g. 48 12 120 -> ~83% after 2 minutes here; 48 8 120 -> ~25%.
"""
import sys, time, torch, torch.nn.functional as F, numpy as np
from vlprompt.toyworld.suite import toy_scene
from vlprompt.toyworld.render import render_array
from vlprompt.pretraining.clip_pretrain import PretrainConfig, build_model, _normalise
torch.set_num_threads(1); torch.manual_seed(0)
size, patch, budget = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
def make(split, n, off=0):
    xs, ys = [], []
    for i in range(n):
        for lab in range(8):
            sc, dom = toy_scene("shapes", split, lab, i + off)
            xs.append(render_array(sc, size, dom)); ys.append(lab)
    return _normalise(np.stack(xs)), torch.tensor(ys)
xtr, ytr = make("train", 3000); xte, yte = make("test", 60)
m = build_model(PretrainConfig(image_size=size, patch_size=patch), 300, 2, 1).vision_model
head = torch.nn.Linear(128, 8)
opt = torch.optim.AdamW(list(m.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.1)
t = time.time(); step = 0; nxt = 30
while time.time() - t < budget:
    idx = torch.randint(0, len(xtr), (128,))
    for g in opt.param_groups: g["lr"] = lr * min(1, (step + 1) / 30)
    loss = F.cross_entropy(head(m(pixel_values=xtr[idx]).pooler_output), ytr[idx])
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if time.time() - t > nxt:
        nxt += 30
        with torch.no_grad(): acc = (head(m(pixel_values=xte).pooler_output).argmax(-1) == yte).float().mean().item()
        print(size, patch, lr, step, round(loss.item(), 3), round(acc, 3), round(time.time() - t), flush=True)
