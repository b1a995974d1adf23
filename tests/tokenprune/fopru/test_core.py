"""tokenprune.fopru.core: scores, rank/row selection, budgets, validation (brute-force references)."""

import itertools

import pytest
import torch

from tokenprune import fopru_scores, fopru_select
from tokenprune.fopru.core import check_token_keep, merge_grid_scores, per_image_keep, select_per_image


def _softmax_attn(b=2, h=3, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, n, generator=g).softmax(-1)


# ---------------------------------------------------------------- scores
def test_cls_scores_match_loop():
    a = _softmax_attn()
    s = fopru_scores(a, method="cls")
    ref = torch.zeros(2, 9)
    for bi, j in itertools.product(range(2), range(1, 10)):
        ref[bi, j - 1] = sum(a[bi, hh, 0, j] for hh in range(3)) / 3
    torch.testing.assert_close(s, ref)
    # rows-only input gives the same
    torch.testing.assert_close(fopru_scores(a[:, :, 0, :], method="cls"), ref)


def test_colmean_scores_match_loop():
    a = _softmax_attn(n=6)
    s = fopru_scores(a, method="colmean")
    assert s.shape == (2, 6)
    ref = torch.zeros(2, 6)
    for bi, j in itertools.product(range(2), range(6)):
        ref[bi, j] = sum(a[bi, hh, i, j] for hh in range(3) for i in range(6)) / 18
    torch.testing.assert_close(s, ref)
    torch.testing.assert_close(fopru_scores(a.mean(2), method="colmean"), ref)
    torch.testing.assert_close(fopru_scores(a, method="colmean", num_prefix=1), ref[:, 1:])


def test_scores_errors():
    with pytest.raises(ValueError, match="unknown method"):
        fopru_scores(_softmax_attn(), method="foo")
    with pytest.raises(ValueError, match="shape"):
        fopru_scores(torch.rand(4, 4))
    with pytest.raises(TypeError, match="floating"):
        fopru_scores(torch.ones(1, 1, 3, 3, dtype=torch.long))
    bad = _softmax_attn()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fopru_scores(bad)
    with pytest.raises(ValueError, match="CLS"):
        fopru_scores(_softmax_attn(), method="cls", num_prefix=0)
    with pytest.raises(ValueError, match="square"):
        fopru_scores(torch.rand(1, 2, 3, 5).softmax(-1))


# ---------------------------------------------------------------- keep
def test_budget_is_the_one_rule():
    """K = floor(keep * N + 0.5) (prunecore.budget.keep_count); keep=0.5 of 5 is 3 (it was 2 with
    FoPru's own round-half-even rule before the layout change)."""
    s = torch.rand(2, 576)
    assert fopru_select(s, 0.25).shape == (2, 144)
    assert fopru_select(s, 1.0).shape == (2, 576)
    assert fopru_select(s, 10).shape == (2, 10)
    assert fopru_select(torch.rand(1, 5), 0.5).shape == (1, 3)
    for bad in (0, 577, -1):
        with pytest.raises(ValueError, match="outside|gives 0|>= 0"):
            fopru_select(s, bad)
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            fopru_select(s, bad)
    with pytest.raises(ValueError, match="gives 0"):
        fopru_select(torch.rand(1, 10), 0.01)
    with pytest.raises(TypeError):
        fopru_select(s, True)
    with pytest.raises(TypeError):
        fopru_select(s, "half")
    check_token_keep(0.5)
    check_token_keep(3)
    with pytest.raises(ValueError, match="at least 1"):
        check_token_keep(0)
    with pytest.raises(ValueError, match="fraction"):
        check_token_keep(2.0)


def test_per_image_keep_and_select():
    assert per_image_keep(0.5, 3) == [0.5, 0.5, 0.5]
    assert per_image_keep([1, 0.5], 2) == [1, 0.5]
    with pytest.raises(ValueError, match="entries"):
        per_image_keep([0.5], 2)
    with pytest.raises(TypeError, match="tensor"):
        per_image_keep(torch.tensor([0.5]), 1)
    s = torch.rand(3, 16, generator=torch.Generator().manual_seed(4))
    got = select_per_image(s, [0.25, 5, 4])
    assert [g.tolist() for g in got] == [fopru_select(s[i : i + 1], k)[0].tolist() for i, k in enumerate([4, 5, 4])]


