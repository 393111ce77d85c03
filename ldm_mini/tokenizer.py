"""The BERT WordPiece tokenizer (bert-base-uncased) that LDMBert reads, built on the `tokenizers` library.

LDM borrows only BERT's tokenizer (Rombach et al. 2022, Sec. 4.3.1; the network is trained from scratch).
WordPiece: Wu et al. 2016, arXiv:1609.08144, Sec. 4.1; the BERT recipe: Devlin et al. 2019,
arXiv:1810.04805, Sec. 3. A prompt goes through four stages:

  "A Café, très   CHIC!"
  1. normalise      lower-case, strip accents (NFD, drop combining marks), clean control characters,
                    put spaces around CJK ideographs            -> "a cafe, tres   chic!"
  2. pre-tokenise   split on whitespace and around punctuation  -> a | cafe | , | tres | chic | !
  3. WordPiece      greedy longest-match-first from the left of each word; later pieces carry "##";
                    a word with no full segmentation becomes [UNK]   -> chic -> chi | ##c
  4. template       [CLS] pieces [SEP], cut to max_length (keeping [SEP]), padded with [PAD] (id 0)

Stages 1-3 run in the Rust `tokenizers` library (the components transformers' BertTokenizer is built
from); stage 4 is written out below. Special tokens typed in a prompt ("[MASK]") are matched whole, as
transformers does. LDMBert attends to the padding too, so every prompt is padded to exactly 77 tokens.
"""

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import normalizers, pre_tokenizers
from tokenizers.models import WordPiece

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0, 100, 101, 102, 103 in bert-base-uncased
MAX_VOCAB_CHARS = 10_000_000  # bert-base-uncased's vocab.txt is 232 kB


class Tokenizer:
    """prompts -> LongTensor (B, max_length) of WordPiece ids: [CLS] ... [SEP] [PAD] ..."""

    def __init__(self, backend: RustTokenizer, max_length: int = 77):
        if not isinstance(backend.model, WordPiece):
            raise ValueError(f"expected a WordPiece (BERT) tokenizer, got {type(backend.model).__name__}.")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 to hold [CLS] and [SEP], got {max_length}.")
        vocab = backend.get_vocab()
        missing = [t for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]") if t not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks the special tokens {missing}; is it a BERT vocab.txt?")
        backend.no_truncation()  # stage 4 (template, truncation, padding) is done in __call__
        backend.no_padding()
        self.backend, self.max_length = backend, max_length
        self.pad_id, self.cls_id, self.sep_id = vocab["[PAD]"], vocab["[CLS]"], vocab["[SEP]"]
        self.unk_id = vocab["[UNK]"]

    @classmethod
    def from_vocab(cls, text_or_path: str | os.PathLike, max_length: int = 77) -> "Tokenizer":
        """Build from a vocab.txt (one token per line; line number = id): a str is the content itself (as a
        weight file's metadata holds it: data, never opened as a path), a Path the file to read."""
        if isinstance(text_or_path, os.PathLike):
            text = Path(text_or_path).read_text(encoding="utf-8")
        elif isinstance(text_or_path, str):
            text = text_or_path
        else:
            raise TypeError(f"vocab must be its text (str) or a Path, got {type(text_or_path).__name__}")
        if len(text) > MAX_VOCAB_CHARS:
            raise ValueError(f"the vocabulary is {len(text):,} characters long, over {MAX_VOCAB_CHARS:,}: "
                             "not a WordPiece vocab.txt")  # fmt: skip
        tokens = [t.removesuffix("\r") for t in text.removesuffix("\n").split("\n")]
        vocab = {}
        for i, t in enumerate(tokens):
            if t in vocab:
                raise ValueError(f"vocab.txt lists {t!r} twice (lines {vocab[t] + 1} and {i + 1}): fix it.")
            vocab[t] = i
        if "[UNK]" not in vocab:
            raise ValueError("vocab.txt has no [UNK] token; is it a BERT WordPiece vocab.txt?")
        backend = RustTokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(  # stage 1
            clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
        )
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # stage 2
        backend.add_special_tokens([t for t in SPECIALS if t in vocab])  # "[MASK]" in a prompt stays whole
        return cls(backend, max_length)

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int = 77) -> "Tokenizer":
        """Build from a `tokenizers` tokenizer.json of a BERT WordPiece tokenizer."""
        return cls(RustTokenizer.from_file(str(path)), max_length)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}.")
        if len(prompts) == 0:
            raise ValueError('got an empty list of prompts; pass at least one string ("" is allowed).')
        rows = []
        for enc in self.backend.encode_batch(list(prompts), add_special_tokens=False):  # stages 1-3
            ids = [self.cls_id, *enc.ids[: self.max_length - 2], self.sep_id]  # stage 4: cut, keep [SEP]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # (B, max_length)

    def unknown_words(self, prompts: str | list[str]) -> list[str]:
        """The words of the prompts that this vocabulary does not know, as typed, each once, in order.

        A word is unknown when WordPiece cannot spell it (it becomes [UNK]) or can spell it only letter by
        letter (d ##o ##g): no piece longer than one character matched, so whatever the model learnt, it was
        not this word. (A word split into longer pieces, photo ##real ##istic, is ordinary BERT usage.)
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        found = []
        for prompt in prompts:
            enc = self.backend.encode(prompt, add_special_tokens=False)
            words: dict[int, list[int]] = {}  # word index -> positions of its pieces
            for position, word_index in enumerate(enc.word_ids):
                words.setdefault(word_index, []).append(position)
            for positions in words.values():
                pieces = [enc.tokens[p] for p in positions]
                spelled = len(pieces) > 1 and all(len(p.removeprefix("##")) == 1 for p in pieces)
                unk = any(enc.ids[p] == self.unk_id for p in positions)
                word = prompt[enc.offsets[positions[0]][0] : enc.offsets[positions[-1]][1]]
                if (spelled or (unk and word != "[UNK]")) and word.lower() not in map(str.lower, found):
                    found.append(word)
        return found

    def pieces(self, prompt: str) -> list[str]:
        """The WordPiece pieces of one prompt, without [CLS]/[SEP]/padding and not truncated."""
        return self.backend.encode(prompt, add_special_tokens=False).tokens

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_text(self) -> str:
        """The vocabulary as vocab.txt content: token of id i on line i."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("the vocabulary ids are not 0..N-1 without gaps: no vocab.txt can hold them.")
        return "".join(t + "\n" for t in sorted(vocab, key=vocab.__getitem__))
