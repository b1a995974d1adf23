"""``prunekit report OUT``: an HTML page with matplotlib plots of a filter run.

Plots: cluster size histogram; DBP complexity vs. quota; kept fraction per cluster (stacked
by drop reason); kept vs. dropped example images for a few clusters; duplicate pairs found
by SemDeDup (each dropped image next to its most similar earlier image). Tables: why rows
were dropped, the input problems (unreadable shards, undecodable or missing images with
example keys, odd member names) and each stage's parameters and summary. Writes
``OUT/report/index.html`` + PNGs. Reads only the artifacts (and, for the grids, the few
images shown: from the input shards, or by row index from the input Hugging Face dataset).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.datasets import recorded_image_cells

from .decode import DEFAULT_MAX_PIXELS, decode_image
from .embed import load_embed_artifact
from .stage import PipelineError, read_parquet
from .tario import IMAGE_EXTS, iter_shard


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stage(out: Path, name: str) -> dict:
    p = out / name / "_stage.json"
    return json.loads(p.read_text()) if p.exists() else {}


def thumbnail(data: bytes, limit_px: int) -> np.ndarray | None:
    """(h, w, 3) uint8 thumbnail of at most ``limit_px`` a side; None when undecodable or over the pixel cap."""
    try:
        im = decode_image(data, max_pixels=DEFAULT_MAX_PIXELS, draft_size=limit_px)
    except Exception:  # undecodable or too large: shown as missing
        return None
    im.thumbnail((limit_px, limit_px))
    return np.asarray(im)


def fetch_images(keep: pd.DataFrame, keys: list[str], limit_px: int = 96) -> dict:
    """Thumbnails of ``keys`` from their input shards (only those shards are read)."""
    want = set(keys)
    rows = keep[keep["key"].isin(want)]
    found = {}
    for shard in rows["shard"].unique():
        if not shard or not Path(shard).exists():
            continue
        for sample in iter_shard(shard):
            if sample.key in want:
                img = sample.get(IMAGE_EXTS)
                if img is not None and (thumb := thumbnail(img[1], limit_px)) is not None:
                    found[sample.key] = thumb
    return found


def fetch_dataset_images(
    embed_record: dict, keep: pd.DataFrame, keys: list[str], limit_px: int = 96
) -> tuple[dict, str]:
    """Thumbnails of ``keys`` from the Hugging Face dataset a run read (only their rows, by
    ``index``), and a note for the report ("" when every image could be read).

    embed_record: the embed stage's ``_stage.json``. A run on an embedding column (no image
    column), or a dataset that moved or changed since, gives no thumbnails and says why.
    """
    column = embed_record.get("params", {}).get("columns", {}).get("image")
    if not column:
        return {}, "the run read an embedding column (no image column): no example images to show"
    rows = keep[keep["key"].isin(set(keys))]
    try:
        cells = recorded_image_cells(embed_record["inputs"]["dataset"], column, rows["index"].tolist())
    except (PipelineError, OSError, ValueError) as exc:
        return {}, f"example images not shown: the input dataset cannot be read again ({exc})"
    found = {}
    for key, index in rows[["key", "index"]].itertuples(index=False):
        data = cells.get(int(index))
        if data is not None and (thumb := thumbnail(data, limit_px)) is not None:
            found[key] = thumb
    return found, ""


# per-row reasons that come from the input (not from a selection step): reason -> what it means
INPUT_REASONS = {
    "missing_image": "no image member",
    "undecodable": "image could not be decoded",
    "too_large": "image over --max-pixels",
    "no_image": "only links/devices (no data)",
    "non_utf8_name": "member name not UTF-8",
    "no_embedding": "no precomputed embedding",
}
# tar member counters of the embed summary: counter -> (what it means, prefix of its examples)
MEMBER_PROBLEMS = {
    "unsafe_names": ("member names with ../ or an absolute path (copied as they are)", "unsafe name:"),
    "special_members": ("link/device members (no data, not copied)", "special member:"),
    "skipped_members": ("members without an extension (ignored, like webdataset)", None),
}


def input_problems(summary: dict, keep: pd.DataFrame, examples: int = 3) -> list[tuple[str, int, list[str]]]:
    """What went wrong reading the input, as (problem, count, examples) rows: each unreadable
    shard (its one-line message), each input reason of the keep-list with a few keys and their
    shards, and the odd tar member names counted in the embed ``summary``."""
    rows = [("unreadable shard", 1, [msg]) for msg in summary.get("corrupt_shards", [])]
    for reason, label in INPUT_REASONS.items():
        hit = keep[keep["reason"] == reason]
        if len(hit):
            where = [
                f"{k} in {sh}" if sh else str(k)
                for k, sh in hit[["key", "shard"]].head(examples).itertuples(index=False)
            ]
            rows.append((f"{label} ({reason})", len(hit), where))
    notes = summary.get("name_examples", [])
    for counter, (label, prefix) in MEMBER_PROBLEMS.items():
        if summary.get(counter):
            shown = [n for n in notes if prefix and n.startswith(prefix)][:examples]
            rows.append((label, int(summary[counter]), shown))
    return rows


def problems_html(rows: list[tuple[str, int, list[str]]]) -> str:
    """The rows of :func:`input_problems` as an HTML table (a sentence when there are none)."""
    if not rows:
        return "<p>None: every input shard was read and every sample had a usable image.</p>"
    cells = "".join(
        f"<tr><td>{html.escape(problem)}</td><td>{count:,}</td>"
        f"<td>{'<br>'.join(html.escape(e) for e in shown)}</td></tr>"
        for problem, count, shown in rows
    )
    return f"<table><tr><th>problem</th><th>count</th><th>examples</th></tr>{cells}</table>"


def fields_html(record: dict, limit: int = 160) -> str:
    """A stage's params or summary as one ``name: value`` line per field (long values cut at
    ``limit`` characters; the input problems have their own table)."""
    lines = []
    for name, value in record.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        text = text if len(text) <= limit else text[: limit - 3] + "..."
        lines.append(f"<b>{html.escape(str(name))}</b>: {html.escape(text)}")
    return "<br>".join(lines)


def _grid(plt, path: Path, rows: list[tuple[str, list[tuple[str, str]]]], images: dict, per_row: int) -> None:
    """rows: (row title, [(key, caption)]) -> one PNG grid."""
    n_rows = max(len(rows), 1)
    fig, axes = plt.subplots(n_rows, per_row, figsize=(1.3 * per_row, 1.5 * n_rows + 0.3), squeeze=False)
    for r, (title, cells) in enumerate(rows):
        for c in range(per_row):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(cells):
                key, caption = cells[c]
                if key in images:
                    ax.imshow(images[key], cmap="gray")
                ax.set_title(caption, fontsize=6)
        axes[r][0].text(-0.1, 0.5, title, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: str | Path, *, clusters_shown: int = 4, images_per_row: int = 8, duplicate_pairs: int = 8
) -> Path:
    """Write ``OUT/report/index.html`` and its PNGs; returns the HTML path."""
    out = Path(out)
    keep_path = out / "select" / "keep.parquet"
    if not keep_path.exists():
        raise FileNotFoundError(f"{keep_path} not found: run `prunekit filter --out {out}` first")
    plt = _plt()
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    keep = read_parquet(keep_path, fix=f"rerun `prunekit filter --out {out}` with the same options to repair it")
    keep = keep.astype({"reason": str, "shard": str})  # stored as categoricals; plain labels here
    stats = {p.stem[len("stats_") :]: pd.read_parquet(p) for p in sorted((out / "select").glob("stats_*.parquet"))}
    emb_rows = keep[keep["cluster"] >= 0]
    k = int(json.loads((out / "cluster" / "_stage.json").read_text())["params"]["k"])
    sizes = np.bincount(emb_rows["cluster"], minlength=k)
    kept = np.bincount(emb_rows.loc[emb_rows["kept"], "cluster"], minlength=k)
    sections = []

    # 1. cluster sizes
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(sizes, bins=min(50, max(5, k // 2)), color="#4c72b0")
    ax.set_xlabel("rows per cluster")
    ax.set_ylabel("clusters")
    ax.set_title(f"cluster sizes (k={k})")
    fig.tight_layout()
    fig.savefig(rep / "cluster_sizes.png", dpi=110)
    plt.close(fig)
    sections.append(
        (
            "Cluster sizes",
            "cluster_sizes.png",
            f"median {np.median(sizes):.0f}, largest {sizes.max()}, empty {(sizes == 0).sum()}",
        )
    )

    # 2. complexity vs quota (DBP)
    dbp = next((df for name, df in stats.items() if name.endswith("dbp")), None)
    if dbp is not None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        frac = np.where(dbp["size"] > 0, dbp["quota"] / dbp["size"].clip(lower=1), np.nan)
        sc = ax.scatter(
            dbp["complexity"], dbp["quota"], c=frac, s=12 + 60 * dbp["size"] / max(dbp["size"].max(), 1), cmap="viridis"
        )
        fig.colorbar(sc, ax=ax, label="quota / cluster size")
        ax.set_xlabel("complexity  d_intra * d_inter")
        ax.set_ylabel("DBP quota (rows kept)")
        ax.set_title("DBP: complexity vs. quota")
        fig.tight_layout()
        fig.savefig(rep / "complexity_quota.png", dpi=110)
        plt.close(fig)
        sections.append(
            ("Complexity vs. quota (DBP)", "complexity_quota.png", "marker size: cluster size (after earlier steps)")
        )

    # 3. kept fraction per cluster, stacked by reason
    order = np.argsort(-sizes, kind="stable")
    reasons = sorted(set(emb_rows.loc[~emb_rows["kept"], "reason"]))
    fig, ax = plt.subplots(figsize=(min(12, 3 + 0.08 * k), 3.2))
    x = np.arange(k)
    bottom = kept[order] / np.maximum(sizes[order], 1)
    ax.bar(x, bottom, color="#55a868", label="kept", width=1.0)
    for reason in reasons:
        cnt = np.bincount(emb_rows.loc[emb_rows["reason"] == reason, "cluster"], minlength=k)
        part = cnt[order] / np.maximum(sizes[order], 1)
        ax.bar(x, part, bottom=bottom, label=reason, width=1.0)
        bottom = bottom + part
    ax.set_xlabel("clusters, largest first")
    ax.set_ylabel("fraction of cluster")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("kept fraction per cluster")
    fig.tight_layout()
    fig.savefig(rep / "kept_fraction.png", dpi=110)
    plt.close(fig)
    sections.append(("Kept fraction per cluster", "kept_fraction.png", ""))

    # 4. kept vs dropped examples for a few clusters
    shown = [int(c) for c in order[:clusters_shown] if sizes[c] > 0]
    half = max(images_per_row // 2, 1)
    grid_rows, want = [], []
    for c in shown:
        rows = emb_rows[emb_rows["cluster"] == c]
        cells = [(kk, "kept") for kk in rows.loc[rows["kept"], "key"].head(half)]
        cells += [
            (kk, r)
            for kk, r in rows.loc[~rows["kept"], ["key", "reason"]]
            .head(images_per_row - len(cells))
            .itertuples(index=False)
        ]
        grid_rows.append((f"cluster {c}\n{kept[c]}/{sizes[c]} kept", cells))
        want += [kk for kk, _ in cells]

    # 5. duplicate pairs: dropped row next to its most similar earlier row of the cluster
    pairs = _duplicate_pairs(out, keep, duplicate_pairs)
    want += [a for a, b, s in pairs] + [b for a, b, s in pairs]
    embed_record = _stage(out, "embed")
    if "dataset" in embed_record.get("inputs", {}):
        images, image_note = fetch_dataset_images(embed_record, keep, want)
    else:
        images, image_note = fetch_images(keep, want), ""
    for stale in ("examples.png", "duplicates.png"):  # an earlier report's grids, redrawn below if shown
        (rep / stale).unlink(missing_ok=True)
    if image_note:
        sections.append(("Example images", "", image_note))
    if grid_rows and not image_note:
        _grid(plt, rep / "examples.png", grid_rows, images, images_per_row)
        sections.append(
            ("Kept vs. dropped examples", "examples.png", f"the {len(grid_rows)} largest clusters: kept images first")
        )
    if pairs and not image_note:
        cells = [cell for a, b, s in pairs for cell in ((b, "earlier row"), (a, f"dropped, cos {s:.4f}"))]
        dup_rows = [
            (f"pairs {i // 2 + 1}-{min(i // 2 + 4, len(pairs))}", cells[i : i + 8]) for i in range(0, len(cells), 8)
        ]
        _grid(plt, rep / "duplicates.png", dup_rows, images, min(8, len(cells)))
        sections.append(
            (
                "Duplicates found",
                "duplicates.png",
                f"{int((keep['reason'] == 'duplicate').sum()):,} rows dropped as "
                "duplicates; a few of them next to their most similar earlier row",
            )
        )

    # HTML
    counts = keep["reason"].replace("", "(kept)").value_counts()
    rows_html = "".join(
        f"<tr><td>{html.escape(r)}</td><td>{n:,}</td><td>{100 * n / max(len(keep), 1):.1f}%</td></tr>"
        for r, n in counts.items()
    )
    stage_html = ""
    for name in ("embed", "cluster", "select", "write"):
        rec = _stage(out, name)
        if rec:
            params, summary = fields_html(rec.get("params", {})), fields_html(rec.get("summary", {}))
            stage_html += f"<tr><td>{name}</td><td>{params}</td><td>{summary}</td></tr>"
    body = [
        f"<h1>prunekit filter report</h1><p>{html.escape(str(out.resolve()))}: "
        f"{len(keep):,} samples, {int(keep['kept'].sum()):,} kept.</p>",
        f"<h2>Why rows were dropped</h2><table><tr><th>reason</th><th>rows</th><th>share</th></tr>{rows_html}</table>",
        f"<h2>Input problems</h2>{problems_html(input_problems(embed_record.get('summary', {}), keep))}",
        f"<h2>Stages</h2><table><tr><th>stage</th><th>params</th><th>summary</th></tr>{stage_html}</table>",
    ]
    for title, png, caption in sections:
        img = f"<img src='{png}' style='max-width:100%'>" if png else ""
        body.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p>{img}")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>prunekit report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;"
        "font-size:13px;vertical-align:top}</style></head><body>" + "\n".join(body) + "</body></html>"
    )
    path = rep / "index.html"
    path.write_text(page)
    return path


def _duplicate_pairs(out: Path, keep: pd.DataFrame, limit: int) -> list[tuple[str, str, float]]:
    """(dropped key, most similar earlier key, cosine) for up to ``limit`` duplicates."""
    dups = keep[keep["reason"] == "duplicate"]
    if dups.empty or limit <= 0:
        return []
    try:
        art = load_embed_artifact(out / "embed", "")
    except Exception:  # embeddings moved or deleted: skip the pairs
        return []
    assign = pd.read_parquet(out / "cluster" / "assign.parquet")
    key_of_row = dict(zip(keep["row"], keep["key"]))
    pairs = []
    for row, c in dups[["row", "cluster"]].head(limit).itertuples(index=False):
        members = assign[assign["cluster"] == c]
        members = members.sort_values(["sim", "row"], kind="stable")["row"].to_numpy()
        earlier = members[: int(np.flatnonzero(members == row)[0])]
        if earlier.size == 0:
            continue
        x = np.asarray(art.images[np.sort(earlier)], dtype=np.float32)
        q = np.asarray(art.images[np.array([row])], dtype=np.float32)[0]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q /= np.linalg.norm(q)
        sims = x @ q
        best = int(np.argmax(sims))
        pairs.append((key_of_row[row], key_of_row[int(np.sort(earlier)[best])], float(sims[best])))
    return pairs