# ---------------------------------------------------------------- rank
def test_rank_is_sorted_topk():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(4, 50, generator=g)
    for keep in (1, 7, 0.5, 50):
        idx = fopru_select(s, keep)
        k = keep if isinstance(keep, int) else int(keep * 50 + 0.5)
        assert idx.shape == (4, k) and idx.dtype == torch.long
        for bi in range(4):
            ref = sorted(sorted(range(50), key=lambda j: -float(s[bi, j]))[:k])
            assert idx[bi].tolist() == ref


def test_rank_ties_toward_lower_index():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert fopru_select(s, 2).tolist() == [[1, 2]]


# ---------------------------------------------------------------- row modes
def _grid_scores():
    # 4x5 grid; row sums: r0=5, r1=50, r2=14, r3=0.5; distinct token values
    g = torch.tensor(
        [
            [1.0, 1.1, 0.9, 1.2, 0.8],
            [10.0, 9.0, 11.0, 8.0, 12.0],
            [3.0, 2.0, 4.0, 1.0, 4.5],
            [0.1, 0.2, 0.05, 0.1 + 1e-3, 0.049],
        ]
    )
    return g.reshape(1, 20)


def test_row_rows_mode_hand_grid():
    s = _grid_scores()
    # K=7: whole best row (row 1 -> 5..9) + 2 best tokens of row 2 (cols 4 and 2 -> 14, 12)
    assert fopru_select(s, 7, strategy="row", grid=(4, 5)).tolist() == [[5, 6, 7, 8, 9, 12, 14]]
    # K=10: rows 1 and 2
    assert fopru_select(s, 10, strategy="row", grid=(4, 5)).tolist() == [list(range(5, 15))]
    # K=11: rows 1, 2 + best token of row 0 (col 3 -> 3)
    assert fopru_select(s, 11, strategy="row", grid=(4, 5)).tolist() == [[3] + list(range(5, 15))]
    # K < W falls back to rank
    assert fopru_select(s, 3, strategy="row", grid=(4, 5)).tolist() == fopru_select(s, 3).tolist()


def test_row_per_row_mode_hand_grid():
    s = _grid_scores()
    # K=8, H=4: 2 per row
    got = fopru_select(s, 8, strategy="row", grid=(4, 5), row_mode="per_row").tolist()
    assert got == [[1, 3, 7, 9, 12, 14, 16, 18]]
    # K=10: 2 per row + 1 extra for the 2 best rows (row1: col 0 -> 5; row2: col 0 -> 10)
    got = fopru_select(s, 10, strategy="row", grid=(4, 5), row_mode="per_row").tolist()
    assert got == [[1, 3, 5, 7, 9, 10, 12, 14, 16, 18]]
    # K < H falls back to rank
    assert fopru_select(s, 3, strategy="row", grid=(4, 5), row_mode="per_row").tolist() == [[5, 7, 9]]


def _row_reference(s, k, h, w, mode):
    """Brute force over a single (N,) score vector."""
    g = s.view(h, w).tolist()
    if (mode == "rows" and k < w) or (mode == "per_row" and k < h):
        return sorted(sorted(range(h * w), key=lambda j: (-float(s[j]), j))[:k])
    rs = [sum(r) for r in g]
    rows = sorted(range(h), key=lambda r: (-rs[r], r))
    keep = []
    if mode == "rows":
        full, rem = divmod(k, w)
        for r in rows[:full]:
            keep += [r * w + c for c in range(w)]
        if rem:
            r = rows[full]
            cols = sorted(range(w), key=lambda c: (-g[r][c], c))[:rem]
            keep += [r * w + c for c in cols]
    else:
        base, rem = divmod(k, h)
        for pos, r in enumerate(rows):
            cnt = base + (1 if pos < rem else 0)
            cols = sorted(range(w), key=lambda c: (-g[r][c], c))[:cnt]
            keep += [r * w + c for c in cols]
    return sorted(keep)


