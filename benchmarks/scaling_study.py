"""Scaling study: which data-pruning method wins at which kept fraction, on real images.

Methods (all through the public ``dataprune`` API): random, SSP-hard, SSP-easy, DBP,
SemDeDup+DBP, random+KD (alpha = ``kd_alpha(f)``) and an alpha sweep of random+KD.
SSP/DBP run on two embeddings: ``ssl`` (a SimCLR-style encoder trained here on the unlabelled
training images) and ``sup`` (penultimate layer of the supervised teacher; SSP then uses
class-mean prototypes, the paper's "supervised prototypes" variant).

Resumable: everything lands under ``--cache-dir`` (decoded data, teacher weights, teacher
logits via ``TeacherLogitCache``, encoder weights, embeddings, one JSON per trained point),
keyed by a hash of the recipe, so an interrupted run continues where it stopped and a finished
one only re-renders the table and the plots.

    python benchmarks/scaling_study.py --quick --dataset mnist-test     # seconds, CI
    python benchmarks/scaling_study.py --dataset fashion-mnist          # full grid, hours
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dataprune import TeacherLogitCache, dbp, fill_teacher_cache, kd_alpha, random_subset, semdedup_sweep, ssp  # noqa: E402
from dataprune.train import accuracy, train_classifier  # noqa: E402
from prunecore import kmeans  # noqa: E402
from prunecore.io import atomic_path  # noqa: E402

ALL_METHODS = ("random", "random_kd", "ssp_hard", "ssp_easy", "dbp", "semdedup_dbp")
EMB_METHODS = ("ssp_hard", "ssp_easy", "dbp", "semdedup_dbp")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _shared_data() -> Path:
    """$PRUNEKIT_DATA, else ``../shared/data`` next to the repo (or next to its parent)."""
    import os

    env = os.environ.get("PRUNEKIT_DATA")
    for cand in ([Path(env)] if env else []) + [
        REPO.parent / "shared" / "data",
        REPO.parent.parent / "shared" / "data",
    ]:
        if cand.is_dir():
            return cand
    return REPO.parent / "shared" / "data"


SHARED = _shared_data()


# ----------------------------------------------------------------------------- data
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _need(paths, hint: str):
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise SystemExit(f"scaling_study: data files missing: {missing}. {hint}")


def load_fashion(data_dir: Path | None):
    d = Path(data_dir or FASHION_DIR)
    names = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    _need(
        [d / n for n in names],
        "Install them with `apt-get install -y dataset-fashion-mnist` "
        "(Debian) or pass --data-dir to a folder holding the four idx .gz files.",
    )
    xtr, ytr, xte, yte = (_read_idx(d / n) for n in names)
    return xtr[:, None], ytr, xte[:, None], yte


def load_mnist_test(data_dir: Path | None):
    """The 10k MNIST test digits split 8,000 train / 2,000 test (for the quick path / CI)."""
    d = Path(data_dir or SHARED / "mnist")
    names = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    _need([d / n for n in names], "Pass --data-dir to the folder with the MNIST t10k files.")
    x, y = (_read_idx(d / n) for n in names)
    return x[:8000, None], y[:8000], x[8000:, None], y[8000:]


def load_cifar10(data_dir: Path | None, cache: Path, n_test: int = 10000):
    """CIFAR-10 train shards (webdataset tars of JPEG); a seeded 10,000 are held out as test.

    Decoding 50k JPEGs once takes ~1 min; the uint8 arrays are cached as ``cifar10.npz``.
    """
    npz = cache / "cifar10_decoded.npz"
    if not npz.exists():
        from PIL import Image

        d = Path(data_dir or SHARED / "cifar10")
        shards = sorted(d.glob("cifar10-train-*.tar"))
        if not shards:
            raise SystemExit(
                f"scaling_study: no cifar10-train-*.tar shards in {d}; pass --data-dir to the webdataset folder."
            )
        images, labels = {}, {}
        for shard in shards:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, _, ext = member.name.rpartition(".")
                    if ext == "jpg":
                        img = Image.open(io.BytesIO(tar.extractfile(member).read()))
                        images[key] = np.asarray(img.convert("RGB"), dtype=np.uint8)
                    elif ext == "cls":
                        labels[key] = int(tar.extractfile(member).read().decode().strip())
        keys = sorted(images)
        x = np.stack([images[k] for k in keys]).transpose(0, 3, 1, 2)
        y = np.array([labels[k] for k in keys], dtype=np.uint8)
        with atomic_path(npz) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, x=x, y=y)
    data = np.load(npz)
    x, y = data["x"], data["y"]
    perm = np.random.default_rng(0).permutation(len(y))
    te, tr = perm[:n_test], np.sort(perm[n_test:])
    return x[tr], y[tr], x[np.sort(te)], y[np.sort(te)]


def prepare_data(args, cache: Path):
    if args.dataset == "fashion-mnist":
        xtr, ytr, xte, yte = load_fashion(args.data_dir)
    elif args.dataset == "mnist-test":
        xtr, ytr, xte, yte = load_mnist_test(args.data_dir)
    elif args.dataset == "cifar10":
        xtr, ytr, xte, yte = load_cifar10(args.data_dir, cache)
    else:
        raise SystemExit(f"unknown dataset {args.dataset!r}")
    if args.n_train:
        xtr, ytr = xtr[: args.n_train], ytr[: args.n_train]
    if args.n_test:
        xte, yte = xte[: args.n_test], yte[: args.n_test]
    xtr = torch.from_numpy(np.array(xtr)).float().div_(255)
    xte = torch.from_numpy(np.array(xte)).float().div_(255)
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return xtr, torch.from_numpy(ytr.astype(np.int64)), xte, torch.from_numpy(yte.astype(np.int64))


# ----------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    """3 stride-2 conv blocks (w, 2w, 4w channels) + global average pool + linear head.

    Strided convolutions instead of pooling keep it cheap on a CPU (28x28 -> 14 -> 7 -> 4).
    """

    def __init__(self, in_ch: int, n_classes: int, width: int = 8):
        super().__init__()

        def block(i, o):
            return [nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_ch, width),
            *block(width, 2 * width),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def augment_crop_flip(xb: torch.Tensor, gen: torch.Generator, flip: bool = True, pad: int = 2):
    """Random translation by up to ``pad`` pixels (zero padding) and horizontal flip."""
    n, _, h, w = xb.shape
    padded = F.pad(xb, (pad, pad, pad, pad))
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    out = padded[:, :, dy : dy + h, dx : dx + w]
    if flip:
        m = torch.rand(n, generator=gen) < 0.5
        out = torch.where(m[:, None, None, None], out.flip(3), out)
    return out


def simclr_views(xb: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """One SimCLR-style view per row: random scale/translate (affine crop), flip, contrast
    jitter and noise, vectorised with ``affine_grid``."""
    n = xb.shape[0]
    r = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    scale = 0.7 + 0.3 * r(n)
    sign = torch.where(r(n) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * sign
    theta[:, 1, 1] = scale
    theta[:, :, 2] = (r(n, 2) - 0.5) * 2 * (1 - scale[:, None]) + (r(n, 2) - 0.5) * 0.2
    grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
    out = F.grid_sample(xb, grid, padding_mode="zeros", align_corners=False)
    out = out * (0.6 + 0.8 * r(n, 1, 1, 1)) + 0.3 * (r(n, 1, 1, 1) - 0.5)
    return out + 0.1 * torch.randn(out.shape, generator=gen)


def train_simclr(
    x: torch.Tensor, *, width: int, epochs: int, batch_size: int, seed: int, flip: bool, temperature: float = 0.2
) -> nn.Module:
    """A SimCLR-style encoder (SmallCNN features + 2-layer projector, NT-Xent loss)."""
    torch.manual_seed(seed)
    enc = SmallCNN(x.shape[1], 10, width).features
    proj = nn.Sequential(nn.Linear(4 * width, 4 * width), nn.ReLU(), nn.Linear(4 * width, 32))
    params = list(enc.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    total = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1))
    enc.train(), proj.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch_size + 1, batch_size):
            xb = x[perm[s : s + batch_size]]
            z = F.normalize(proj(enc(torch.cat([simclr_views(xb, gen, flip), simclr_views(xb, gen, flip)]))), dim=1)
            sim = z @ z.T / temperature
            sim.fill_diagonal_(float("-inf"))
            b = xb.shape[0]
            target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
            loss = F.cross_entropy(sim, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return enc.eval()


@torch.inference_mode()
def embed(features: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    features.eval()
    return torch.cat([features(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]).numpy().astype(np.float32)


# ----------------------------------------------------------------------------- config
def recipe_of(args) -> dict:
    """Everything that changes a trained point (hashed into its cache key)."""
    keys = (
        "dataset",
        "n_train",
        "n_test",
        "width",
        "teacher_width",
        "epochs",
        "min_steps",
        "batch_size",
        "lr",
        "teacher_epochs",
        "ssl_epochs",
        "ssl_width",
        "k",
        "dbp_temp",
        "dedup_keep",
        "kd_temperature",
        "augment",
    )
    return {k: getattr(args, k) for k in keys}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------- study
def canonical(method, emb_kind, fraction, seed, alpha=None) -> dict:
    """The identity of a trained point. At f = 1 every pruning method keeps all rows (one
    "random" point serves them all); random+KD with alpha = 0 is plain random."""
    if method == "random_kd" and alpha is None:
        alpha = kd_alpha(fraction)
    alpha = round(float(alpha), 4) if method == "random_kd" else 0.0
    if fraction >= 1.0 and method != "random_kd" or method == "random_kd" and alpha == 0.0:
        method = "random"
    return {
        "method": method,
        "emb": emb_kind if method in EMB_METHODS else None,
        "fraction": float(fraction),
        "seed": int(seed),
        "alpha": alpha,
    }


class Study:
    def __init__(self, args):
        self.args = args
        self.recipe = recipe_of(args)
        self.root = Path(args.cache_dir).expanduser()
        self.dir = self.root / f"{args.dataset}-{digest(self.recipe)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "recipe.json", self.recipe)
        self.trained = 0  # points trained in this process (0 on a fully cached re-run)
        self.log(f"cache: {self.dir}")
        self.xtr, self.ytr, self.xte, self.yte = prepare_data(args, self.root)
        self.n = len(self.ytr)
        self.n_classes = int(max(self.ytr.max(), self.yte.max())) + 1
        self.flip = args.dataset != "mnist-test"  # digits are not flip-invariant
        self.log(f"data: train {tuple(self.xtr.shape)}, test {tuple(self.xte.shape)}")
        self.keys = [str(i) for i in range(self.n)]

    def log(self, msg):
        if not self.args.silent:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def augment(self):
        if not self.args.augment:
            return None
        return lambda xb, gen: augment_crop_flip(xb, gen, flip=self.flip)

    # -- teacher, its logits and penultimate embeddings
    def teacher(self) -> nn.Module:
        a = self.args
        path = self.dir / "teacher.pt"
        model = SmallCNN(self.xtr.shape[1], self.n_classes, a.teacher_width)
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        self.log("training teacher on all training rows")
        torch.manual_seed(a.seed_base)
        t0 = time.time()
        train_classifier(
            model,
            self.xtr,
            self.ytr,
            epochs=a.teacher_epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            seed=a.seed_base,
            augment=self.augment(),
        )
        acc = accuracy(model, self.xte, self.yte)
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
        write_json(self.dir / "teacher.json", {"test_acc": acc, "seconds": time.time() - t0})
        self.log(f"teacher test accuracy {acc:.4f}")
        return model.eval()

    def teacher_logits(self) -> TeacherLogitCache:
        cache = TeacherLogitCache.create(
            self.dir / "teacher_logits", self.keys, self.n_classes, storage_dtype="float32"
        )
        if not cache.complete:
            teacher = self.teacher()
            bs = 2048
            batches = ((self.keys[s : s + bs], self.xtr[s : s + bs]) for s in range(0, self.n, bs))
            fill_teacher_cache(cache, teacher, batches, progress=False)
        return cache

    def embeddings(self, kind: str) -> np.ndarray:
        a = self.args
        path = self.dir / f"emb_{kind}.npy"
        if path.exists():
            return np.load(path)
        if kind == "sup":
            emb = embed(self.teacher().features, self.xtr)
        elif kind == "ssl":
            self.log(f"training SimCLR-style encoder ({a.ssl_epochs} epochs)")
            t0 = time.time()
            enc = train_simclr(
                self.xtr,
                width=a.ssl_width,
                epochs=a.ssl_epochs,
                batch_size=256 if self.n >= 2048 else 128,
                seed=a.seed_base,
                flip=self.flip,
            )
            emb = embed(enc, self.xtr)
            write_json(self.dir / "ssl.json", {"seconds": time.time() - t0, "linear_probe_knn": self.knn_probe(enc)})
        else:
            raise ValueError(kind)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb)
        return emb

    def knn_probe(self, enc) -> float:
        """1-NN cosine accuracy of an encoder's features (test vs. train): a sanity number."""
        tr = F.normalize(torch.from_numpy(embed(enc, self.xtr)), dim=1)
        te = F.normalize(torch.from_numpy(embed(enc, self.xte)), dim=1)
        nn_idx = torch.cat([(te[s : s + 1024] @ tr.T).argmax(1) for s in range(0, len(te), 1024)])
        return float((self.ytr[nn_idx] == self.yte).float().mean())

    # -- selections
    def select(self, method: str, emb_kind: str | None, fraction: float, seed: int):
        """Kept row indices (sorted) and info for one method at one fraction."""
        a = self.args
        n_keep = int(round(fraction * self.n))
        info = {}
        if fraction >= 1.0:
            return np.arange(self.n), info
        if method in ("random", "random_kd"):
            return random_subset(self.n, n_keep, seed=seed).indices, info
        emb = self.embeddings(emb_kind)
        k = min(a.k, self.n // 4)
        if method in ("ssp_hard", "ssp_easy"):
            order = method.split("_")[1]
            labels = self.ytr.numpy() if emb_kind == "sup" else None
            sel = ssp(emb, n_keep, k=None if labels is not None else k, order=order, labels=labels, device="cpu")
            return sel.indices, info
        if method == "dbp":
            sel = dbp(emb, n_keep, k=k, temperature=a.dbp_temp, device="cpu")
            p = sel.stats["dbp"]["p"]
            info["dbp_p_max_over_min"] = float(p.max() / p.min())
            return sel.indices, info
        if method == "semdedup_dbp":
            dedup, eps = self.dedup(emb_kind)
            rows = dedup.indices
            info["semdedup_eps"] = eps
            info["semdedup_kept"] = int(rows.size)
            if rows.size <= n_keep:
                return rows, info
            sub = dbp(emb[rows], n_keep, k=min(k, rows.size // 4), temperature=a.dbp_temp, device="cpu")
            return (dedup & sub.lift(rows, self.n)).indices, info
        raise ValueError(f"unknown method {method!r}")

    def dedup(self, emb_kind: str):
        """SemDeDup with eps picked from one multi-eps pass so ~``dedup_keep`` rows stay."""
        if not hasattr(self, "_dedup"):
            self._dedup = {}
        if emb_kind not in self._dedup:
            emb = self.embeddings(emb_kind)
            clustering = kmeans(emb, min(self.args.k, self.n // 4), seed=1234, device="cpu")
            eps_grid = [float(e) for e in np.round(np.geomspace(1e-4, 0.5, 40), 6)]
            sels = semdedup_sweep(emb, eps_grid, clustering=clustering, device="cpu")
            kept = np.array([sels[e].n_kept for e in eps_grid]) / self.n
            best = eps_grid[int(np.argmin(np.abs(kept - self.args.dedup_keep)))]
            self._dedup[emb_kind] = (sels[best], best)
        return self._dedup[emb_kind]

    # -- one trained point
    def point(self, method: str, emb_kind: str | None, fraction: float, seed: int, alpha: float | None = None) -> dict:
        a = self.args
        spec = canonical(method, emb_kind, fraction, seed, alpha)
        path = self.dir / "points" / f"{digest(spec)}.json"
        if path.exists():
            return json.loads(path.read_text())
        t0 = time.time()
        rows, info = self.select(spec["method"], spec["emb"], fraction, seed)
        idx = torch.from_numpy(rows)
        teacher = None
        if spec["method"] == "random_kd":
            teacher = self.teacher_logits().read([self.keys[i] for i in rows])
        torch.manual_seed(seed)
        model = SmallCNN(self.xtr.shape[1], self.n_classes, a.width)
        hist = train_classifier(
            model,
            self.xtr[idx],
            self.ytr[idx],
            epochs=a.epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            min_steps=a.min_steps,
            seed=seed,
            teacher_logits=teacher,
            alpha=spec["alpha"],
            temperature=a.kd_temperature,
            augment=self.augment(),
        )
        acc = accuracy(model, self.xte, self.yte)
        result = {
            **spec,
            **info,
            "n_kept": int(rows.size),
            "test_acc": acc,
            "steps": hist["steps"],
            "train_loss": hist["loss"],
            "seconds": round(time.time() - t0, 2),
        }
        write_json(path, result)
        self.trained += 1
        self.log(
            f"{spec['method']:<13s} emb={spec['emb']!s:<4s} f={fraction:<4} "
            f"seed={seed} alpha={spec['alpha']:<6} acc={acc:.4f} "
            f"({hist['steps']} steps, {result['seconds']:.0f}s)"
        )
        return result

    def plan(self):  # noqa: C901
        """The list of points to train, cheapest first (so a cut run still has all methods
        at the small fractions)."""
        a = self.args
        points = []
        for f in sorted(a.fractions):
            for seed in a.seeds:
                for m in a.methods:
                    if m in EMB_METHODS:
                        points += [(m, e, f, seed, None) for e in a.embeddings]
                    else:
                        points.append((m, None, f, seed, None))
            for seed in a.extra_seeds:
                if f <= a.cheap_fraction:
                    for m in a.methods:
                        if m not in a.extra_seed_methods:
                            continue
                        if m in EMB_METHODS:
                            points += [(m, e, f, seed, None) for e in a.embeddings]
                        else:
                            points.append((m, None, f, seed, None))
        for f in a.sweep_fractions:
            for alpha in a.sweep_alphas:
                points.append(("random_kd", None, f, a.seeds[0], alpha))
        seen, unique = set(), []
        for p in points:
            key = json.dumps(canonical(*p), sort_keys=True)
            if key not in seen:
                seen.add(key)
                unique.append(p)
        return unique

    def run(self):
        results = [self.point(*p) for p in self.plan()]
        return results


# ----------------------------------------------------------------------------- reporting
def aggregate(results, fractions):
    """{(label): {fraction: (mean, std, n)}} with f=1 shared by all pruning methods."""
    groups = {}
    for r in results:
        label = r["method"] if r["emb"] is None else f"{r['method']}[{r['emb']}]"
        groups.setdefault(label, {}).setdefault(r["fraction"], []).append(r["test_acc"])
    return {
        label: {f: (float(np.mean(v)), float(np.std(v)), len(v)) for f, v in by_f.items()}
        for label, by_f in groups.items()
    }


def split_default_alpha(results):
    """(points at the default kd_alpha or non-KD, random+KD points at other alphas)."""
    main, sweep = [], []
    for r in results:
        is_default = r["method"] != "random_kd" or abs(r["alpha"] - round(kd_alpha(r["fraction"]), 4)) < 1e-9
        (main if is_default else sweep).append(r)
    return main, sweep


def alpha_grid(results, seed: int = 0):
    """{fraction: {alpha: acc}} over seed ``seed``: random+KD points, plain random as alpha 0."""
    grid = {}
    for r in results:
        if r["seed"] == seed and r["method"] in ("random", "random_kd"):
            grid.setdefault(r["fraction"], {})[r["alpha"]] = r["test_acc"]
    return grid


def table(results, fractions, methods_order) -> str:
    main, sweep = split_default_alpha(results)
    agg = aggregate(main, fractions)
    full = agg.get("random", {}).get(1.0)
    fr = sorted(fractions)
    lines = ["| method | " + " | ".join(f"{int(round(100 * f))}%" for f in fr) + " |", "|---|" + "---|" * len(fr)]
    for label in methods_order:
        if label not in agg:
            continue
        cells = []
        for f in fr:
            v = agg[label].get(f)
            if v is None and f >= 1.0 and full is not None and not label.startswith("random"):
                v = full
            cells.append(
                "–" if v is None else (f"{100 * v[0]:.2f}" + (f" ± {100 * v[1]:.2f} (n={v[2]})" if v[2] > 1 else ""))
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    if sweep:
        grid = alpha_grid(results)
        sweep_fracs = sorted({r["fraction"] for r in sweep})
        alphas = sorted({al for f in sweep_fracs for al in grid[f]})
        out += (
            "\n\nrandom+KD alpha sweep (seed 0; test accuracy %; α=0 is plain random; default kd_alpha marked *):\n\n"
        )
        out += "| fraction | " + " | ".join(f"α={al:g}" for al in alphas) + " | best α |\n"
        out += "|---|" + "---|" * (len(alphas) + 1) + "\n"
        for f in sweep_fracs:
            d = grid[f]
            dflt = round(kd_alpha(f), 4)
            cells = [("–" if al not in d else f"{100 * d[al]:.2f}" + ("*" if al == dflt else "")) for al in alphas]
            best = max(d, key=d.get)
            out += f"| {int(round(100 * f))}% | " + " | ".join(cells) + f" | {best:g} |\n"
    return out


def method_labels(args):
    labels = []
    for m in args.methods:
        if m in EMB_METHODS:
            labels += [f"{m}[{e}]" for e in args.embeddings]
        else:
            labels.append(m)
    return labels


def plot(results, args, out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main, sweep = split_default_alpha(results)
    agg = aggregate(main, args.fractions)
    full = agg.get("random", {}).get(1.0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in method_labels(args):
        if label not in agg:
            continue
        pts = dict(agg[label])
        if 1.0 not in pts and full is not None and not label.startswith("random"):
            pts[1.0] = full
        fs = sorted(pts)
        mean = np.array([pts[f][0] for f in fs]) * 100
        std = np.array([pts[f][1] for f in fs]) * 100
        style = "--" if "[sup]" in label else "-"
        ax.errorbar(np.array(fs) * 100, mean, yerr=std, fmt=style + "o", ms=3, capsize=2, label=label, lw=1.2)
    ax.set_xlabel("kept fraction of the training set (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{args.dataset}: accuracy vs. kept fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    acc_png = out_dir / f"scaling_{args.dataset}_accuracy.png"
    fig.savefig(acc_png, dpi=90)
    plt.close(fig)
    pngs = [acc_png]
    grid_acc = alpha_grid(results)
    if any(r["method"] == "random_kd" for r in results):
        fs = sorted(f for f in grid_acc if len(grid_acc[f]) > 1)
        swept = [f for f in fs if len(grid_acc[f]) > 2]  # a "best alpha" needs a real sweep
        best = [max(grid_acc[f], key=grid_acc[f].get) for f in swept]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        grid = np.linspace(0.05, 1.0, 100)
        ax.plot(grid * 100, [kd_alpha(f) for f in grid], "k-", lw=1, label="kd_alpha(f) default")
        for f in fs:
            als = sorted(grid_acc[f])
            accs = np.array([grid_acc[f][al] for al in als])
            ax.scatter([f * 100] * len(als), als, c=accs, cmap="viridis", s=30, zorder=3)
            for al, acc in zip(als, accs):
                ax.annotate(f"{100 * acc:.1f}", (f * 100, al), fontsize=6, xytext=(4, -2), textcoords="offset points")
        ax.plot(np.array(swept) * 100, best, "rs", ms=9, mfc="none", label="best α measured")
        ax.set_xlabel("kept fraction (%)")
        ax.set_ylabel("KD weight α")
        ax.set_title(f"{args.dataset}: KD weight vs. kept fraction")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        alpha_png = out_dir / f"scaling_{args.dataset}_alpha.png"
        fig.savefig(alpha_png, dpi=90)
        plt.close(fig)
        pngs.append(alpha_png)
    return pngs


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "cifar10", "mnist-test"])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--cache-dir", default="~/.cache/prunekit/scaling_study")
    p.add_argument("--n-train", type=int, default=0, help="first N training rows (0 = all)")
    p.add_argument("--n-test", type=int, default=0, help="first N test rows (0 = all)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--embeddings", nargs="+", default=["ssl", "sup"], choices=["ssl", "sup"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--extra-seeds",
        type=int,
        nargs="*",
        default=[1, 2],
        help="more seeds for --extra-seed-methods at fractions <= --cheap-fraction",
    )
    p.add_argument("--extra-seed-methods", nargs="+", default=["random", "random_kd"], choices=ALL_METHODS)
    p.add_argument("--cheap-fraction", type=float, default=0.3)
    p.add_argument("--sweep-fractions", type=float, nargs="*", default=[0.1, 0.7])
    p.add_argument("--sweep-alphas", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--width", type=int, default=16, help="student SmallCNN width")
    p.add_argument("--teacher-width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--min-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--ssl-epochs", type=int, default=10)
    p.add_argument("--ssl-width", type=int, default=16)
    p.add_argument("--k", type=int, default=100, help="k-means clusters for SSP / DBP / SemDeDup")
    p.add_argument("--dbp-temp", type=float, default=0.1)
    p.add_argument(
        "--dedup-keep", type=float, default=0.9, help="SemDeDup eps is picked so about this fraction survives dedup"
    )
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--augment", action="store_true", help="random shift(+flip) for students")
    p.add_argument("--seed-base", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plots", type=Path, default=None, help="folder for the PNG plots")
    p.add_argument("--results-json", type=Path, default=None)
    p.add_argument(
        "--report-cached",
        action="store_true",
        help="table/plots over every cached point of this recipe, not just the grid",
    )
    p.add_argument("--quick", action="store_true", help="tiny slice, seconds (CI)")
    p.add_argument("--silent", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train = args.n_train or 800
        args.n_test = args.n_test or 400
        args.fractions = [0.5, 1.0]
        args.seeds, args.extra_seeds, args.cheap_fraction = [0], [1], 0.5
        args.sweep_fractions, args.sweep_alphas = [0.5], [0.0, 0.5]
        args.width = args.teacher_width = args.ssl_width = 4
        args.epochs, args.min_steps, args.teacher_epochs, args.ssl_epochs = 1, 4, 1, 1
        args.batch_size, args.k = 64, 8
    for f in args.fractions + args.sweep_fractions:
        if not 0 < f <= 1:
            raise SystemExit(f"fractions must be in (0, 1], got {f}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(1)  # faiss's and torch's OpenMP pools spin against each other
    study = Study(args)
    t0 = time.time()
    results = study.run()
    if args.report_cached:  # every point of this recipe trained so far, from any grid
        results = [json.loads(f.read_text()) for f in sorted((study.dir / "points").glob("*.json"))]
        results = [r for r in results if r["fraction"] in args.fractions or r["method"] == "random_kd"]
    md = table(results, args.fractions, method_labels(args))
    teacher = json.loads((study.dir / "teacher.json").read_text()) if (study.dir / "teacher.json").exists() else {}
    ssl = json.loads((study.dir / "ssl.json").read_text()) if (study.dir / "ssl.json").exists() else {}
    header = (
        f"## {args.dataset}: test accuracy (%) vs. kept fraction\n\n"
        f"train rows {study.n}, test rows {len(study.yte)}; teacher acc "
        f"{100 * teacher.get('test_acc', float('nan')):.2f}; SSL encoder 1-NN probe "
        f"{100 * ssl.get('linear_probe_knn', float('nan')):.2f}; points trained now "
        f"{study.trained}; {time.time() - t0:.0f}s\n"
    )
    print(header)
    print(md)
    if args.plots:
        for png in plot(results, args, args.plots):
            print(f"plot: {png}")
    if args.results_json:
        write_json(args.results_json, {"recipe": study.recipe, "results": results, "teacher": teacher, "ssl": ssl})
    return {"results": results, "table": md, "trained": study.trained, "study": study}


if __name__ == "__main__":
    main()
