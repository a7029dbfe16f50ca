"""Prepare datasets into the Parquet store and list them.

    python -m cssl_ray.data prepare nuclei                       # downloads the wheel, native sizes
    python -m cssl_ray.data prepare monuseg --root ~/data/monuseg --size 256 256
    python -m cssl_ray.data prepare --config configs/nuclei.yaml  # exactly what that run will read
    python -m cssl_ray.data list                                  # datasets, and which are prepared

Bad input (a missing folder, an unreadable file, a class id out of range, ...) exits with code 2
and one line naming the file and the problem; nothing half-written stays in the cache.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

PROG = "python -m cssl_ray.data"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        print(f"{PROG}: error: {message} (see {PROG} {{prepare,list}} --help)", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    pp = sub.add_parser("prepare", help="read a dataset once into the cache and print its summary")
    pp.add_argument("name", nargs="?", help="dataset card name (see 'list'); default: data.name of --config")
    pp.add_argument("--config", help="take name, root, cache, size, channels, normalise from this run config")
    pp.add_argument("--root", help="the dataset's folder (default data/<name>; nuclei: downloaded)")
    pp.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), help="resize to H x W (default: native)")
    pp.add_argument("--channels", type=int, choices=(1, 3), help="stored channels (default: the card's; 1 for folder)")
    pp.add_argument("--normalise", default=None, help="auto (the card's), percentile, scale, jsrt12 or none")
    pp.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="reader option, e.g. --option sequence=T1DUAL (CHAOS), optic_disc=true (IDRiD)")
    pp.add_argument("--cache", help="cache folder (default $CSSL_RAY_CACHE or ~/.cache/cssl_ray); an s3://, gs:// "
                    "or file:// URI is read-only: the prepared file is looked up there")
    pp.add_argument("--force", action="store_true", help="prepare again even if cached")
    pp.add_argument("--quiet", action="store_true", help="no progress bar")
    pl = sub.add_parser("list", help="the datasets (cards) and whether each is prepared")
    pl.add_argument("--cache", help="cache folder (default $CSSL_RAY_CACHE or ~/.cache/cssl_ray)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from cssl_ray.config import ConfigError
    from cssl_ray.data.cards import CardError
    from cssl_ray.data.sample import DatasetError
    try:
        if args.command == "prepare":
            return _prepare(args)
        return _list(args)
    except (DatasetError, CardError, ConfigError, ValueError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was left in the cache", file=sys.stderr)
        return 130


def _prepare(args: argparse.Namespace) -> int:
    from cssl_ray.data.prepare import prepare
    from cssl_ray.data.summary import pixel_shares
    name, root, cache, size, channels, normalise = args.name, args.root, args.cache, args.size, args.channels, args.normalise
    if args.config:
        from cssl_ray.config import load_config
        d = load_config(args.config).data
        name = name or d.name
        root, cache = root or d.root or None, cache or d.cache_dir or None
        size = size or list(d.image_size)
        channels, normalise = channels or d.in_channels, normalise or d.normalise
    if not name:
        raise ValueError("prepare: name a dataset (see 'list') or pass --config")
    if size is not None and min(size) < 1:
        raise ValueError(f"--size: {size[0]} {size[1]}: both sides must be >= 1")
    options = _options(args.option)
    store = prepare(name, root, size=tuple(size) if size else None, channels=channels,
                    normalise=normalise or "auto", options=options, cache=cache, force=args.force,
                    progress=not args.quiet)
    s, classes = store.summary, store.classes
    how = f"prepared in {store.meta.get('seconds', 0):.1f} s" if store.fresh else "cached"
    if isinstance(store.path, Path):  # a remote cache's store (a URI) is only read
        how = f"{store.path.stat().st_size / 1e6:.1f} MB, {how}"
    print(f"{store.meta['dataset']}: {store.num_rows} images -> {store.path} ({how})")
    subsets = sorted(s["images"], key=lambda k: ("train", "val", "test", "unassigned").index(k)
                     if k in ("train", "val", "test", "unassigned") else 9)
    print(f"  {'subset':<11}{'images':>7}{'masks':>7}")
    for k in subsets:
        print(f"  {k:<11}{s['images'][k]:>7}{s['labelled'].get(k, 0):>7}")
    print("  classes: " + ", ".join(f"{i} {c}" for i, c in enumerate(classes)))
    for k in subsets:
        shares = pixel_shares(s, k)
        if shares:
            print(f"  pixel share ({k}): " + "  ".join(f"{c} {v:.3g}%" for c, v in zip(classes, shares)))
    if s.get("passed_over"):
        print("  passed over: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["passed_over"].items())))
    return 0


def _options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in items:
        if "=" not in text:
            raise ValueError(f"--option {text!r}: expected KEY=VALUE")
        key, raw = text.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _list(args: argparse.Namespace) -> int:
    from cssl_ray.data.cache import cache_dir, list_prepared, remote_cache
    from cssl_ray.data.cards import card_names, load_card
    from cssl_ray.data.sources import WHEEL_FORMATS, default_root
    prepared: dict[str, list[Any]] = {}
    for store in list_prepared(args.cache):
        prepared.setdefault(store.meta["dataset"], []).append(store)
    print(f"cache: {remote_cache(args.cache) or cache_dir(args.cache)}")
    for name in card_names():
        card = load_card(name)
        if card.format in (*WHEEL_FORMATS, "synthetic"):
            source = "no download needed"
        else:
            root = default_root(name)
            source = f"{_short(root)} {'found' if root.exists() else 'missing (or pass --root)'}"
        entries = prepared.get(name, [])
        state = ", ".join(_describe(s) for s in entries) if entries else "not prepared"
        print(f"  {name:<10} {card.metric:<6} {len(card.classes) if card.classes else '?':>2} classes  "
              f"{state}  [{source}]")
    return 0


def _describe(store: Any) -> str:
    size = store.meta["preprocessing"]["size"]
    return f"prepared {'x'.join(map(str, size)) if size else 'native'} ({store.num_rows} images)"


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
