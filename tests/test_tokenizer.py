"""CLIP tokenizer: id parity with transformers' CLIPTokenizer on the real OpenAI vocabulary."""

import html
import json
import random
import warnings

import pytest
import torch

from ldmkit.errors import CheckpointError, InvalidArgument
from ldmkit.models.tokenizer import (
    BUNDLED_BPE,
    CLIPTokenizer,
    bytes_to_unicode,
    clean_text,
    load_tokenizer,
    pre_tokenize,
    train_bpe,
)

transformers = pytest.importorskip("transformers")

CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

FRAGMENTS = [
    "a photo of an astronaut riding a horse", "Portrait", "of", "a", "CAT", "dog,", "8k", "trending",
    "on", "ArtStation", "café", "naïve", "Ångström", "crème brûlée", "São Paulo", "Zürich", "ﬁne", "Œuvre",
    "🐱", "👍🏽", "🏳️‍🌈", "❤️", "東京タワー", "北京", "한국어", "こんにちは", "Привет", "ΟΔΟΣ", "Σίσυφος", "مرحبا",
    "שלום", "हिन्दी", "ไทย", "!!!", "???", "...", "--", "(((masterpiece)))", "[best:0.5]",
    "{a|b}", "#hashtag", "@user", "$100", "50%", "3.14159", "2024", "1,000,000", "½", "²", "Ⅻ", "٣", "it's", "don't", "you're",
    "we've", "I'm", "they'll", "he'd", "IT'S", "rock'n'roll", "''s", "'quoted'", "’curly’", "`tick`",
    "&amp;", "&lt;b&gt;", "&#39;", "&quot;hi&quot;", "&amp;amp;", "&nbsp;", "e\u0301", "A\u030a", "ＡＢＣ",
    "\u200b", "\u200d", "\u00a0", "\u3000", "\u2003", "\x1c", "\x85", "\t", "\n", "  ", "\r\n",
    "<|endoftext|>", "<|startoftext|>", "x<|endoftext|>y", "!<|endoftext|>", "İstanbul", "ß", "ﬀ",
    "snake_case", "CamelCase", "a/b\\c", "C++", "e-mail", "U.S.A.", "𝕏", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "©®™", "°C", "±",
]


def make_prompts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = ["", " ", "\t\n", "a", "A", *FRAGMENTS]
    separators = [" ", " ", " ", "", "  ", "\t", "\n", ", "]
    while len(prompts) < n:
        count = rng.choice([1, 2, 3, 5, 8, 13, 40, 90])  # the long ones overflow 77 tokens
        words = [rng.choice(FRAGMENTS) for _ in range(count)]
        prompts.append("".join(w + rng.choice(separators) for w in words))
    return prompts


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.from_openai_bpe()


@pytest.fixture(scope="module")
def hf_folder(ours, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    ours.save(folder)
    return folder


@pytest.fixture(scope="module")
def hf(hf_folder):
    return transformers.CLIPTokenizer.from_pretrained(str(hf_folder))


def hf_ids(tokenizer, prompts, unescape=True):
    if unescape:  # transformers does not unescape HTML entities; OpenAI's tokenizer (and ours) does
        prompts = [html.unescape(html.unescape(p)) for p in prompts]
    out = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return out["input_ids"]


def test_vocab_is_openai_clip(ours, hf):
    assert BUNDLED_BPE.is_file()
    assert len(ours.vocab) == ours.vocab_size == 49408
    assert (ours.bos_id, ours.eos_id) == (49406, 49407)
    assert ours.vocab["!"] == 0 and ours.vocab["!</w>"] == 256
    assert hf.get_vocab() == ours.vocab
    assert len(bytes_to_unicode()) == 256 and len(set(bytes_to_unicode().values())) == 256


def test_ids_match_transformers(ours, hf):
    prompts = make_prompts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = ours(prompts)
    expected = hf_ids(hf, prompts)
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 77)
    mismatched = [p for p, a, b in zip(prompts, ids, expected) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]!r}"
    assert sum(len(ours.encode(p)) > 75 for p in prompts) >= 10


def test_without_html_unescape_matches_transformers_exactly(hf):
    tok = CLIPTokenizer.from_openai_bpe(html_unescape=False)
    prompts = ["Tom &amp; Jerry", "&lt;b&gt;bold&lt;/b&gt;", "&#39;quoted&#39; &quot;x&quot;"]
    assert torch.equal(tok(prompts), hf_ids(hf, prompts, unescape=False))
    assert not torch.equal(CLIPTokenizer.from_openai_bpe()(prompts), tok(prompts))


def test_pre_tokenize_matches_regex_pattern():
    regex = pytest.importorskip("regex")  # a transformers dependency; only our tests use it
    pattern = regex.compile(CLIP_PATTERN)
    for prompt in make_prompts(200, seed=1):
        text = clean_text(prompt)
        assert pre_tokenize(text) == pattern.findall(text), text


def test_pad_with_zero_matches_sd2_tokenizer(hf_folder):
    hf2 = transformers.CLIPTokenizer.from_pretrained(str(hf_folder), pad_token="!")
    tok = CLIPTokenizer.from_openai_bpe(pad="zero")
    prompts = ["a red cube on a blue sphere", "", "x " * 100]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(prompts)
    assert torch.equal(ids, hf_ids(hf2, prompts))
    n = len(tok.encode(prompts[0]))
    assert ids[0, n + 1] == 49407 and ids[0, n + 2 :].eq(0).all()


