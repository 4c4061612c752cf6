"""The byte-level BPE tokenizer of OpenAI CLIP, written with the standard library only.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") reads text as byte-level byte-pair-encoding tokens (Sennrich et al. 2016, "Neural
Machine Translation of Rare Words with Subword Units"; the byte-level variant of GPT-2, Radford et
al. 2019). A prompt becomes ids in five steps:

1. clean: HTML entities unescaped (twice, as OpenAI does), Unicode NFC, runs of whitespace
   collapsed to one space, ends stripped, lower-cased. OpenAI also runs `ftfy.fix_text`, which
   ldmkit does not depend on: we keep only its last step (NFC), so mojibake is not repaired, curly
   quotes stay curly and full-width letters stay full-width. This is exactly what transformers'
   (fast) CLIPTokenizer does, which diffusers' SD pipelines use, apart from the HTML unescaping
   (turn it off with `html_unescape=False` for bit-exact diffusers ids on prompts with entities).
2. pre-tokenize with CLIP's pattern
   `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`:
   runs of letters, single digits, runs of other symbols; whitespace separates and is dropped.
   The Unicode classes come from `unicodedata.category` (Python's `re` has no `\\p{..}`), and
   "whitespace" is the set the regex engine of transformers uses (see `_is_space`).
3. map each UTF-8 byte of a word to a printable character (`bytes_to_unicode`) and mark the word's
   end with `</w>` on its last character.
4. apply the BPE merges in rank order (lowest rank first) until none applies.
5. look the pieces up in the vocabulary; wrap in start/end tokens; truncate to the context
   (77 tokens for CLIP) with a warning naming the dropped text; pad with the end token (SD 1.x,
   transformers) or with id 0 (SD 2.x / OpenCLIP, whose pad token is "!").

Where the vocabulary comes from (see `load_tokenizer`): a model folder's `tokenizer/` (or the
folder itself) holding `vocab.json` + `merges.txt`, the format of transformers 4 and diffusers, or
a HF tokenizers `tokenizer.json` (all that transformers 5 saves), whose BPE vocab and merges are read.
When a checkpoint carries no vocabulary (CompVis / A1111 single files never do), ldmkit uses the
OpenAI merges file bundled as package data, `ldmkit/assets/bpe_simple_vocab_16e6.txt.gz` (MIT,
see `assets/LICENSE-bpe_simple_vocab.txt`): SD 1.x and SD 2.x both use this same 49,408-token
vocabulary, differing only in the pad id. A small model trained on its own captions can carry its
own vocabulary made by `train_bpe` and saved with `CLIPTokenizer.save`.
"""

from __future__ import annotations