@pytest.mark.parametrize("mode", ["rows", "per_row"])
def test_row_modes_random_vs_bruteforce(mode):
    gen = torch.Generator().manual_seed(3)
    h, w = 6, 7
    s = torch.rand(5, h * w, generator=gen)
    for k in (1, 5, 6, 7, 13, 20, 41, 42):
        idx = fopru_select(s, k, strategy="row", grid=(h, w), row_mode=mode)
        assert idx.shape == (5, k)
        for bi in range(5):
            assert idx[bi].tolist() == _row_reference(s[bi], k, h, w, mode), (k, bi)


def test_select_errors():
    s = torch.rand(2, 12)
    with pytest.raises(ValueError, match="does not match"):
        fopru_select(s, 4, strategy="row", grid=(3, 5))
    with pytest.raises(ValueError, match="grid"):
        fopru_select(s, 4, strategy="row")
    with pytest.raises(ValueError, match="outside"):
        fopru_select(s, 13)
    with pytest.raises(ValueError, match="gives 0"):
        fopru_select(s, 0)
    with pytest.raises(ValueError, match="unknown strategy"):
        fopru_select(s, 3, strategy="best")
    with pytest.raises(ValueError, match="unknown row_mode"):
        fopru_select(s, 3, strategy="row", grid=(3, 4), row_mode="cols")
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        fopru_select(torch.rand(12), 3)


def test_merge_grid_scores():
    s = torch.arange(16.0).reshape(1, 16)
    m = merge_grid_scores(s, (4, 4), 2)
    assert m.tolist() == [[2.5, 4.5, 10.5, 12.5]]
    with pytest.raises(ValueError, match="divisible"):
        merge_grid_scores(torch.rand(1, 15), (3, 5))


@pytest.mark.slow
def test_transformers_floor_is_declared_and_enforced():
    import subprocess
    import sys

    from tokenprune.fopru.adapters import MIN_TRANSFORMERS, check_transformers_version

    check_transformers_version(MIN_TRANSFORMERS)
    check_transformers_version("6.0.0")
    check_transformers_version("5.24.1.dev0")
    with pytest.raises(ImportError, match="found 5.23.9"):
        check_transformers_version("5.23.9")
    with pytest.raises(ImportError, match=r"transformers>=5\.24\.0, found 4\.57\.1"):
        check_transformers_version("4.57.1")
    # the pure functions import without touching the model side
    code = "import sys, tokenprune.fopru; print('transformers' in sys.modules, 'tokenprune.fopru.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_family_table_is_filled_by_discovery():
    import pkgutil

    from tokenprune.fopru import adapters
    from tokenprune.fopru.adapters import ADAPTERS, register, supported_families
    from tokenprune.fopru.adapters.base import FoPruAdapter

    families = {m.name for m in pkgutil.iter_modules(adapters.__path__)} - {"base", "registry"}
    assert families == {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"}
    # every family module registered itself under its model_type, nothing else is in the table
    assert {cls.__module__.rsplit(".", 1)[1] for cls in ADAPTERS.values()} == families
    assert set(ADAPTERS) == families
    assert all(issubclass(cls, FoPruAdapter) and cls.family for cls in ADAPTERS.values())
    assert "Qwen2.5-VL (qwen2_5_vl)" in supported_families()
    with pytest.raises(ValueError, match="already registered"):
        register("llava")(type("Other", (FoPruAdapter,), {}))
    with pytest.raises(ValueError, match="at least one"):
        register()


def test_every_video_input_of_every_family_is_refused():
    """Each registered family lists every video input of its model's forward in video_keys, so a
    video (alone or with images) is refused, never run unpruned."""
    import inspect

    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from tokenprune.fopru.adapters import ADAPTERS

    for model_type, cls in ADAPTERS.items():
        model_cls = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])
        videos = {name for name in inspect.signature(model_cls.forward).parameters if "video" in name}
        assert videos <= set(cls.video_keys), (model_type, videos - set(cls.video_keys))
        adapter = object.__new__(cls)  # the checks read class attributes only
        for key in cls.video_keys:
            call = {"pixel_values": torch.zeros(1), key: torch.zeros(1)}
            assert adapter.has_visual({key: torch.zeros(1)})
            assert adapter.split_inputs(call)[1] == {}  # consumed, never passed through unpruned
            with pytest.raises(ValueError, match=f"videos are not supported.*{key}"):
                adapter.refuse_videos(call)
        adapter.refuse_videos({"pixel_values": torch.zeros(1)})  # images alone pass
