"""Tokenizer parity against transformers' BertTokenizer (padding="max_length", max_length=77, truncation)."""

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from ldm_mini.tokenizer import Tokenizer

REAL_DIR = Path(__file__).parent / "realconfigs/ldm-text2im-large-256/tokenizer"
REAL_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"  # bert-base-uncased

PROMPTS = [
    "A painting of a squirrel eating a burger",
    "",
    "   ",
    "A PHOTO OF AN ASTRONAUT RIDING A HORSE ON MARS",
    "Café crème brûlée, naïve façade, Ångström, Øresund, São Paulo",
    "hello!!! what's up?? (a) [b] {c} <d> e-f g_h i/j k\\l $5.00 50% #1 @me ~x ^y &z *w |v `u' \"t\"",
    "xylophonicious flibbertigibbetish qwzxv supercalifragilisticexpialidocious",
    "a [MASK] photo of [SEP] a [CLS] cat [UNK] [PAD] [mask]",
    "東京タワー, 北京 and 서울 at night; emoji 🐿️🍔 and ½ ² ﬁ ligatures",
    "tab\there\nnewline\r\nand\u00a0nbsp\u200bzero-width\u0000nul",
    "a " + "x" * 150,  # a word longer than max_input_chars_per_word=100 -> [UNK]
    "an oil painting of a lighthouse, " * 12,  # longer than 77 tokens: truncated, [SEP] kept
    " ".join(f"word{i}" for i in range(80)),
]


@pytest.fixture(scope="module")
def real_vocab() -> str:
    data = (REAL_DIR / "vocab.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == REAL_SHA256, "realconfigs vocab.txt is not bert-base-uncased"
    return data.decode("utf-8")


def reference_ids(tok, prompts) -> torch.Tensor:
    out = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return out.input_ids


def check(ours: Tokenizer, refs: list, prompts: list[str]) -> None:
    got = ours(prompts)
    assert got.shape == (len(prompts), 77) and got.dtype == torch.long
    for ref in refs:
        want = reference_ids(ref, prompts)
        print(f"{type(ref).__name__}: max abs diff {(got - want).abs().max().item()}")
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # ids are integers: exact


def test_real_vocab_matches_bert_tokenizer(real_vocab):
    ours = Tokenizer.from_vocab(REAL_DIR / "vocab.txt")
    refs = [BertTokenizer.from_pretrained(REAL_DIR), BertTokenizerLegacy(str(REAL_DIR / "vocab.txt"))]
    check(ours, refs, PROMPTS)
    for p in PROMPTS:  # one at a time too (a str, not a list)
        torch.testing.assert_close(ours(p), reference_ids(refs[0], [p]), rtol=0, atol=0)
    assert ours.vocab_size == 30522 and ours.vocab_text == real_vocab
    assert ours.pieces("A squirrel eating a burger") == ["a", "squirrel", "eating", "a", "burger"]
    assert ours.pieces("xylophonicious")[:2] == ["x", "##yl"]
    long = ours("an oil painting of a lighthouse, " * 12)[0]
    assert long[-1].item() == 102 and (long != 0).all()  # truncated to 77 with [SEP] last, no padding
    assert ours("")[0, :3].tolist() == [101, 102, 0]  # [CLS] [SEP] [PAD] ...


def test_vocab_text_content_and_tokenizer_json(real_vocab, tmp_path):
    ours = Tokenizer.from_vocab(real_vocab)  # the content, not a path
    ref = BertTokenizer.from_pretrained(REAL_DIR)
    check(ours, [ref], PROMPTS)
    # A tokenizer.json as transformers writes it (with a template post-processor): same ids.
    ref.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    from_json = Tokenizer.from_file(tmp_path / "tokenizer.json")
    check(from_json, [ref], PROMPTS)
    assert from_json.vocab_text == real_vocab


def test_small_vocab(tmp_path):
    words = ["photo", "of", "cat", "dog", "the", "un", "##believ", "##able", "##ing", "run"]
    punct = [",", ".", "!", "?", "'", "(", ")", "[", "]", "-"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    letters += ["##" + c for c in letters]
    vocab = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *punct, *letters]
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    ours = Tokenizer.from_vocab(tmp_path / "vocab.txt")
    refs = [BertTokenizer.from_pretrained(tmp_path), BertTokenizerLegacy(str(tmp_path / "vocab.txt"))]
    prompts = [
        "A photo of the cat!",
        "Unbelievable dogs, running (cats)",
        "ünbelievablé DOGS - 'photos'",
        "a [MASK] dog",
        "zzz qqq 123 東 €",  # digits, CJK and the euro sign are not in this vocab -> [UNK]
        "",
        "cat " * 100,
    ]
    check(ours, refs, prompts)
    assert ours.pieces("Unbelievable dogs") == ["un", "##believ", "##able", "dog", "##s"]
    assert ours.vocab_size == len(vocab) and ours.vocab_text == "\n".join(vocab) + "\n"


def test_bad_input(tmp_path):
    ours = Tokenizer.from_vocab(REAL_DIR / "vocab.txt")
    with pytest.raises(ValueError, match="empty list"):
        ours([])
    with pytest.raises(TypeError, match="str or a list of str"):
        ours(["a", 3])
    with pytest.raises(ValueError, match="twice"):
        Tokenizer.from_vocab("[PAD]\n[UNK]\n[CLS]\n[SEP]\ncat\ncat\n")
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.from_vocab("[UNK]\ncat\ndog\n")
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer.from_vocab(REAL_DIR / "vocab.txt", max_length=1)
