"""Our DINOv2 trainer next to LightlySSL's DINOv2 (examples/pytorch/dinov2.py recipe) at equal budget.

Both train the same ViT shape (the config's backbone, timm VisionTransformer for Lightly), from the same
initial weights (ours; `--lightly-init` keeps Lightly's own xavier re-initialisation), on the very
same batches (our multi-crop pipeline and iBOT masks, iteration by iteration), with the same lr /
weight-decay / teacher-momentum / teacher-temperature schedules, steps interleaved in one process so
machine load hits both alike; then teacher k-NN (k 20, T 0.07) on Fashion-MNIST. Lightly is NOT a
project dependency: run with an environment that has it, e.g.
  python -m venv --system-site-packages /work/venv-lightly && /work/venv-lightly/bin/pip install lightly
  PYTHONPATH=. /work/venv-lightly/bin/python bench/vs_lightly.py --iters 150 --seeds 0
  PYTHONPATH=. /work/venv-lightly/bin/python bench/vs_lightly.py --config small_cpu --own-schedules --iters 1200
(`--own-schedules` keeps the config's warm-ups and last-layer freeze; Lightly's step takes the config's iBOT
and KoLeo weights, its DINO term is Lightly's own: EMA centering where ours may use Sinkhorn-Knopp.)
`--throughput` instead times `--steps` alternating steps of each (synthetic crops, the first one a
warm-up, untimed) at the given config and crop sizes. Step times are medians; the ours/Lightly ratio is
taken step by step (median, min, max).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


class LightlyDINOv2(torch.nn.Module):
    """Student/teacher built from Lightly's modules, shaped like our backbone and heads."""

    def __init__(self, arch: dict, prototypes: int, hidden: int, bottleneck: int, own_init: bool = False) -> None:
        super().__init__()
        from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
        from timm.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(img_size=arch["img_size"], patch_size=arch["patch_size"], embed_dim=arch["embed_dim"],
                                depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"],
                                init_values=arch["init_values"], num_classes=0, dynamic_img_size=True,
                                pos_embed="learn")
        # own_init: Lightly's own (xavier-uniform, MAE-style) re-initialisation of the timm ViT; otherwise the
        # timm init is kept and `copy_init_from` gives it our (official, trunc-normal 0.02) initial weights.
        self.student_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip",
                                                            weight_initialization="" if own_init else "skip")
        self.student_head = DINOv2ProjectionHead(arch["embed_dim"], hidden, bottleneck, prototypes)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_head = DINOv2ProjectionHead(arch["embed_dim"], hidden, bottleneck, prototypes)
        self.teacher_head.load_state_dict(self.student_head.state_dict())  # (old weight_norm: no deepcopy)
        for m in (self.teacher_backbone, self.teacher_head):
            for p in m.parameters():
                p.requires_grad = False
            m.eval()

    @torch.no_grad()
    def copy_init_from(self, student: torch.nn.ModuleDict) -> None:
        """Start student and teacher from our student's weights (backbone, mask token, DINO head)."""
        head = student["dino_head"]
        wn = head.last_layer.parametrizations.weight
        for bb, h in ((self.student_backbone, self.student_head), (self.teacher_backbone, self.teacher_head)):
            bb.vit.load_state_dict(student["backbone"].vit.state_dict())
            bb.mask_token.copy_(student["backbone"].mask_token.view_as(bb.mask_token))
            ours = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
            theirs = [m for m in h.layers if isinstance(m, torch.nn.Linear)]
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
            h.last_layer.weight_g.copy_(wn.original0)
            h.last_layer.weight_v.copy_(wn.original1)

    def teacher_features(self, x: torch.Tensor) -> dict:
        """Final-norm CLS token of the teacher (what k-NN uses)."""
        return {"cls": self.teacher_backbone.encode(x)[:, 0]}


