"""Benchmark: what one random image read from the dataset store decodes, row groups of 16 rows (store
format 1) against row groups closed by bytes (format 2, ``cssl_ray.data.store.group_full``), in one run.

    python benchmarks/store_reads.py [--geometry monuseg|nuclei|smoke] [--images 64] [--reads 32]
                                     [--json benchmarks/results/store_reads.json]

Both files hold the same rows, written by pyarrow with the project's schema, compression and
statistics settings; only where the row groups close differs. A read is ``Store.arrays([i])`` on a
fresh ``Store`` (no process cache) for ``--reads`` random rows; per read we count the uncompressed
bytes of the row group that must be decoded (the Parquet footer's ``total_byte_size``: what a read of
one row costs in decoding and memory) and time it. Images: random float32 at the geometry of
``--geometry``: ``monuseg`` (RGB 512 x 512: the issue's 10k-image case), ``nuclei`` (grey 256 x 256,
the bundled default) or ``smoke`` (grey 32 x 32). Also reported: the footer size every opening
process reads, which grows with the number of row groups.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cssl_ray.data.store import METADATA_KEY, SCHEMA, STATISTICS_COLUMNS, Store, group_full  # noqa: E402

GEOMETRIES = {"monuseg": (3, 512, 512), "nuclei": (1, 256, 256), "smoke": (1, 32, 32)}
OLD_ROWS_PER_GROUP = 16  # store format 1


def _rows(n: int, shape: tuple[int, int, int], seed: int = 0) -> list[dict]:
    c, h, w = shape
    rng = np.random.default_rng(seed)
    return [{"name": f"img{i:05d}", "group": f"g{i // 4}", "subset": "train", "height": h, "width": w, "channels": c,
             "image": rng.random((c, h, w), dtype=np.float32).tobytes(),
             "mask": rng.integers(0, 3, (h, w), dtype=np.uint8).tobytes(), "digest": f"{i:040d}", "source": "bench"}
            for i in range(n)]


def _write(path: Path, rows: list[dict], by_bytes: bool) -> None:
    with pq.ParquetWriter(path, SCHEMA, compression="zstd", write_statistics=STATISTICS_COLUMNS) as writer:
        group: list[dict] = []
        size = 0
        for row in rows:
            group.append(row)
            size += len(row["image"]) + len(row["mask"])
            if (group_full(len(group), size) if by_bytes else len(group) >= OLD_ROWS_PER_GROUP):
                writer.write_table(pa.Table.from_pylist(group, schema=SCHEMA))
                group, size = [], 0
        if group:
            writer.write_table(pa.Table.from_pylist(group, schema=SCHEMA))
        writer.add_key_value_metadata({METADATA_KEY: json.dumps({"benchmark": "store_reads"}).encode()})


def _measure(path: Path, reads: list[int], row_bytes: int) -> dict:
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    starts = np.cumsum([0] + sizes)
    decoded, seconds = [], []
    for i in reads:
        g = int(np.searchsorted(starts, i, side="right") - 1)
        decoded.append(meta.row_group(g).total_byte_size)
        t0 = time.perf_counter()
        images, _ = Store(path).arrays([i])
        seconds.append(time.perf_counter() - t0)
        if images[0].size == 0:
            raise RuntimeError(f"{path}: row {i} read back empty")
    return {"row_groups": meta.num_row_groups, "rows_per_group_max": max(sizes),
            "footer_bytes": meta.serialized_size, "file_bytes": path.stat().st_size,
            "decoded_bytes_per_read": float(np.mean(decoded)), "amplification": float(np.mean(decoded)) / row_bytes,
            "read_ms_median": 1e3 * float(np.median(seconds))}


def run(geometry: str, n_images: int, n_reads: int) -> dict:
    shape = GEOMETRIES[geometry]
    rows = _rows(n_images, shape)
    row_bytes = len(rows[0]["image"]) + len(rows[0]["mask"])
    reads = np.random.default_rng(1).integers(0, n_images, n_reads).tolist()
    with tempfile.TemporaryDirectory() as d:
        old, new = Path(d) / "old.parquet", Path(d) / "new.parquet"
        _write(old, rows, by_bytes=False)
        _write(new, rows, by_bytes=True)
        before, now = _measure(old, reads, row_bytes), _measure(new, reads, row_bytes)
    return {"geometry": geometry, "shape": list(shape), "images": n_images, "reads": n_reads, "row_bytes": row_bytes,
            "before": before, "now": now,
            "decoded_ratio": before["decoded_bytes_per_read"] / now["decoded_bytes_per_read"],
            "time_ratio": before["read_ms_median"] / max(now["read_ms_median"], 1e-9)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), action="append",
                   help="image geometry (repeatable; default monuseg and nuclei)")
    p.add_argument("--images", type=int, default=64, help="rows in each store")
    p.add_argument("--reads", type=int, default=32, help="random single-row reads per store")
    p.add_argument("--json", default="benchmarks/results/store_reads.json", help="where to write the figures")
    args = p.parse_args(argv)
    out = {"runs": [run(g, args.images, args.reads) for g in args.geometry or ["monuseg", "nuclei"]]}
    for r in out["runs"]:
        b, n = r["before"], r["now"]
        print(f"{r['geometry']} {'x'.join(map(str, r['shape']))}: one image read decodes "
              f"{b['decoded_bytes_per_read'] / 2**20:.2f} MiB in 16-row groups, {n['decoded_bytes_per_read'] / 2**20:.2f} MiB "
              f"now ({r['decoded_ratio']:.1f}x fewer bytes; {b['amplification']:.1f}x -> {n['amplification']:.1f}x the row); "
              f"median read {b['read_ms_median']:.1f} -> {n['read_ms_median']:.1f} ms ({r['time_ratio']:.1f}x); "
              f"footer {b['footer_bytes'] / 1024:.0f} -> {n['footer_bytes'] / 1024:.0f} KiB for {r['images']} images")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
