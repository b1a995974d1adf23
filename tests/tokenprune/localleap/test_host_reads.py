"""Host reads of the decoding loop: exactly one per forward pass, for every rule and cache mode.

A read of a tensor's values by the host (``bool(t)``, ``int(t)``, ``.item()``, ``.tolist()``,
``.cpu()``...) waits for the accelerator; the loop makes one per pass (is the block done, and
did the pass produce NaN confidences or a stuck row), plus one per call for the final counts,
one per call for a padded batch and one per block with ``early_stop``. Counted on CPU with a
torch function mode that records every such read made from prunekit's ``tokenprune`` code
(the tiny native LLaDA / Dream of ``dllm_folders``), outputs checked against the checked rules.
"""

import inspect
import os

import pytest
import torch

from tests.helpers.dllm_folders import write_folder
from tokenprune.localleap.generate import localleap_generate
from tokenprune.localleap.models import load_dllm
from tokenprune.localleap.rules import commit_mask, llada_schedule, llada_step_counts

torch.set_num_threads(1)

HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
}
PACKAGE = os.sep + "tokenprune" + os.sep


class HostReadCounter(torch.overrides.TorchFunctionMode):
    """Records the host reads of tensor values whose caller is tokenprune code (file, line)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            caller = inspect.currentframe().f_back
            while caller is not None and "torch" + os.sep in caller.f_code.co_filename:
                caller = caller.f_back  # skip torch's own wrappers (e.g. Tensor.__format__)
            if caller is not None and PACKAGE in caller.f_code.co_filename:
                self.reads.append((os.path.basename(caller.f_code.co_filename), caller.f_lineno, func.__name__))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("reads")
    return {fam: load_dllm(write_folder(root / fam, fam, seed=3))[0] for fam in ("llada", "dream")}


def counted(model, prompt, **kw):
    with HostReadCounter() as counter:
        res = localleap_generate(model, prompt, mask_id=model.config.mask_token_id, **kw)
    return res, counter.reads


PROMPT = torch.tensor([[3, 9, 27, 1, 4], [5, 6, 7, 8, 2]])


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("rule", ["localleap", "fastdllm", "eb", "llada"])
@pytest.mark.parametrize("cache", [False, "prefix", "dual"])
def test_one_host_read_per_forward(family, rule, cache, models):
    """Every rule, cache mode and family: reads == passes + 1 (the final counts)."""
    model = models[family]
    kw = dict(gen_length=16, block_length=8, rule=rule, gamma=0.5, use_cache=cache)
    if rule == "llada":
        kw["steps"] = 32  # more steps than tokens: the schedule's empty steps are skipped without a read
    res, reads = counted(model, PROMPT, **kw)
    assert res.nfe > 2
    assert len(reads) == res.nfe + 1, reads


def test_padding_and_early_stop_reads(models):
    """A padded batch adds one read per call, early_stop one per block."""
    model = models["llada"]
    mask = torch.ones_like(PROMPT)
    mask[1, :2] = 0
    res, reads = counted(model, PROMPT, attention_mask=mask, gen_length=16, block_length=8)
    assert len(reads) == res.nfe + 2, reads
    eos = int(res.generated[0, 3])  # a token the model emits early: rows finish before the end
    res, reads = counted(model, PROMPT, gen_length=32, block_length=8, eos_id=eos, early_stop=True)
    assert 0 in res.block_nfe or res.nfe < 32
    assert len(reads) == res.nfe + 1 + len(res.block_nfe), reads


def test_nan_logits_still_stop_at_the_first_bad_pass(models):
    """NaN confidences are still refused at the pass that produced them (folded into its one read)."""
    model = models["llada"]
    calls = []

    def nan_after_two(input_ids, **kw):
        out = model(input_ids, **kw)
        calls.append(1)
        if len(calls) > 2:
            out.logits[0] = float("nan")
        return out

    with pytest.raises(ValueError, match="NaN confidences at masked positions in pass 3"):
        localleap_generate(
            nan_after_two, PROMPT, gen_length=16, block_length=8, mask_id=model.config.mask_token_id, rule="llada"
        )
    assert len(calls) == 3


def test_rules_read_nothing_without_value_checks():
    """The public rules keep their checks by default; check_values=False makes them read nothing."""
    conf = torch.tensor([[0.95, float("nan"), 0.8, 0.3], [0.2, 0.91, 0.5, 0.99]])
    masked = torch.tensor([[True, True, False, True], [True, True, True, False]])
    ent = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    common = dict(threshold=0.9, relaxed_threshold=0.75, radius=2, gamma=0.5)
    for rule, k in (
        ("localleap", None),
        ("fastdllm", None),
        ("eb", None),
        ("llada", torch.tensor([2, 1])),
        ("llada", 2),
    ):
        with pytest.raises(ValueError, match="NaN"):
            commit_mask(rule, conf, masked, ent, k, **common)
        clean = conf.nan_to_num(0.5)
        with HostReadCounter() as counter:
            got = commit_mask(rule, clean, masked, ent, k, **common, check_values=False)
        assert counter.reads == [], (rule, counter.reads)
        assert torch.equal(got, commit_mask(rule, clean, masked, ent, k, **common)), rule
    with pytest.raises(ValueError, match="k must be >= 0"):
        commit_mask("llada", conf.nan_to_num(0.5), masked, ent, -1, **common)
    for n, steps in ((8, 32), (8, 8), (10, 4), (0, 3), (5, 1)):
        assert llada_step_counts(n, steps) == llada_schedule(n, steps)[0].tolist()