def test_pad_with_end_token(ours):
    ids = ours("a red cube")[0]
    assert ids[0] == 49406 and ids[4:].eq(49407).all()


def test_truncation_warns_with_dropped_text(ours):
    kept = "a " * 75
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(kept)  # exactly 75 tokens: no warning
    with pytest.warns(UserWarning, match="zebra giraffe elephant") as record:
        ids = ours(kept + "zebra giraffe elephant")
    assert "a a" not in str(record[0].message)
    assert ids.shape == (1, 77) and ids[0, -1] == ours.eos_id and ids[0, -2] == ours.vocab["a</w>"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(kept + "zebra", warn_truncation=False)


def test_decode(ours, hf):
    prompts = ["a photo of a cat, 東京!", "Crème brûlée 🐱 it's 3.14", ""]
    ids = ours(prompts)
    expected = [hf.decode(row, skip_special_tokens=True) for row in hf_ids(hf, prompts).tolist()]
    assert ours.batch_decode(ids) == expected
    assert ours.decode(ours("hello world")[0]) == "hello world"
    hello = ours.encode("hello")
    assert CLIPTokenizer.from_openai_bpe(pad="zero").decode([49406, *hello, 49407, 0, 0]) == "hello"


def test_folder_loading_and_lookup(tmp_path, ours):
    CLIPTokenizer.from_openai_bpe(pad="zero").save(tmp_path / "model" / "tokenizer")
    loaded = load_tokenizer(tmp_path / "model")
    assert loaded.pad_id == 0 and loaded.vocab == ours.vocab and loaded.merges == ours.merges
    assert load_tokenizer(tmp_path / "model", pad="end").pad_id == ours.eos_id
    bundled = load_tokenizer(None)
    assert bundled.vocab == ours.vocab and bundled.pad_id == ours.eos_id
    assert load_tokenizer(tmp_path / "nothing_here").vocab == ours.vocab
    with pytest.raises(InvalidArgument):
        CLIPTokenizer.from_openai_bpe(pad="left")


CAPTIONS = [
    "a red cube on a blue sphere",
    "a small green cube left of a large red cube",
    "two blue spheres and a yellow cylinder",
    "a large yellow cylinder above a small red sphere",
    "three green cubes",
]


def test_train_word_level_vocab_roundtrips_through_transformers(tmp_path):
    tok = train_bpe(CAPTIONS, num_merges=None, min_frequency=1)
    words = {w for c in CAPTIONS for w in c.split()}
    for word in words:
        assert len(tok.encode(word)) == 1, word  # every caption word is one token
    assert tok.vocab_size == len(tok.vocab) < 700
    assert (tok.bos_id, tok.eos_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    tok.save(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert vocab == tok.vocab
    hf_small = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    prompts = CAPTIONS + ["a purple cone, unseen words & émoji 🐱", "cubes cubed"]
    assert torch.equal(tok(prompts), hf_ids(hf_small, prompts))
    assert torch.equal(CLIPTokenizer.from_folder(tmp_path)(prompts), tok(prompts))


def test_train_bpe_respects_merge_budget():
    tok = train_bpe(CAPTIONS, num_merges=20)
    assert len(tok.merges) == 20 and len(tok.vocab) == 512 + 20 + 2
    assert train_bpe(CAPTIONS, num_merges=20).merges == tok.merges  # deterministic


@pytest.mark.parametrize("cls_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_loads_transformers5_tokenizer_json(cls_name, hf_folder, ours, tmp_path):
    """transformers 5 saves only `tokenizer.json` (+ config); ldmkit reads its BPE model."""
    saved = tmp_path / "model" / "tokenizer"
    getattr(transformers, cls_name).from_pretrained(str(hf_folder)).save_pretrained(str(saved))
    assert (saved / "tokenizer.json").is_file()
    for name in ("vocab.json", "merges.txt"):  # make sure the tokenizer.json path is the one tested
        (saved / name).unlink(missing_ok=True)
    loaded = load_tokenizer(tmp_path / "model")
    assert loaded.vocab == ours.vocab and loaded.merges == ours.merges
    assert (loaded.pad_id, loaded.context_length) == (ours.eos_id, 77)
    prompts = make_prompts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = loaded(prompts)
    expected = hf_ids(transformers.AutoTokenizer.from_pretrained(str(saved)), prompts)
    mismatched = [p for p, a, b in zip(prompts, ids, expected) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]!r}"


def test_tokenizer_json_variants(hf_folder, ours, tmp_path):
    """Merges as "a b" strings (older tokenizers files), the SD 2.x pad token, and bad files."""
    transformers.CLIPTokenizer.from_pretrained(str(hf_folder), pad_token="!").save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    loaded = CLIPTokenizer.from_folder(tmp_path)
    assert loaded.merges == ours.merges and loaded.pad_id == 0
    assert CLIPTokenizer.from_tokenizer_json(tmp_path / "tokenizer.json", pad="end").pad_id == ours.eos_id
    assert torch.equal(loaded("a red cube"), CLIPTokenizer.from_openai_bpe(pad="zero")("a red cube"))
    data["model"]["type"] = "WordPiece"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a BPE tokenizer"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        CLIPTokenizer.from_folder(tmp_path / "empty")
