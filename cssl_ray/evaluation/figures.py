"""The paper's figures (Pandey et al., MICCAI 2021) as PNGs of one run, in ``<train.out_dir>/figures/``.

    pseudo_refinement.png  Fig. 2: the pseudo-labels of a fixed few unlabelled images (the first
                           ``SNAPSHOT_IMAGES`` of D_U) round by round, beside the image and its
                           hidden ground truth; grey = below the confidence threshold
    omega.png              Fig. 3: omega (silhouette of the patch embeddings) and the lambda_ it
                           sets, per round
    embeddings.png         Fig. 4: a 2-D projection (PCA, or t-SNE) of the embeddings z of
                           class-wise patches of the val images (ground truth), coloured by class,
                           with their silhouette in the title

Capture: every round the trainer calls ``pseudo_snapshot`` with the model that labels the round
(``--local``: right before ``round_patches``; Ray: rank 0, right after publishing the round's
weights) and keeps ``(round, labels)`` on ``schedule.RunState.snapshots``, so checkpoints carry them
and a resumed run keeps them. ``write_run_figures`` draws the three figures at the end, on the
best-validation weights (``records.evaluate_best``); a figure whose data is missing is skipped and a
failure is one warning line, never a failed run.

matplotlib is imported inside the plot functions (it is slow to import) and draws on a bare
``Figure`` with the Agg canvas: no pyplot, no global figure list, safe in Ray workers.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from cssl_ray.config import Config
from cssl_ray.method.objective import patch_embeddings
from cssl_ray.method.patches import sample_patches
from cssl_ray.method.pseudo_labels import predict_pseudo_labels, rule_of
from cssl_ray.method.silhouette import silhouette

if TYPE_CHECKING:
    from cssl_ray.data.bundle import DataBundle


class FigureSource(Protocol):
    """What the figures read of a run (``schedule.RunState`` has it; this module does not import it,
    since the state machine imports ``pseudo_snapshot`` from here)."""

    model: nn.Module
    aux: Any
    history: list[dict[str, Any]]
    snapshots: list[tuple[int, np.ndarray]]

log = logging.getLogger(__name__)

SNAPSHOT_IMAGES = 2  # unlabelled images followed round by round (Fig. 2)
MAX_ROUNDS_SHOWN = 6  # Fig. 2 columns of rounds: evenly spaced, first and last always shown
MAX_EMBED_PATCHES = 500  # val patches embedded for Fig. 4 (a seeded subset beyond this)
TSNE_MAX_POINTS = 1000  # t-SNE only up to this many points (O(N^2)); PCA beyond
IGNORE = 255  # label of below-threshold pixels in a snapshot (uint8, whatever pseudo.ignore_index is)
FILES = ("pseudo_refinement.png", "omega.png", "embeddings.png")


# ---------------------------------------------------------------------------------------------
# Capture


@torch.no_grad()
def pseudo_snapshot(model: nn.Module, images: Tensor, cfg: Config) -> np.ndarray:
    """The pseudo-labels ``model`` gives ``images`` under the run's threshold, as a compact array.

    Args:
        model: the model that labels the round (eval mode inside; its train/eval flags restored).
        images: ``(k, C_in, H, W)``, any device.
        cfg: ``pseudo.threshold``, ``pseudo.ignore_index`` and ``consistency.batch_size`` are used.

    Returns:
        ``(k, H, W)`` uint8: the class id, ``IGNORE`` (255) below the threshold. Consumes no random
        numbers and leaves BatchNorm statistics alone, so taking it does not change the run.
    """
    if cfg.data.num_classes >= IGNORE:
        raise ValueError(f"pseudo_snapshot: uint8 labels need data.num_classes < {IGNORE}, got {cfg.data.num_classes}")
    p = cfg.pseudo
    labels = predict_pseudo_labels(model, images, **rule_of(p), batch_size=cfg.consistency.batch_size)  # (k, H, W) int64
    labels = torch.where(labels == p.ignore_index, torch.full_like(labels, IGNORE), labels)
    return labels.cpu().numpy().astype(np.uint8)


@torch.no_grad()
def val_patch_embeddings(model: nn.Module, cfg: Config, images: Tensor, masks: Tensor, *,
                         max_patches: int = MAX_EMBED_PATCHES, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Embeddings of class-wise patches of labelled images (Fig. 4's points).

    Patches are drawn as in a round (``patches.size``, ``min_pixels``, ``per_image``,
    ``mask``; foreground classes only), a seeded subset of at most ``max_patches`` is kept, and each
    is embedded with the projection head: z = normalize(g(pool(E(w)))).

    Returns:
        z ``(N, embed_dim)`` float32 and classes ``(N,)`` int64, on the CPU; ``N = 0`` when no
        window holds enough pixels of any class.
    """
    pt = cfg.patches
    generator = torch.Generator().manual_seed(seed)
    patches, classes, _ = sample_patches(images, masks, pt.size, pt.min_pixels, per_image=pt.per_image, mask=pt.mask,
                                         classes=list(range(1, cfg.data.num_classes)),
                                         ignore_index=cfg.pseudo.ignore_index, generator=generator)
    if patches.shape[0] > max_patches:
        keep = torch.randperm(patches.shape[0], generator=generator)[:max_patches].sort().values
        patches, classes = patches[keep], classes[keep]
    net = getattr(model, "module", model)
    device = next(net.parameters()).device
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        z = [patch_embeddings(net, patches[i:i + 256].to(device)).float().cpu()  # (b, D)
             for i in range(0, patches.shape[0], 256)]
    finally:
        for m, training in modes:
            m.training = training
    z_all = torch.cat(z) if z else torch.zeros((0, cfg.model.embed_dim))
    return z_all, classes.cpu()


