"""LDMBert parity against diffusers' LDMBertModel (tiny random weights, float32, CPU).

Both ways: the plain model bit-identical to diffusers, with ldm_mini.fast's layers to atol 1e-5.
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig as RefConfig
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

from ldm_mini import fast
from ldm_mini.bert import LDMBert, LDMBertConfig
from ldm_mini.loading import from_diffusers_names

REAL = Path(__file__).parent / "realconfigs/ldm-text2im-large-256"
# head_dim 16: inner width 2*16 = 32 = n_embed; head_dim 24: inner width 48 != n_embed (as 512 != 1280).
TINY = {
    hd: LDMBertConfig(vocab_size=100, n_embed=32, n_layer=2, n_heads=2, head_dim=hd, ffn_dim=64)
    for hd in (16, 24)
}


def make_pair(cfg: LDMBertConfig) -> tuple[LDMBert, LDMBertModel]:
    torch.manual_seed(0)
    ref = LDMBertModel(
        RefConfig(
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_seq_len,
            encoder_layers=cfg.n_layer,
            encoder_ffn_dim=cfg.ffn_dim,
            encoder_attention_heads=cfg.n_heads,
            head_dim=cfg.head_dim,
            d_model=cfg.n_embed,
        )
    ).eval()
    with torch.no_grad():  # re-randomise everything: the init has zero biases and unit LayerNorms
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    # Keys: diffusers' without "model."; the unused language-model head to_logits is not part of ours.
    state = {k.removeprefix("model."): v for k, v in ref.state_dict().items() if k.startswith("model.")}
    ours = LDMBert(cfg).eval()
    ours.load_state_dict(from_diffusers_names(state), strict=True)  # (no renamed fragment in LDMBert)
    return ours, ref


@pytest.mark.parametrize("fast_layers", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("head_dim", [16, 24])
@pytest.mark.parametrize("batch, length", [(1, 77), (2, 77), (3, 5), (1, 1)])
def test_ldmbert_matches_diffusers(head_dim, batch, length, fast_layers):
    ours, ref = make_pair(TINY[head_dim])
    if fast_layers:
        fast.enable(ours)  # (1, 77) and (3, 5) have fewer than 128 rows: plain layers there
    gen = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(0, 100, (batch, length), generator=gen)
    with torch.no_grad():  # float32 on CPU: a miss at 1e-5 is a real difference, not noise
        want = ref(ids, return_dict=True).last_hidden_state
        got = ours(ids)
    assert got.shape == (batch, length, 32)
    print(f"head_dim {head_dim} batch {batch} length {length}: max abs diff {(got - want).abs().max():.3g}")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 if fast_layers else 0.0)


def test_state_dict_keys_equal_diffusers_without_prefix():
    ours, ref = make_pair(TINY[24])
    want = {k.removeprefix("model.") for k in ref.state_dict() if k.startswith("model.")}
    assert set(ours.state_dict()) == want
    head = {k for k in ref.state_dict() if not k.startswith("model.")}
    assert head == {"to_logits.weight", "to_logits.bias"}  # the unused LM head, dropped when loading


def test_default_config_is_ldm_text2im_large_256():
    cfg = json.loads((REAL / "bert/config.json").read_text())
    d = LDMBertConfig()
    assert (d.vocab_size, d.max_seq_len, d.n_embed, d.n_layer, d.n_heads, d.head_dim, d.ffn_dim) == (
        cfg["vocab_size"],
        cfg["max_position_embeddings"],
        cfg["d_model"],
        cfg["encoder_layers"],
        cfg["encoder_attention_heads"],
        cfg["head_dim"],
        cfg["encoder_ffn_dim"],
    )


def test_float16_attention_runs_in_float32(monkeypatch):
    ours, _ = make_pair(TINY[24])
    ids = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ours(ids)
        softmax, seen = torch.nn.functional.softmax, []

        def spy(logits, **kwargs):  # records the dtype the attention runs in
            seen.append(logits.dtype)
            return softmax(logits, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "softmax", spy)
        half = ours.half()(ids)
    assert seen == [torch.float32] * 2  # both layers' attention upcast
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, rtol=0, atol=5e-2)  # float16 has ~3 decimal digits


def test_bad_input_errors():
    ours, _ = make_pair(TINY[16])
    with pytest.raises(ValueError, match="78 tokens"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        ours(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="integer token ids"):
        ours(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        ours(torch.full((1, 5), 100))
