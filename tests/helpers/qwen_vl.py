"""Tiny Qwen-VL prompts (token ids, patch grids, pixel values) and the brute-force M-RoPE rule,
shared by the Qwen2-VL and Qwen3-VL FoPru tests."""

import torch

IMG, VID, VS, VE = 90, 93, 91, 92


PATCH_DIM = 3 * 2 * 4 * 4  # channels * temporal_patch * patch * patch


def qwen_inputs(layout, seed=1):
    """layout: per prompt, a list of items: ("t", [ids]) or ("i", (h, w)) patch grid."""
    rows, grids = [], []
    for items in layout:
        r = []
        for kind, v in items:
            if kind == "t":
                r += list(v)
            else:
                grids.append([1, v[0], v[1]])
                r += [VS] + [IMG] * (v[0] * v[1] // 4) + [VE]
        rows.append(r)
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    grid = torch.tensor(grids)
    pv = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=torch.Generator().manual_seed(seed))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pv,
        "image_grid_thw": grid,
        "mm_token_type_ids": (ids == IMG).int(),
    }


BATCH = [
    [("t", [5, 6]), ("i", (4, 6)), ("t", [7, 8, 9])],  # 6 merged tokens
    [("t", [5]), ("i", (6, 8)), ("t", [8, 9])],
]  # 12 merged tokens, longer row


TWO_IMAGES = [[("t", [5]), ("i", (4, 4)), ("t", [6]), ("i", (6, 4)), ("t", [7, 8])]]


def bruteforce_mrope(ids_row, grids):
    """(3, n) M-RoPE positions of one unpadded row, from the Qwen2-VL rule."""
    pos, cur, i, gi = [], 0, 0, 0
    while i < len(ids_row):
        if ids_row[i] == IMG:
            _, h, w = grids[gi]
            gh, gw = h // 2, w // 2
            pos += [(cur, cur + r, cur + c) for r in range(gh) for c in range(gw)]
            cur += max(gh, gw)
            i += gh * gw
            gi += 1
        else:
            pos.append((cur, cur, cur))
            cur += 1
            i += 1
    return torch.tensor(pos).T