# ---------------------------------------------------------------------------------------------
# Plots


def plot_pseudo_refinement(images: Tensor | np.ndarray, hidden_masks: Tensor | np.ndarray | None,
                           snapshots: Sequence[tuple[int, np.ndarray]], class_names: Sequence[str],
                           path: str | Path, *, max_rounds: int = MAX_ROUNDS_SHOWN) -> Path:
    """Fig. 2: one row per image: the image, its ground truth (if known), its pseudo-labels by round.

    Args:
        images: ``(k, C_in, H, W)`` (1 or 3 channels shown as they are, otherwise channel 0).
        hidden_masks: ``(k, H, W)`` ground truth, or None (the column is left out).
        snapshots: ``(round, (k, H, W) uint8)`` pairs as ``pseudo_snapshot`` gives; at most
            ``max_rounds`` of them are shown, evenly spaced, the first and the last always.
        class_names: names of the class ids (background first).
        path: the PNG to write (parent folders are created).
    """
    if not snapshots:
        raise ValueError("plot_pseudo_refinement: no snapshots")
    imgs = _numpy(images)
    k = imgs.shape[0]
    bad = [r for r, s in snapshots if s.shape != (k, *imgs.shape[2:])]
    if imgs.ndim != 4 or bad:
        raise ValueError(f"plot_pseudo_refinement: images must be (k, C, H, W) and every snapshot (k, H, W); got "
                         f"images {imgs.shape}, snapshot shapes {[s.shape for _, s in snapshots]}")
    shown = [snapshots[i] for i in _evenly_spaced(len(snapshots), max_rounds)]
    masks = None if hidden_masks is None else _numpy(hidden_masks)
    lut = _label_colours(len(class_names))
    columns = [("image", None)] + ([("ground truth", None)] if masks is not None else [])
    columns += [(f"round {r}", s) for r, s in shown]

    fig = _figure((1.7 * len(columns), 1.7 * k + 0.8))
    axes = fig.subplots(k, len(columns), squeeze=False)
    for row in range(k):
        for col, (title, snap) in enumerate(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if col == 0:
                img = _display(imgs[row])
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            elif snap is None:  # the ground-truth column
                ax.imshow(lut[np.clip(masks[row], 0, 255).astype(np.intp)], interpolation="nearest")
            else:
                ax.imshow(lut[snap[row]], interpolation="nearest")
    _legend(fig, [(name, lut[c]) for c, name in enumerate(class_names)] + [("below threshold", lut[IGNORE])])
    fig.suptitle("Pseudo-labels of unlabelled images over rounds", fontsize=10)
    return _save(fig, path)


def plot_omega(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Fig. 3: omega (silhouette of the patch embeddings, measured in round r) and lambda_
    (the consistency noise variance used in round r, set by omega of round r - 1) vs round.

    ``history``: the run's records; only ``stage == "round"`` ones with an ``omega`` count.
    Raises ValueError when there is none (e.g. the supervised baseline).
    """
    rows = [h for h in history if h.get("stage") == "round" and "omega" in h]
    if not rows:
        raise ValueError("plot_omega: no round records with omega in the history")
    rounds = [int(h["round"]) for h in rows]
    fig = _figure((5.0, 3.2))
    ax = fig.subplots()
    ax.plot(rounds, [float(h["omega"]) for h in rows], marker="o", label=r"$\omega$ (silhouette, round $r$)")
    if all("lambda" in h for h in rows):
        ax.plot(rounds, [float(h["lambda"]) for h in rows], marker="s", linestyle="--",
                label=r"$\lambda = (\omega_{r-1} + 1) / 2 + \epsilon$")
    ax.axhline(0.0, color="0.7", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylim(min(-0.05, ax.get_ylim()[0]), max(1.05, ax.get_ylim()[1]))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Clustering of patch embeddings over rounds", fontsize=10)
    return _save(fig, path)


def project_2d(z: Tensor | np.ndarray, method: str = "pca", *, seed: int = 0) -> tuple[np.ndarray, str]:
    """``(N, D)`` points -> ``(N, 2)`` coordinates and the method actually used.

    "pca": exact, deterministic (the SVD of the centred points, each component's sign fixed so its
    largest loading is positive: scikit-learn's ``PCA`` result, without its ~1 s import).
    "tsne": scikit-learn's t-SNE (seeded), for 4 <= N <= ``TSNE_MAX_POINTS``; PCA otherwise.
    Fewer than 2 points or dimensions are padded with zero columns.
    """
    if method not in ("pca", "tsne"):
        raise ValueError(f"project_2d: method must be 'pca' or 'tsne', got {method!r}")
    x = _numpy(z).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"project_2d: z must be (N, D), got shape {x.shape}")
    n = x.shape[0]
    if method == "tsne" and 4 <= n <= TSNE_MAX_POINTS:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (n - 1) / 3)
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x), "tsne"
    out = np.zeros((n, 2))
    if n >= 2:
        x = x - x.mean(0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)  # (r,), (r, D)
        signs = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(1)])  # (r,)
        vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
        m = min(2, vt.shape[0])
        out[:, :m] = x @ vt[:m].T
    return out, "pca"


def plot_embeddings(z: Tensor | np.ndarray, classes: Tensor | np.ndarray, class_names: Sequence[str],
                    path: str | Path, method: str = "pca", title_extra: str = "") -> Path:
    """Fig. 4: scatter of the 2-D projection of embeddings ``z`` ``(N, D)``, coloured by ``classes``
    ``(N,)`` (names from ``class_names``, background first). One foreground class (two names):
    only that class is drawn, the auxiliary Gaussian negative is not, and the title says so."""
    x = _numpy(z)
    c = _numpy(classes).astype(np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != c.shape[0]:
        raise ValueError(f"plot_embeddings: z must be (N, D) and classes (N,); got {x.shape} and {c.shape}")
    xy, used = project_2d(x, method)
    colours = _label_colours(max(len(class_names), int(c.max(initial=0)) + 1))
    fig = _figure((5.2, 4.4))
    ax = fig.subplots()
    for cls in np.unique(c):
        sel = c == cls
        name = class_names[cls] if 0 <= cls < len(class_names) else f"class {cls}"
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, color=colours[cls], alpha=0.8, linewidths=0,
                   label=f"{name} ({int(sel.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{used.upper()} 1")
    ax.set_ylabel(f"{used.upper()} 2")
    if len(c):
        ax.legend(fontsize=8, markerscale=1.5)
    title = f"Patch embeddings z, {used.upper()} (N = {len(c)})"
    if len(class_names) == 2:
        title += "\none class; the auxiliary Gaussian is not shown"
    if title_extra:
        title += f"\n{title_extra}"
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# The run's figures


def write_run_figures(state: FigureSource, cfg: Config, bundle: DataBundle, out_dir: str | Path, *,
                      method: str = "pca") -> list[Path]:
    """Draw the run's figures into ``out_dir/figures/``; returns the files written.

    Call with the best-validation weights loaded in ``state.model`` (Fig. 4 embeds with them).
    A figure whose data is missing (no snapshots or no D_U; no omega in the history, e.g. the
    supervised baseline; no val patch) is skipped; a figure that fails logs one warning line.
    """
    fig_dir = Path(out_dir) / "figures"
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("cssl_ray.evaluation.figures: no figures written (matplotlib is not installed)")
        return []
    draws = (
        (FILES[0], lambda p: _refinement_figure(state, bundle, p)),
        (FILES[1], lambda p: _omega_figure(state, p)),
        (FILES[2], lambda p: _embedding_figure(state, cfg, bundle, p, method)),
    )
    written = []
    for name, draw in draws:
        try:
            path = draw(fig_dir / name)
        except Exception as e:  # a figure is a by-product: never fail the run for one
            log.warning("cssl_ray.evaluation.figures: %s not written (%s: %s)", name, type(e).__name__, e)
            continue
        if path is not None:
            written.append(path)
    return written


def _refinement_figure(state: FigureSource, bundle: DataBundle, path: Path) -> Path | None:
    if not state.snapshots or bundle.unlabelled_images.shape[0] == 0:
        return None
    k = state.snapshots[0][1].shape[0]
    hidden = bundle.unlabelled_masks_hidden
    return plot_pseudo_refinement(bundle.unlabelled_images[:k], None if hidden is None else hidden[:k],
                                  state.snapshots, bundle.class_names, path)


def _omega_figure(state: FigureSource, path: Path) -> Path | None:
    if not any(h.get("stage") == "round" and "omega" in h for h in state.history):
        return None
    return plot_omega(state.history, path)


def _embedding_figure(state: FigureSource, cfg: Config, bundle: DataBundle, path: Path, method: str) -> Path | None:
    seed = cfg.train.seed
    z, classes = val_patch_embeddings(state.model, cfg, bundle.val_images, bundle.val_masks, seed=seed)
    if z.shape[0] == 0:
        return None
    s = cfg.silhouette
    aux = None
    if state.aux is not None:  # one foreground class: omega's second cluster, as in training
        aux = state.aux.sample(z.shape[0], generator=torch.Generator().manual_seed(seed))
    omega = silhouette(z, classes, metric=s.metric, kind=s.kind, aux=aux)  # N <= 500: no subsample
    extra = f"silhouette ({s.kind}, {s.metric}) = {omega:.3f}" + (" incl. auxiliary class" if aux is not None else "")
    return plot_embeddings(z, classes, bundle.class_names, path, method=method, title_extra=extra)


# ---------------------------------------------------------------------------------------------
# Drawing helpers


def _figure(size: tuple[float, float]):
    """A Figure on the Agg canvas, outside pyplot (nothing global to clean up)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _legend(fig, entries: list[tuple[str, np.ndarray]]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colour, edgecolor="0.3", label=name) for name, colour in entries]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)


def _label_colours(num_classes: int) -> np.ndarray:
    """(256, 3) RGB lookup: background black, classes in tab10 order, ``IGNORE`` and ids past
    the classes grey."""
    from matplotlib import colormaps

    lut = np.full((256, 3), 0.6)
    lut[0] = 0.0
    tab = colormaps["tab10"].colors
    for c in range(1, min(num_classes, IGNORE)):
        lut[c] = tab[(c - 1) % len(tab)]
    return lut


def _evenly_spaced(n: int, most: int) -> list[int]:
    """At most ``most`` indices of ``range(n)``, evenly spaced, always 0 and n - 1."""
    if n <= most:
        return list(range(n))
    most = max(most, 2)
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def _display(img: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) grey or (H, W, 3) RGB in [0, 1], min-max scaled."""
    x = img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]
    x = x.astype(np.float64)
    lo, hi = np.nanmin(x), np.nanmax(x)
    return (x - lo) / (hi - lo) if hi > lo and math.isfinite(hi - lo) else np.zeros_like(x)


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
