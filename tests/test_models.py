import math

import pytest
import torch
from torch import nn
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sed_lens.errors import SedLensError
from sed_lens.models import (
    PRESETS,
    PresetInfo,
    build_model,
    get_preset_info,
    get_readout,
    op_losses,
    readout_logits,
    set_readout,
    task_logits,
    torch_reference,
)
from sed_lens.tasks import ModularArithmetic


def test_xu2026_preset_matches_the_paper():
    task = ModularArithmetic(p=97, ops=("add",))
    m = build_model("xu2026", task)
    assert isinstance(m, HookedTransformer)
    assert sum(p.numel() for p in m.parameters()) == 290_401  # PAPER.md §2
    c = m.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.d_head, c.d_mlp) == (2, 128, 4, 32, 256)
    assert c.act_fn == "gelu" and c.normalization_type == "LN" and c.attention_dir == "bidirectional"
    assert (c.n_ctx, c.d_vocab, c.d_vocab_out) == (2, 97, 97)
    assert get_readout(m).position == 0
    assert get_preset_info(m) == PresetInfo("xu2026", "torch", 0)


def test_nanda2023_preset():
    task = ModularArithmetic(p=13, layout="ab=")
    m = build_model("nanda2023", task)
    c = m.cfg
    assert (c.n_layers, c.d_mlp, c.act_fn, c.normalization_type, c.attention_dir) == (1, 512, "relu", None, "causal")
    assert (c.n_ctx, c.d_vocab) == (3, 14) and get_readout(m).position == -1


@pytest.mark.parametrize("preset,layout,ops", [("xu2026", "ab", ("add",)), ("xu2026", "ab", ("add", "sub", "mul", "sq")),
                                               ("nanda2023", "ab=", ("add",))])
def test_torch_init_is_the_nn_transformer_encoder_model(preset, layout, ops):
    """The HookedTransformer computes exactly what the bare nn.TransformerEncoder model computes."""
    task = ModularArithmetic(p=13, ops=ops, layout=layout)
    m = build_model(preset, task, init="torch", seed=3)
    ref = torch_reference(preset, task, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(readout_logits(m, task.tokens), ref(task.tokens), atol=2e-5, rtol=1e-4)


def test_torch_init_statistics_match_a_fresh_nn_transformer_encoder():
    d = 128
    m = build_model("xu2026", ModularArithmetic(p=97), init="torch", seed=0)
    torch.manual_seed(123)  # an independent draw of PyTorch's defaults
    layer = nn.TransformerEncoderLayer(d, 4, 256, 0.0, "gelu", batch_first=True, norm_first=True)
    ref_q = layer.self_attn.in_proj_weight[:d]
    ours = {"W_Q": m.blocks[0].attn.W_Q, "W_O": m.blocks[0].attn.W_O, "W_in": m.blocks[0].mlp.W_in,
            "W_out": m.blocks[0].mlp.W_out, "W_U": m.unembed.W_U}
    theirs = {"W_Q": ref_q, "W_O": layer.self_attn.out_proj.weight, "W_in": layer.linear1.weight,
              "W_out": layer.linear2.weight, "W_U": nn.Linear(d, 97).weight}
    for k in ours:
        assert ours[k].std().item() == pytest.approx(theirs[k].std().item(), rel=0.05), k
        assert ours[k].abs().max().item() == pytest.approx(theirs[k].abs().max().item(), rel=0.05), k
    assert torch.all(m.blocks[0].attn.b_Q == 0) and torch.all(m.blocks[0].attn.b_O == 0)
    assert m.embed.W_E.std().item() == pytest.approx(1.0, rel=0.05)
    assert m.pos_embed.W_pos.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.3)
    # nn.TransformerEncoder deep-copies its layer: every layer starts identical.
    assert torch.equal(m.blocks[0].attn.W_Q, m.blocks[1].attn.W_Q)


def test_init_seed_is_reproducible_and_leaves_global_rng_alone():
    task = ModularArithmetic(p=11)
    state = torch.get_rng_state()
    a = build_model("xu2026", task, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    b = build_model("xu2026", task, seed=1)
    c = build_model("xu2026", task, seed=2)
    tl = build_model("xu2026", task, init="tl", seed=1)
    assert torch.equal(a.blocks[0].attn.W_Q, b.blocks[0].attn.W_Q)
    assert not torch.equal(a.blocks[0].attn.W_Q, c.blocks[0].attn.W_Q)
    assert not torch.equal(a.blocks[0].attn.W_Q, tl.blocks[0].attn.W_Q)
    assert not torch.equal(tl.blocks[0].attn.W_Q, tl.blocks[1].attn.W_Q)


def test_multitask_heads_are_slices_of_one_unembedding(tiny_multitask):
    m = build_model("xu2026", tiny_multitask, seed=0)
    assert m.cfg.d_vocab_out == 4 * 11
    x = tiny_multitask.tokens[:5]
    per_op = task_logits(m, x)
    full = m(x)[:, 0]
    for i, op in enumerate(("add", "sub", "mul", "sq")):
        assert torch.equal(per_op[op], full[:, i * 11:(i + 1) * 11])
    losses = op_losses(m, x, {op: tiny_multitask.labels[op][:5] for op in ("add", "mul")})
    assert set(losses) == {"add", "mul"}
    expected = nn.functional.cross_entropy(full[:, 22:33], tiny_multitask.labels["mul"][:5])
    torch.testing.assert_close(losses["mul"], expected)


def test_a_users_own_hooked_transformer_reads_the_last_position():
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=3, d_vocab=10,
                                  act_fn="relu", attention_dir="causal")
    m = HookedTransformer(cfg)
    r = get_readout(m)
    assert r.position == -1 and r.n_classes == 10
    x = torch.randint(0, 10, (4, 3))
    torch.testing.assert_close(readout_logits(m, x), m(x)[:, -1])
    set_readout(m, 1, ("add", "sub"), 5)
    assert set(task_logits(m, x)) == {"add", "sub"}
    with pytest.raises(SedLensError, match="no head for op"):
        get_readout(m).slice("mul")
    with pytest.raises(SedLensError, match="outside the model's context"):
        set_readout(m, 3)


def test_bad_model_arguments():
    with pytest.raises(SedLensError, match="unknown preset"):
        build_model("gpt9", ModularArithmetic(p=5))
    with pytest.raises(SedLensError, match="unknown init"):
        build_model("xu2026", ModularArithmetic(p=5), init="xavier")
    with pytest.raises(SedLensError, match="layout"):
        build_model("nanda2023", ModularArithmetic(p=5))
    assert set(PRESETS) == {"xu2026", "nanda2023"}