def lightly_step(m: LightlyDINOv2, losses: tuple, opt, batch: dict, sched: dict, n_local: int,
                 weights: tuple = (1.0, 0.1)) -> dict:
    """One step of Lightly's DINOv2 example on our batch (same crops, same iBOT masks).

    weights: (iBOT, KoLeo) loss weights, the config's (the example's are 1.0 and 0.1)."""
    from lightly.models.utils import update_momentum

    dino_loss, ibot_loss, koleo_loss = losses
    g, loc, masks = batch["global"], batch["local"], batch["masks"].bool()
    mask = torch.cat([masks.new_zeros(masks.shape[0], 1), masks], dim=1)  # + CLS position
    for group in opt.param_groups:
        group["lr"] = 0.0 if (group["last_layer"] and sched["last_layer_frozen"]) else sched["lr"]
        group["weight_decay"] = sched["wd"] * group["wd_mult"]
    with torch.no_grad():
        t_feat = m.teacher_backbone.encode(g)
        t_cls = m.teacher_head(t_feat[:, 0])
        t_masked = m.teacher_head(t_feat[mask])
    s_feat = m.student_backbone.encode(g, mask=mask)
    s_cls_g = s_feat[:, 0]
    s_masked = m.student_head(s_feat[mask])
    s_cls_l = m.student_backbone.encode(loc)[:, 0]
    s_out = m.student_head(torch.cat([s_cls_g, s_cls_l]))
    temp = sched["teacher_temp"]
    d = dino_loss(teacher_out=list(t_cls.chunk(2)), student_out=list(s_out.chunk(2 + n_local)), teacher_temp=temp)
    side = int(round(masks.shape[1] ** 0.5))
    i = ibot_loss(teacher_out=t_masked, student_out=s_masked, mask=masks.view(-1, side, side), teacher_temp=temp)
    k = weights[1] * sum(koleo_loss(t) for t in s_cls_g.chunk(2))
    loss = d + weights[0] * i + k
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.student_backbone.parameters(), 3.0)
    torch.nn.utils.clip_grad_norm_(m.student_head.parameters(), 3.0)
    opt.step()
    update_momentum(m.student_backbone, m.teacher_backbone, m=sched["momentum"])
    update_momentum(m.student_head, m.teacher_head, m=sched["momentum"])
    return {"loss": float(loss.detach()), "dino_loss": float(d.detach()), "ibot_loss": float(i.detach())}


def build_lightly(cfg, arch: dict, own_init: bool = False):
    """Lightly model, losses and AdamW (no decay on biases/norms, last layer grouped for freezing)."""
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss

    h = cfg.head
    m = LightlyDINOv2(arch, h.prototypes, h.hidden_dim, h.bottleneck_dim, own_init)
    groups: dict = {}
    for name, p in list(m.student_backbone.named_parameters()) + [("head." + n, p) for n, p in
                                                                   m.student_head.named_parameters()]:
        key = ("last_layer" in name, 0.0 if (name.endswith(".bias") or "norm" in name) else 1.0)
        groups.setdefault(key, {"params": [], "last_layer": key[0], "wd_mult": key[1]})["params"].append(p)
    opt = torch.optim.AdamW(list(groups.values()), lr=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2))
    losses = (DINOLoss(output_dim=h.prototypes), IBOTPatchLoss(output_dim=h.prototypes), KoLeoLoss())
    return m, losses, opt


