"""One step of CSSL: L_tot = w_cl L_CL + w_cr L_CR (+ L_sup with train.lsup_in_ltot), with every
part returned for logging.

The model returns logits and embeddings; all loss math lives here and in the loss modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cssl_ray.config import Config, ConsistencyConfig, ContrastiveConfig, PseudoConfig
from cssl_ray.method.collectives import Collectives
from cssl_ray.method.consistency import Teacher, consistency_step
from cssl_ray.method.contrastive import AuxiliaryGaussian, contrastive_loss, sample_alpha
from cssl_ray.method.streams import RandomStreams
from cssl_ray.method.supervised import supervised_loss


@dataclass
class StepInputs:
    """What one CSSL step consumes.

    patches (P, C_in, s, s) class-wise patches and their classes (P,); unlabelled (B, C_in, H, W)
    full unlabelled images for L_CR. Either may be None when its loss is switched off. labelled
    (b, C_in, H, W) and labelled_masks (b, H, W): a supervised batch whose L_sup joins L_tot
    (``train.lsup_in_ltot``), else None.
    """

    patches: Tensor | None
    patch_classes: Tensor | None
    unlabelled: Tensor | None
    labelled: Tensor | None = None
    labelled_masks: Tensor | None = None


@dataclass(frozen=True)
class Terms:
    """The slice of the config L_tot reads: which terms run and their weights (the YAML's
    ``train.use_cl``, ``use_hard_negatives``, ``use_cr``, ``w_cl``, ``w_cr``) and the sections of the
    losses (``contrastive``, ``consistency``, ``pseudo``). ``Terms.of(cfg)`` cuts it from a Config."""

    contrastive: ContrastiveConfig
    consistency: ConsistencyConfig
    pseudo: PseudoConfig
    use_cl: bool = True
    use_hard_negatives: bool = True
    use_cr: bool = True
    w_cl: float = 1.0
    w_cr: float = 1.0
    sup_loss: str = "ce"  # train.sup_loss, for train.lsup_in_ltot's L_sup

    @classmethod
    def of(cls, cfg: Config) -> Terms:
        t = cfg.train
        return cls(cfg.contrastive, cfg.consistency, cfg.pseudo, use_cl=t.use_cl,
                   use_hard_negatives=t.use_hard_negatives, use_cr=t.use_cr, w_cl=t.w_cl, w_cr=t.w_cr,
                   sup_loss=t.sup_loss)


def patch_embeddings(model: nn.Module, patches: Tensor) -> Tensor:
    """z = normalize(g(pool(E(w)))): (P, C_in, s, s) -> (P, embed_dim) unit vectors, fp32 (also under
    autocast: L_CL and omega need the precision)."""
    net = getattr(model, "module", model)
    return F.normalize(net.project(net.encode(patches)[-1]).float(), dim=1)


def cssl_objective(model: nn.Module, teacher: Teacher | None, inputs: StepInputs, terms: Terms, *,
                   lambda_: float, streams: RandomStreams, aux: AuxiliaryGaussian | None = None,
                   collectives: Collectives | None = None, unsup_weight: float = 1.0) -> dict[str, Tensor]:
    """Compute L_tot for one step; alpha, the auxiliary samples and the noise each draw from their own
    stream of ``streams`` (so turning one term off leaves the others' draws unchanged).

    Returns ``{"loss", "loss_cl", "loss_cr", "z", "classes", "anchors", "anchors_without_positive",
    "aux"}``: ``loss`` carries the gradient; ``z`` (detached patch embeddings of every rank), their
    ``classes`` and ``aux`` (the auxiliary negatives used, or None) feed the silhouette omega.

    Data parallel (``collectives``): ``inputs`` hold this rank's share of the global batches. L_CL
    runs on the embeddings of every rank (``gather_with_grad``; alpha and the auxiliary samples
    come from shared streams, so every rank computes the same L_CL) and L_CR's mean runs over the
    confident pixels of every rank (``global_mean``): after the gradient average, the update of one
    process on the whole global batch.

    ``unsup_weight``: w(t), multiplying w_cl L_CL + w_cr L_CR (not L_sup): ``train.protocol`` joint's
    ramp (``cssl_ray.run.joint``); 1 in the paper's rounds.
    """
    col = collectives or Collectives()
    t, c = terms, terms.contrastive
    device = next(model.parameters()).device
    zero = torch.zeros((), device=device)
    out: dict[str, Tensor] = {"loss_cl": zero, "loss_cr": zero}
    loss = zero
    if inputs.labelled is not None and inputs.labelled_masks is not None:  # train.lsup_in_ltot
        y = inputs.labelled_masks
        ignore = terms.pseudo.ignore_index
        logits = model(inputs.labelled)  # (b, C, H, W)
        ce = col.global_mean(F.cross_entropy(logits.float(), y, ignore_index=ignore, reduction="sum"),
                             (y != ignore).sum())
        loss_sup = supervised_loss(ce, logits, y, ignore, terms.sup_loss, col)
        out["loss_sup_ltot"] = loss_sup
        loss = loss + loss_sup
    if t.use_cl:
        if inputs.patches is None or inputs.patch_classes is None:
            raise ValueError("cssl_objective: use_cl needs patches and patch_classes")
        z = col.gather_with_grad(patch_embeddings(model, inputs.patches))  # (P, D): every rank's patches
        classes = col.gather(inputs.patch_classes)  # (P,)
        n = z.shape[0]
        alpha = aux_batch = aux_alpha = None
        if t.use_hard_negatives:
            alpha = sample_alpha(n, c.alpha_min, c.alpha_max, c.hard_ratio, generator=streams.alpha).to(device)
        if aux is not None:
            m = c.aux_samples or n
            aux_batch = aux.sample(m, generator=streams.aux).to(device=device, dtype=z.dtype)  # (M, D)
            if t.use_hard_negatives:
                aux_alpha = sample_alpha(n, c.alpha_min, c.alpha_max, c.hard_ratio, m=m,
                                         generator=streams.alpha).to(device)
        loss_cl, stats = contrastive_loss(z, classes, c.tau, alpha, aux=aux_batch,
                                          aux_alpha=aux_alpha, return_stats=True)
        out["loss_cl"] = loss_cl
        out["z"], out["classes"] = z.detach(), classes
        out["aux"] = aux_batch
        out["anchors"] = torch.tensor(float(stats["anchors"]))
        out["anchors_without_positive"] = torch.tensor(float(stats["anchors_without_positive"]))
        loss = loss + unsup_weight * t.w_cl * loss_cl
    if t.use_cr and inputs.unlabelled is not None:  # None: D_U is empty (100% labelled)
        if teacher is None:
            raise ValueError("cssl_objective: use_cr needs a teacher")
        loss_cr = consistency_step(model, teacher, inputs.unlabelled, lambda_,
                                   threshold=terms.pseudo.threshold, ignore_index=terms.pseudo.ignore_index,
                                   mode=terms.consistency.perturb, generator=streams.noise,
                                   scale=terms.consistency.noise, collectives=col)
        out["loss_cr"] = loss_cr
        loss = loss + unsup_weight * t.w_cr * loss_cr
    out["loss"] = loss
    return out
