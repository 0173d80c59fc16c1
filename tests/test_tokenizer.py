"""The tokenizer against transformers' CLIPTokenizer, and against ids from the real SD 1.x tokenizer."""

import json
import warnings

import pytest
import torch
from transformers import CLIPTokenizer

from sd_scratch.tokenizer import END_ID, PAD_ZERO, START_ID, WEIGHTS_DIR, Tokenizer

PROMPTS = [
    "",
    " ",
    "a",
    "dog in batman costume",
    "A PHOTO OF AN ASTRONAUT RIDING A HORSE ON MARS",
    "a photo of an astronaut riding a horse on mars",
    "Hello, world! How's it going?",
    "it's, they're, we've, I'm, you'll, he'd",
    "4k, 8K UHD, 1920x1080, 3.14159, 1,000,000",
    "(masterpiece:1.2), [best quality], {detailed}",
    "portrait | oil painting | trending on artstation",
    "café, naïve, résumé, Zürich, São Paulo, Ångström",
    "東京の夜景、ネオン",
    "Москва зимой",
    "🐶 in a 🦇 costume 🎃",
    "👩‍🚀 astronaut emoji with zero-width joiner",
    "multiple     spaces    between   words",
    "   leading and trailing spaces   ",
    "line one\nline two\n\nline four",
    "tabs\tbetween\twords",
    "mixed \t\n whitespace \r\n here",
    "#hashtag @mention http://example.com/path?q=1&r=2",
    "C++ and C# code, a->b, x**2, 50% off, $100, ~tilde~",
    "quotes: \"double\" 'single' `backtick` «guillemets»",
    "ellipsis... dashes -- — – and hyphen-ated-words",
    "UPPER lower MiXeD CaSe",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a" * 100,
    "one two three " * 30,  # 90 words: cut
    "a very detailed photograph of " + "a red apple, " * 40,  # cut in the middle of a phrase
    "highly detailed, " * 25,  # exactly around the limit
    "word " * 75,  # exactly 75 tokens: nothing cut
    "word " * 76,  # one too many
    "<|startoftext|> special tokens typed in the prompt <|endoftext|>",
    "NFC: e\u0301 vs \u00e9",
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.fixture(scope="module")
def reference():
    # transformers 5 ignores CLIPTokenizer(vocab_file=..., merges_file=...) when called directly
    # (it builds a 3-token vocabulary without a word of warning); from_pretrained reads the files.
    return CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR))


def test_vocabulary_matches_openai_ids():
    vocab = json.loads((WEIGHTS_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    # Ids of the real openai/clip-vit-large-patch14 vocabulary.
    expected = {"!": 0, "!</w>": 256, "in": 512, "a</w>": 320, "photo</w>": 1125, "cat</w>": 2368,
                "<|startoftext|>": START_ID, "<|endoftext|>": END_ID}
    assert {token: vocab[token] for token in expected} == expected
    merges = (WEIGHTS_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 1 + 48894


def test_known_prompt(tokenizer):
    tokens = tokenizer("dog in batman costume")
    assert tokens.input_ids.shape == (1, 77) and tokens.input_ids.dtype == torch.int64
    assert tokens.input_ids[0].tolist() == [49406, 1929, 530, 7223, 7235, 49407] + [49407] * 71
    assert tokens.attention_mask[0].tolist() == [1] * 6 + [0] * 71
    assert tokens.dropped == [""]
    assert tokenizer.decode(tokens.input_ids[0]) == "dog in batman costume"


def test_battery_matches_transformers(tokenizer, reference):
    assert len(PROMPTS) >= 30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts warn; that is tested below
        ours = tokenizer(PROMPTS)
    theirs = reference(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    for i, prompt in enumerate(PROMPTS):
        assert ours.input_ids[i].tolist() == theirs.input_ids[i].tolist(), prompt
        assert ours.attention_mask[i].tolist() == theirs.attention_mask[i].tolist(), prompt


def test_truncation_warns_with_the_dropped_words(tokenizer):
    prompt = "a castle on a hill, " + "misty morning light, " * 20 + "painted by a dragon"
    with pytest.warns(UserWarning, match="painted by a dragon") as record:
        tokens = tokenizer(["a short one", prompt])
    assert len(record) == 1  # only the long prompt warns
    assert tokens.dropped[0] == "" and tokens.dropped[1].endswith("painted by a dragon")
    assert tokens.input_ids[1, -1] == END_ID and tokens.attention_mask[1].sum() == 77
    # Kept and dropped text together give back the whole (normalised) prompt.
    kept = tokenizer.decode(tokens.input_ids[1])
    assert " ".join([kept, tokens.dropped[1]]).split() == prompt.replace(",", " ,").split()


def test_exactly_75_tokens_is_not_cut(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = tokenizer("word " * 75)
    assert tokens.input_ids[0, -1] == END_ID and tokens.dropped == [""]


def test_zero_padding_for_sd2(tokenizer):
    sd2 = Tokenizer(pad_token_id=PAD_ZERO)
    ids = sd2("dog in batman costume").input_ids[0].tolist()
    assert ids == [49406, 1929, 530, 7223, 7235, 49407] + [0] * 71
    # Only the padding changes; a "!" typed in the prompt is token 0 as well and survives decode.
    assert sd2.decode(sd2("wow!").input_ids[0]) == "wow !"
    assert sd2("wow!").attention_mask.tolist() == tokenizer("wow!").attention_mask.tolist()
