"""Offline check of the joint head's collapse (docs/real-model.md, GRPO + SPR): the SPR loss (the spec's
filter, with and without the class guard) and AdamW on the fine-tuned SmolLM2's cached step features of the
fit's training rollouts, batches of 64 rollouts, as GRPO's head update sees them (backbone frozen),
at three head learning rates. Prints, per step, the mean trajectory score of right and wrong rollouts.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/real-model/head_step_size.py    # needs runs/real-model/fit-features
"""
import glob, torch
from thinkscale.reflect import SPRMHead, spr_loss, trajectory_score
rollouts = []
for p in sorted(glob.glob('runs/real-model/fit-features/rollouts/shard-*.pt')):
    d = torch.load(p, weights_only=False)
    at = 0
    for i in range(len(d['correct'])):
        n = int(d['steps'][i])
        rollouts.append({'features': d['features'][at:at + n], 'correct': bool(d['correct'][i])})
        at += n
rollouts = [r for r in rollouts if len(r['features'])]
print(len(rollouts), sum(r['correct'] for r in rollouts))
def run(lr, share, steps=8, seed=0):
    torch.manual_seed(seed)
    head = SPRMHead(576); opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        idx = torch.randperm(len(rollouts), generator=g)[:64].tolist()
        T = max(len(rollouts[i]['features']) for i in idx)
        feats = torch.zeros(64, T, 576); mask = torch.zeros(64, T, dtype=torch.bool)
        for b, i in enumerate(idx):
            f = rollouts[i]['features'].float(); feats[b, :len(f)] = f; mask[b, :len(f)] = True
        y = torch.tensor([float(rollouts[i]['correct']) for i in idx])
        head.train(); logits = head(feats)
        loss, st = spr_loss(logits, mask, y, min_class_share=share)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0); opt.step()
        with torch.no_grad():
            head.eval(); s = trajectory_score(head(feats), mask)
            out.append((round(s[y == 1].mean().item(), 3), round(s[y == 0].mean().item(), 3)))
    return out
for lr in (1e-3, 1e-4, 1e-5):
    for share in (0.0, 0.1):
        print(lr, share, run(lr, share))
