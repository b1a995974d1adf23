"""Brute-force per-position references of the dLLM one-step commit rules (LocalLeap tests)."""


def _order(conf_row, masked_row):
    """Masked positions sorted by confidence desc, lower index first on ties."""
    idx = [i for i in range(len(conf_row)) if masked_row[i]]
    return sorted(idx, key=lambda i: (-conf_row[i], i))


def ref_topk(conf, masked, k):
    out = []
    for b, (c, m) in enumerate(zip(conf, masked)):
        kb = k[b] if isinstance(k, list) else k
        keep = set(_order(c, m)[:kb])
        out.append([i in keep for i in range(len(c))])
    return out


def ref_fast(conf, masked, thr):
    out = []
    for c, m in zip(conf, masked):
        order = _order(c, m)
        row = [bool(m[i] and c[i] >= thr) for i in range(len(c))]
        if order:
            row[order[0]] = True
        out.append(row)
    return out


def ref_localleap(conf, masked, thr, relaxed, radius):
    out = []
    for c, m in zip(conf, masked):
        L = len(c)
        anchors = [i for i in range(L) if m[i] and c[i] >= thr]
        row = []
        for i in range(L):
            if not m[i]:
                row.append(False)
                continue
            near = any(abs(i - a) <= radius for a in anchors)
            row.append(c[i] >= (relaxed if near else thr))
        order = _order(c, m)
        if order:
            row[order[0]] = True
        out.append(row)
    return out


def ref_eb(conf, masked, ent, gamma):
    out = []
    for c, m, h in zip(conf, masked, ent):
        order = _order(c, m)
        chosen = []
        for n in range(1, len(order) + 1):
            hs = [h[i] for i in order[:n]]
            if sum(hs) - max(hs) <= gamma:
                chosen = order[:n]
            else:
                break
        if order and not chosen:
            chosen = order[:1]
        out.append([i in chosen for i in range(len(c))])
    return out