import gzip
import html
import json
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import CheckpointError, InvalidArgument, check_choice

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77  # CLIP's text context: start token + 75 tokens + end token
END_OF_WORD = "</w>"  # suffix on the last symbol of each word
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
PAD_CHOICES = ("end", "zero")
# The OpenAI file holds more merges than CLIP uses: 49152 - 256 - 2 of them (OpenAI's slice).
OPENAI_NUM_MERGES = 49152 - 256 - 2
ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_BPE = ASSETS / "bpe_simple_vocab_16e6.txt.gz"
MERGES_HEADER = "#version: 0.2"
TOKENIZER_JSON = "tokenizer.json"  # HF tokenizers' one-file format (all transformers 5 saves)
# Whitespace as the Oniguruma regex engine of HF tokenizers reads `\s` (Python's str.isspace
# adds U+001C..U+001F): tab..carriage return, NEL, and the Zs/Zl/Zp categories.
_EXTRA_SPACES = frozenset("\t\n\x0b\x0c\r\x85")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable unicode character (GPT-2's reversible table).

    Printable Latin-1 bytes map to themselves; the other 68 (control, space, ...) map to
    chr(256 + n) in order, so BPE never sees whitespace or control characters.
    """
    printable = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    byte_values = [b for first, last in printable for b in range(ord(first), ord(last) + 1)]
    code_points = byte_values[:]
    shifted = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + shifted)
            shifted += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def _is_space(char: str) -> bool:
    return char in _EXTRA_SPACES or unicodedata.category(char) in ("Zs", "Zl", "Zp")


@lru_cache(maxsize=65536)
def _char_class(char: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'P' anything else (CLIP's pattern classes)."""
    if _is_space(char):
        return "S"
    category = unicodedata.category(char)[0]
    return category if category in ("L", "N") else "P"


def clean_text(text: str, html_unescape: bool = True) -> str:
    """CLIP's text cleaning without ftfy: unescape HTML, NFC, collapse whitespace, lower-case.

    Lower-casing is done character by character, as transformers does (Python's `str.lower` on a
    whole string would turn a word-final capital sigma into 'ς' instead of 'σ').
    """
    if html_unescape:
        text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    words, word = [], []
    for char in text:
        if _is_space(char):
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(char.lower())
    if word:
        words.append("".join(word))
    return " ".join(words)


def split_special_tokens(
    text: str, special_tokens: Sequence[str] = (BOS_TOKEN, EOS_TOKEN)
) -> Iterable[tuple[str, bool]]:
    """Yield (piece, is_special): special tokens typed in the raw text are cut out first.

    This is what transformers does with its added tokens (case-sensitively, before cleaning).
    """
    start = i = 0
    while i < len(text):
        token = next((t for t in special_tokens if text.startswith(t, i)), None)
        if token is None:
            i += 1
            continue
        if i > start:
            yield text[start:i], False
        yield token, True
        i = start = i + len(token)
    if start < len(text):
        yield text[start:], False


def pre_tokenize(text: str) -> list[str]:
    """Split cleaned text into words with CLIP's pattern (see the module docstring).

    At each position the pattern's alternatives are tried in order and the runs are greedy,
    as `re.finditer` would; whitespace only separates words.
    """
    words, i, n = [], 0, len(text)
    while i < n:
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if contraction is not None:
            words.append(contraction)
            i += len(contraction)
            continue
        kind = _char_class(text[i])
        j = i + 1
        if kind in ("L", "P"):  # runs of letters / of other symbols; digits stand alone
            while j < n and _char_class(text[j]) == kind:
                j += 1
        if kind != "S":
            words.append(text[i:j])
        i = j
    return words


def text_to_words(text: str, html_unescape: bool = True) -> Iterable[tuple[str, bool]]:
    """Steps 1-2 of the module docstring: yield (word, is_special) for a raw prompt."""
    if html_unescape:
        text = html.unescape(html.unescape(text))
    for piece, is_special in split_special_tokens(text):
        if is_special:
            yield piece, True
        else:
            yield from ((word, False) for word in pre_tokenize(clean_text(piece, html_unescape=False)))


def bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Merge the lowest-ranked adjacent pair everywhere in `word`, repeatedly (Sennrich et al.).

    `word` is a tuple of symbols whose last carries the `</w>` suffix; returns the merged symbols.
    """
    while len(word) > 1:
        pairs = set(zip(word[:-1], word[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        word = _merge_pair(word, best)
    return word


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of `pair` (left to right) by its concatenation."""
    merged, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def _word_symbols(word: str) -> tuple[str, ...]:
    """A pre-token as byte characters, the last one marked with `</w>`."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] += END_OF_WORD
    return tuple(chars)


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer: text -> LongTensor (B, context_length) of token ids.

    Args:
        vocab: token string -> id, including the start and end tokens.
        merges: BPE merges, highest priority first.
        context_length: ids per prompt, start and end tokens included (77 for CLIP).
        pad: "end" pads with the end token (SD 1.x, transformers), "zero" with id 0 (SD 2.x /
            OpenCLIP), or an explicit id.
        html_unescape: unescape HTML entities as OpenAI's tokenizer does (transformers does not).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        context_length: int = CONTEXT_LENGTH,
        pad: str | int = "end",
        html_unescape: bool = True,
    ) -> None:
        for token in (BOS_TOKEN, EOS_TOKEN):
            if token not in vocab:
                raise CheckpointError(f"tokenizer vocabulary has no {token!r} token")
        if context_length < 2:
            raise InvalidArgument(f"context_length must be at least 2, got {context_length}")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.context_length = context_length
        self.html_unescape = html_unescape
        self.bos_id = self.vocab[BOS_TOKEN]
        self.eos_id = self.vocab[EOS_TOKEN]
        self.pad_id = self._pad_id(pad)
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[str, list[int]] = {}

    def _pad_id(self, pad: str | int) -> int:
        if isinstance(pad, int):
            if not 0 <= pad < len(self.vocab):
                raise InvalidArgument(f"pad id {pad} is outside the vocabulary (size {len(self.vocab)})")
            return pad
        return self.eos_id if check_choice("pad", pad, PAD_CHOICES) == "end" else 0

    @property
    def vocab_size(self) -> int:
        """Rows the text model's token embedding needs: one past the largest id."""
        return max(self.vocab.values()) + 1

    # -- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> CLIPTokenizer:
        """Load a transformers / diffusers `tokenizer/` folder: `vocab.json` + `merges.txt`, or
        else the single `tokenizer.json` that transformers 5 saves (see `from_tokenizer_json`).

        The pad token and context length are read from `tokenizer_config.json` or
        `special_tokens_map.json` when present (SD 2.x folders pad with "!", id 0); keyword
        arguments override them.
        """
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        has_pair = vocab_path.is_file() and merges_path.is_file()
        if not has_pair and (folder / TOKENIZER_JSON).is_file():
            return cls.from_tokenizer_json(folder / TOKENIZER_JSON, **kwargs)
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise CheckpointError(f"tokenizer file not found: {path} (and no {TOKENIZER_JSON})")
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        merges = parse_merges(merges_path.read_text(encoding="utf-8").splitlines())
        options = {**_options_from_configs(folder, vocab), **kwargs}
        return cls(vocab, merges, **options)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, **kwargs) -> CLIPTokenizer:
        """Load the BPE model of a HF tokenizers `tokenizer.json` (transformers 5 saves only this).

        Only `model.vocab` (token -> id) and `model.merges` ("a b" strings, or [a, b] pairs in
        newer files) are read: the normalizer, pre-tokenizer and post-processor of a CLIP
        tokenizer are the fixed steps of the module docstring. The pad token and context length
        come from the `tokenizer_config.json` beside it, as in `from_folder`.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise CheckpointError(f"{path}: not a BPE tokenizer (needs model.type 'BPE' and a model.vocab)")
        if model.get("end_of_word_suffix") not in (None, END_OF_WORD):
            raise CheckpointError(
                f"{path}: not a CLIP BPE model (end_of_word_suffix {model['end_of_word_suffix']!r}, "
                f"expected {END_OF_WORD!r})"
            )
        vocab = model["vocab"]
        merges = []
        for merge in model.get("merges", []):
            pair = merge.split(" ") if isinstance(merge, str) else merge
            if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise CheckpointError(f"{path}: malformed BPE merge {merge!r}")
            merges.append((pair[0], pair[1]))
        options = {**_options_from_configs(path.parent, vocab), **kwargs}
        try:
            return cls(vocab, merges, **options)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None

    @classmethod
    def from_openai_bpe(cls, path: str | Path | None = None, **kwargs) -> CLIPTokenizer:
        """Build the 49,408-token CLIP vocabulary from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

        The vocabulary is formed exactly as OpenAI (and transformers' `vocab.json`) forms it:
        256 byte characters, the same with `</w>`, one token per merge, then start and end.
        `path=None` uses the copy bundled with ldmkit.
        """
        path = Path(path) if path is not None else BUNDLED_BPE
        if not path.is_file():
            raise CheckpointError(f"BPE merges file not found: {path}")
        merges = _read_openai_merges(str(path.resolve()))
        return cls(vocab_from_merges(merges), merges, **kwargs)

    def save(self, folder: str | Path) -> None:
        """Write `vocab.json`, `merges.txt` and a `tokenizer_config.json` that transformers reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = dict(sorted(self.vocab.items(), key=lambda item: item[1]))
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = [MERGES_HEADER, *(" ".join(m) for m in self.merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.context_length,
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": self.id_to_token[self.pad_id],
            "do_lower_case": True,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    # -- encoding -----------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """The BPE token strings of `text` (no start/end tokens, no truncation)."""
        return [self.id_to_token[i] for i in self.encode(text)]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens and without truncation."""
        ids: list[int] = []
        for word, is_special in text_to_words(text, self.html_unescape):
            ids.extend([self.vocab[word]] if is_special else self._encode_word(word))
        return ids

    def _encode_word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is None:
            # Symbols missing from a small vocabulary become the end token, as in transformers.
            cached = [self.vocab.get(s, self.eos_id) for s in bpe(_word_symbols(word), self.ranks)]
            if len(self._cache) >= 100_000:
                self._cache.clear()
            self._cache[word] = cached
        return cached

    def __call__(self, texts: str | Sequence[str], warn_truncation: bool = True) -> torch.Tensor:
        """Encode prompts into a LongTensor (B, context_length): start, tokens, end, padding.

        Prompts longer than the context keep their first `context_length - 2` tokens; the dropped
        text is reported with `warnings.warn` unless `warn_truncation` is False.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = [self._row(text, warn_truncation) for text in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.context_length)  # (B, T)

    def _row(self, text: str, warn_truncation: bool) -> list[int]:
        ids = self.encode(text)
        keep = self.context_length - 2
        if len(ids) > keep and warn_truncation:
            dropped = self.decode(ids[keep:])
            warnings.warn(
                f"prompt truncated to {self.context_length} tokens (CLIP's limit); "
                f"this part was dropped: {dropped!r}",
                stacklevel=3,
            )
        row = [self.bos_id, *ids[:keep], self.eos_id]
        return row + [self.pad_id] * (self.context_length - len(row))

    # -- decoding -----------------------------------------------------------------------------

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a row of ids: skips the start token and stops at the first end token."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        tokens = []
        for i in ids:
            if i == self.bos_id:
                continue
            if i == self.eos_id:
                break
            tokens.append(self.id_to_token.get(int(i), ""))
        data = bytes(self._byte_decoder[c] for c in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """`decode` for each row of a (B, T) batch."""
        return [self.decode(row) for row in ids]


def parse_merges(lines: Iterable[str]) -> list[tuple[str, str]]:
    """Merges from `merges.txt` lines ("a b" per line; the `#version` header and blanks skipped)."""
    merges = []
    for line in lines:
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CheckpointError(f"malformed BPE merge line: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


@lru_cache(maxsize=2)
def _read_openai_merges(path: str) -> tuple[tuple[str, str], ...]:
    """The merges CLIP uses from an OpenAI `.txt.gz` file (cached: pipelines load it often)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return tuple(parse_merges(lines[1 : OPENAI_NUM_MERGES + 1]))


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + `</w>`, one token per merge, start, end."""
    base = list(bytes_to_unicode().values())
    tokens = base + [c + END_OF_WORD for c in base] + ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for token in [*tokens, BOS_TOKEN, EOS_TOKEN]:
        vocab.setdefault(token, len(vocab))
    return vocab


def _options_from_configs(folder: Path, vocab: dict[str, int]) -> dict:
    """Pad token and context length from a transformers tokenizer folder's JSON files."""
    options: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str) and pad in vocab:
            options["pad"] = vocab[pad]
        length = config.get("model_max_length")
        if isinstance(length, int) and 2 <= length <= 4096:
            options["context_length"] = length
    return options


def train_bpe(
    texts: Iterable[str],
    num_merges: int | None = None,
    min_frequency: int = 2,
    **tokenizer_kwargs,
) -> CLIPTokenizer:
    """Learn a small CLIP-style BPE vocabulary from a caption set (Sennrich et al. 2016, Alg. 1).

    Words are cleaned and pre-tokenized exactly as at encoding time; then the most frequent
    adjacent symbol pair is merged, repeatedly, until `num_merges` merges are learned or no pair
    occurs `min_frequency` times (ties go to the lexicographically smallest pair, so the result
    is deterministic). With `num_merges=None, min_frequency=1` every word of the corpus becomes a
    single token: a word-level vocabulary that still spells out unseen words byte by byte.

    The vocabulary keeps CLIP's layout (512 byte symbols, merges, start, end), so the saved
    `vocab.json` + `merges.txt` load in transformers' CLIPTokenizer too.
    """
    if min_frequency < 1:
        raise InvalidArgument(f"min_frequency must be at least 1, got {min_frequency}")
    html_unescape = tokenizer_kwargs.get("html_unescape", True)
    word_counts = Counter(
        _word_symbols(word)
        for text in texts
        for word, is_special in text_to_words(text, html_unescape)
        if not is_special
    )
    merges: list[tuple[str, str]] = []
    while num_merges is None or len(merges) < num_merges:
        pair_counts: Counter = Counter()
        for word, count in word_counts.items():
            for pair in zip(word[:-1], word[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        if pair_counts[best] < min_frequency:
            break
        merges.append(best)
        merged_counts: Counter = Counter()
        for word, count in word_counts.items():
            merged_counts[_merge_pair(word, best)] += count
        word_counts = merged_counts
    return CLIPTokenizer(vocab_from_merges(merges), merges, **tokenizer_kwargs)


def load_tokenizer(folder: str | Path | None = None, **kwargs) -> CLIPTokenizer:
    """Find a model's tokenizer: `folder/tokenizer/`, then `folder/`, then the bundled OpenAI BPE.

    The first folder holding `vocab.json` + `merges.txt` or a `tokenizer.json` wins; with none
    (or `folder=None`) the vocabulary is the bundled OpenAI file, shared by SD 1.x and SD 2.x
    (pass `pad="zero"` for SD 2.x / OpenCLIP text encoders).
    """
    if folder is not None:
        folder = Path(folder)
        for candidate in (folder / "tokenizer", folder):
            has_pair = (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file()
            if has_pair or (candidate / TOKENIZER_JSON).is_file():
                return CLIPTokenizer.from_folder(candidate, **kwargs)
    return CLIPTokenizer.from_openai_bpe(None, **kwargs)