def synthetic_batch(cfg, seed: int = 0) -> dict:
    """Random crops and stratified iBOT masks shaped as the config's real batches."""
    from train.masking import sample_masks

    b, c, p = cfg.optim.batch_size, cfg.crops, cfg.model.patch_size
    g = torch.Generator().manual_seed(seed)
    masks, _ = sample_masks(2 * b, (c.global_size // p,) * 2, np.random.default_rng(seed))
    return {"global": torch.randn(2 * b, 3, c.global_size, c.global_size, generator=g), "iteration": 0,
            "local": torch.randn(c.n_local * b, 3, c.local_size, c.local_size, generator=g),
            "masks": torch.from_numpy(masks)}


def main() -> None:
    """Train both on the same batches for --iters per seed; print k-NN, DINO term and step times."""
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tiny")
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--seeds", default="0")
    p.add_argument("--n-bank", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/ssl_fashion")
    p.add_argument("--throughput", action="store_true", help="time steps on synthetic crops only")
    p.add_argument("--steps", type=int, default=5,
                   help="with --throughput: steps of each trainer (alternating); the first, a warm-up, is not timed")
    p.add_argument("--lightly-init", action="store_true",
                   help="keep Lightly's own xavier re-initialisation of the ViT (default: both start from our weights)")
    p.add_argument("--own-schedules", action="store_true",
                   help="keep the config's warm-up and last-layer-freeze lengths (default: iters/10, /3, /20)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from bench.ssl_fashion import embed, knn20, prepare
    from train.cli import resolve_config_path
    from train.config import load_config
    from train.loop import _step, build_batches, build_model, build_schedules
    from train.optim import build_optimizer

    out: dict = {"bench": "vs_lightly", "config": args.config, "overrides": args.overrides, "iters": args.iters,
                 "own_schedules": args.own_schedules,
                 "threads": args.threads, "lightly_init": args.lightly_init, "runs": []}
    data = None if args.throughput else prepare(args.work)
    for seed in [int(s) for s in args.seeds.split(",")]:
        ov = ["data.num_workers=0", "progress=false", f"seed={seed}", f"optim.iterations={args.iters}"]
        if not args.own_schedules:
            ov += [f"optim.warmup_iters={args.iters // 10}", f"loss.warmup_teacher_temp_iters={args.iters // 3}",
                   f"head.freeze_last_layer_iters={args.iters // 20}"]
        ov += args.overrides
        if data:
            ov.append(f"data.path={data[4]}")
        cfg = load_config(resolve_config_path(args.config), ov)
        torch.manual_seed(seed)
        ours = build_model(cfg).train()
        opt = build_optimizer(ours.student, ours.arch["depth"], cfg.optim.layerwise_decay,
                              cfg.optim.patch_embed_lr_mult, (cfg.optim.beta1, cfg.optim.beta2))
        torch.manual_seed(seed)
        peer, peer_losses, peer_opt = build_lightly(cfg, ours.arch, args.lightly_init)
        if not args.lightly_init:
            peer.copy_init_from(ours.student)
        sched = build_schedules(cfg)
        builder = None if args.throughput else build_batches(cfg)
        if data:  # k-NN of the untrained teachers (equal when both start from our weights)
            xtr, ytr, xte, yte, _ = data
            bank = np.random.default_rng(seed).choice(len(xtr), args.n_bank, replace=False)
            test = np.random.default_rng(1000 + seed).choice(len(xte), args.n_test, replace=False)
            size = cfg.eval_size or cfg.crops.global_size
            init_knn = {f"knn_init_{name}": knn20(embed(net, xtr[bank], size), ytr[bank], embed(net, xte[test], size),
                                                  yte[test])
                        for name, net in (("ours", ours.teacher["backbone"]), ("lightly", _Wrap(peer)))}
        ours.train()
        peer.student_backbone.train()  # (the k-NN above put the whole peer in eval mode)
        peer.student_head.train()
        times_ours, times_peer = [], []
        h_ours, h_peer = [], []
        n = args.steps if args.throughput else args.iters
        for it in range(n):
            batch = synthetic_batch(cfg, it) if builder is None else builder(it)
            s = sched.at(it)
            t0 = time.perf_counter()
            h_ours.append(_step(ours, opt, batch, s, cfg, torch.device("cpu")))
            t1 = time.perf_counter()
            h_peer.append(lightly_step(peer, peer_losses, peer_opt, batch, s, cfg.crops.n_local,
                                       (cfg.loss.ibot_weight, cfg.loss.koleo_weight)))
            t2 = time.perf_counter()
            if it:  # the first step of each (allocations, lazy init) is a warm-up
                times_ours.append(t1 - t0)
                times_peer.append(t2 - t1)
        ratios = [a / b for a, b in zip(times_ours, times_peer)]
        run = {"seed": seed, "s_per_step_ours": round(float(np.median(times_ours)), 3) if times_ours else None,
               "s_per_step_lightly": round(float(np.median(times_peer)), 3) if times_peer else None,
               "step_ratio_ours_over_lightly": {"median": round(float(np.median(ratios)), 3),
                                               "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
               if ratios else None}
        if args.throughput:
            run["steps_s_ours"] = [round(t, 3) for t in times_ours]
            run["steps_s_lightly"] = [round(t, 3) for t in times_peer]
        if data:
            run.update(init_knn)
            last = max(1, min(20, n // 10))
            for name, net, hist in (("ours", ours.teacher["backbone"], h_ours),
                                    ("lightly", _Wrap(peer), h_peer)):
                run[f"knn_{name}"] = knn20(embed(net, xtr[bank], size), ytr[bank], embed(net, xte[test], size),
                                           yte[test])
                run[f"dino_last_{name}"] = round(float(np.mean([h["dino_loss"] for h in hist[-last:]])), 4)
            run["ln_K"] = round(float(np.log(cfg.head.prototypes)), 4)
        out["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
    print(json.dumps(out))


class _Wrap(torch.nn.Module):
    """Gives the Lightly teacher our backbone's call signature for `embed`."""

    def __init__(self, peer: LightlyDINOv2) -> None:
        super().__init__()
        self.peer = peer

    def forward(self, x: torch.Tensor) -> dict:
        return self.peer.teacher_features(x)


if __name__ == "__main__":
    main()
