"""Textual-inversion embedding files: every format A1111 and diffusers users have, read to the same vectors
diffusers reads from them; A1111's short hash; pickles that would run code refused unrun; one-line errors."""

import builtins
import hashlib
import os
import pickle
import re

import pytest
import torch
from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin, load_textual_inversion_state_dicts
from safetensors.torch import save_file

from sd_scratch.loading.embeddings import Embedding, EmbeddingError, load_embedding, load_embeddings_dir

WIDTH = 32


def known_vectors(n, width=WIDTH, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111_pt_data(param, name="trained-as-something-else"):
    """The dict A1111's Embedding.save writes with torch.save."""
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": param}, "name": name, "step": 3000,
            "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned-emaonly"}


def one_line_error(path, width=None, folder=False) -> str:
    with pytest.raises(EmbeddingError) as error:
        load_embeddings_dir(path, width) if folder else load_embedding(path, width)
    message = str(error.value)
    assert "\n" not in message
    return message


class NoVocabulary:
    """The little of a tokenizer diffusers' token-and-embedding helpers ask for: no word is taken yet."""

    added_tokens_encoder = {}

    def get_vocab(self):
        return {}


def diffusers_reading(path) -> tuple[str, torch.Tensor]:
    """The token and (n, width) vectors diffusers' load_textual_inversion takes from a file, without a pipeline."""
    state_dicts = load_textual_inversion_state_dicts([str(path)])
    tokens, embeddings = TextualInversionLoaderMixin._retrieve_tokens_and_embeddings([None], state_dicts,
                                                                                     NoVocabulary())
    _, vectors = TextualInversionLoaderMixin._extend_tokens_and_embeddings(tokens, embeddings, NoVocabulary())
    return tokens[0], torch.stack(vectors)


# --------------------------------------------------------------------------------------------------
# The formats, read to the vectors stored

@pytest.mark.parametrize("shape", [(1, WIDTH), (3, WIDTH), (WIDTH,)])
def test_a1111_safetensors_emb_params(tmp_path, shape):
    stored = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "easynegative.safetensors"
    save_file({"emb_params": stored}, path)
    embedding = load_embedding(path, width=WIDTH)
    assert isinstance(embedding, Embedding)
    assert embedding.name == "easynegative" and embedding.path == path
    assert embedding.vectors.dtype == torch.float32 and embedding.vectors.device.type == "cpu"
    assert torch.equal(embedding.vectors, stored.reshape(-1, WIDTH))
    assert embedding.vectors.shape == ((shape[0], WIDTH) if len(shape) == 2 else (1, WIDTH))
    token, vectors = diffusers_reading(path)
    assert token == "emb_params" and torch.equal(vectors, embedding.vectors)


@pytest.mark.parametrize("as_parameter", [True, False])
def test_a1111_pt_reads_string_to_param_and_ignores_the_stored_name(tmp_path, as_parameter):
    stored = known_vectors(4)
    param = torch.nn.Parameter(stored.clone()) if as_parameter else stored.clone()
    path = tmp_path / "bad-hands-5.pt"
    torch.save(a1111_pt_data(param), path)
    embedding = load_embedding(path, width=WIDTH)
    assert embedding.name == "bad-hands-5"  # the file's stem, as A1111 names it; not the stored "name"
    assert torch.equal(embedding.vectors, stored) and embedding.vectors.shape == (4, WIDTH)
    assert type(embedding.vectors) is torch.Tensor and not embedding.vectors.requires_grad
    token, vectors = diffusers_reading(path)
    assert token == "trained-as-something-else" and torch.equal(vectors, embedding.vectors)


def test_original_textual_inversion_repo_parameter_dict_is_read(tmp_path):
    # rinongal/textual_inversion saved string_to_param as an nn.ParameterDict; A1111 reads its _parameters.
    stored = known_vectors(2)
    path = tmp_path / "old-style.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(stored.clone())})}, path)
    embedding = load_embedding(path)
    assert embedding.name == "old-style" and torch.equal(embedding.vectors, stored)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_diffusers_learned_embeds_are_named_by_their_token(tmp_path, suffix):
    stored = known_vectors(1)[0]  # diffusers' training script stores one vector as (width,)
    path = tmp_path / f"learned_embeds{suffix}"
    if suffix == ".bin":
        torch.save({"<cat-toy>": stored}, path)
    else:
        save_file({"<cat-toy>": stored}, path)
    embedding = load_embedding(path, width=WIDTH)
    assert embedding.name == "cat-toy"
    assert embedding.vectors.shape == (1, WIDTH) and torch.equal(embedding.vectors[0], stored)
    token, vectors = diffusers_reading(path)
    assert token == "<cat-toy>" and torch.equal(vectors, embedding.vectors)
    # Renamed, as users do when they keep several: the file's stem is the word again, as in A1111.
    renamed = path.rename(tmp_path / f"cat-toy-v2{suffix}")
    assert load_embedding(renamed).name == "cat-toy-v2"


def test_learned_embeds_in_a1111_layout_is_named_by_its_stored_name(tmp_path):
    path = tmp_path / "learned_embeds.pt"
    torch.save(a1111_pt_data(known_vectors(2), name="<my-style>"), path)
    assert load_embedding(path).name == "my-style"


@pytest.mark.parametrize("stored_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_half_precision_files_come_back_float32_with_the_same_values(tmp_path, stored_dtype, suffix):
    stored = known_vectors(3).to(stored_dtype)
    path = tmp_path / f"half{suffix}"
    if suffix == ".safetensors":
        save_file({"emb_params": stored}, path)
    else:
        torch.save(a1111_pt_data(stored), path)
    embedding = load_embedding(path)
    assert embedding.vectors.dtype == torch.float32
    assert torch.equal(embedding.vectors, stored.float())  # widening is exact
    _, vectors = diffusers_reading(path)
    assert vectors.dtype == stored_dtype and torch.equal(vectors.float(), embedding.vectors)


def test_sd1_width_768_file(tmp_path):
    stored = known_vectors(8, width=768)
    path = tmp_path / "easynegative.safetensors"
    save_file({"emb_params": stored.half()}, path)
    embedding = load_embedding(path, width=768)
    assert embedding.vectors.shape == (8, 768) and torch.equal(embedding.vectors, stored.half().float())


# --------------------------------------------------------------------------------------------------
# A1111's short hash

def test_short_hash_is_a1111s_first_12_hex_digits_of_the_files_sha256(tmp_path):
    safetensors_path, pt_path = tmp_path / "a.safetensors", tmp_path / "b.pt"
    save_file({"emb_params": known_vectors(2)}, safetensors_path)
    torch.save(a1111_pt_data(known_vectors(2)), pt_path)
    for path in (safetensors_path, pt_path):
        expected = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        embedding = load_embedding(path)
        assert embedding.short_hash == expected
        assert re.fullmatch(r"[0-9a-f]{12}", embedding.short_hash)
    # The hash is of the file's bytes, not of the vectors: the same vectors saved with other metadata hash apart.
    before = load_embedding(safetensors_path)
    save_file({"emb_params": known_vectors(2)}, safetensors_path, metadata={"note": "re-saved"})
    after = load_embedding(safetensors_path)
    assert torch.equal(after.vectors, before.vectors) and after.short_hash != before.short_hash
    assert after.short_hash == hashlib.sha256(safetensors_path.read_bytes()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Pickles that would run code

class CreatesMarkerWithOpen:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class CreatesMarkerWithShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("payload", [CreatesMarkerWithOpen, CreatesMarkerWithShell])
@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle protocol 2"])
def test_a_pickle_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, payload, writer):
    marker = tmp_path / "the-code-ran"
    data = a1111_pt_data(payload(marker))
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(data, path)
    elif writer == "torch.save legacy":  # torch before 1.6: a plain pickle, not a zip
        torch.save(data, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=2)
    assert not marker.exists()
    message = one_line_error(path)
    assert str(path) in message
    assert "holds Python code" in message and "not loaded, for safety" in message
    assert "use a .safetensors version" in message
    refused = "posix.system" if payload is CreatesMarkerWithShell else f"{builtins.open.__module__}.open"
    assert f"holds Python code beyond tensors ({refused})" in message  # what the unpickler would not call
    assert "weights_only" not in message  # never the advice to turn the safety off
    assert not marker.exists()
    with pytest.raises(EmbeddingError):  # the folder loader refuses it the same way
        load_embeddings_dir(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [CreatesMarkerWithOpen, CreatesMarkerWithShell])
def test_a_pickle_in_a_newer_protocol_is_refused_before_its_code_is_reached(tmp_path, payload):
    # Protocols 4 and 5 frame their opcodes, which torch's weights-only unpickler does not read at all.
    marker = tmp_path / "the-code-ran"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump(a1111_pt_data(payload(marker)), f, protocol=pickle.HIGHEST_PROTOCOL)
    assert "could not be read as a PyTorch pickle" in one_line_error(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# One-line errors

def test_width_mismatch_names_the_file_both_widths_and_the_families(tmp_path):
    path = tmp_path / "sd2-style.safetensors"
    save_file({"emb_params": known_vectors(2, width=1024)}, path)
    message = one_line_error(path, width=768)
    assert message == (f"{path} holds vectors of width 1024, but this text encoder's width is 768: it was made "
                       "for another model family (SD 2.x embeddings are 1024 wide, SD 1.x 768); use it with a "
                       "model of its family")
    assert load_embedding(path, width=1024).vectors.shape == (2, 1024)
    # An SD 1.x embedding offered to SD 2.x lists SD 1.x first.
    save_file({"emb_params": known_vectors(1, width=768)}, path)
    assert "(SD 1.x embeddings are 768 wide, SD 2.x 1024)" in one_line_error(path, width=1024)


def sdxl_file(tmp_path, suffix=".safetensors", widths=(768, 1280), n=(2, 2), name="negativeXL_D", **extra):
    """An SDXL embedding as A1111 and ComfyUI share them: clip_l for CLIP ViT-L, clip_g for OpenCLIP bigG."""
    clip_l, clip_g = known_vectors(n[0], width=widths[0], seed=1), known_vectors(n[1], width=widths[1], seed=2)
    data = {"clip_g": clip_g, "clip_l": clip_l, **extra}
    path = tmp_path / f"{name}{suffix}"
    save_file(data, path) if suffix == ".safetensors" else torch.save(data, path)
    return path, data


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sdxl_embeddings_keep_a_set_of_vectors_for_each_text_encoder(tmp_path, suffix):
    path, data = sdxl_file(tmp_path, suffix)
    for width in [None, (768, 1280), [768, 1280]]:
        embedding = load_embedding(path, width)
        assert embedding.name == "negativeXL_D" and torch.equal(embedding.vectors, data["clip_l"])
        assert torch.equal(embedding.vectors_for(768), data["clip_l"])
        assert torch.equal(embedding.vectors_for(1280), data["clip_g"])
    refiner = load_embedding(path, (1280,))  # bigG alone: clip_g
    assert torch.equal(refiner.vectors, data["clip_g"]) and torch.equal(refiner.vectors_for(1280), data["clip_g"])
    with pytest.raises(EmbeddingError) as error:
        embedding.vectors_for(1024)
    assert str(error.value) == (f"{path} holds vectors 768 and 1280 wide, none for a text encoder 1024 wide: use it "
                                "with a model of its family")
    # The key says which encoder, whatever the widths (the small test models' 64 and 128)
    small, data = sdxl_file(tmp_path, widths=(64, 128), name="small")
    embedding = load_embedding(small, (64, 128))
    assert torch.equal(embedding.vectors_for(64), data["clip_l"]) and torch.equal(embedding.vectors_for(128),
                                                                                  data["clip_g"])
    small.unlink()
    [from_folder] = load_embeddings_dir(tmp_path, (1280,))
    assert from_folder.name == "negativeXL_D" and torch.equal(from_folder.vectors, refiner.vectors)


def test_sdxl_and_one_encoder_embeddings_are_refused_with_the_other_family(tmp_path):
    path, _ = sdxl_file(tmp_path)
    assert one_line_error(path, width=768) == (
        f"{path} is an SDXL embedding (clip_l and clip_g, 768 and 1280 wide), but this model has one text encoder, "
        "768 wide (SD 1.x): use it with an SDXL model, or use an embedding made for this model")
    assert "(SD 2.x)" in one_line_error(path, width=(1024,))
    assert one_line_error(path, width=(768, 1024)) == (
        f"{path} holds clip_l and clip_g 768 and 1280 wide, but this model's text encoders are 768 and 1024 wide: it "
        "was made for another model; use it with a model of its family")
    sd1 = tmp_path / "easynegative.safetensors"
    save_file({"emb_params": known_vectors(3, width=768)}, sd1)
    assert one_line_error(sd1, width=(768, 1280)) == (
        f"{sd1} holds one set of vectors, 768 wide (an embedding for SD 1.x), but this model has 2 text encoders, "
        "768 and 1280 wide: use an embedding made for SDXL (clip_l and clip_g)")
    assert "easynegative.safetensors holds one set" in one_line_error(tmp_path, width=(768, 1280), folder=True)
    assert load_embedding(sd1, (768,)).vectors_for(768).shape == (3, 768)  # a one-tuple is the int


@pytest.mark.parametrize("case, expected", [
    ("counts", r"holds 2 vectors in clip_l but 3 in clip_g, where an SDXL embedding has as many for each"),
    ("one_width", r"holds clip_l and clip_g of one width, 768, where SDXL's two text encoders differ"),
    ("clip_g_alone", r"holds clip_g, where an SDXL embedding holds clip_l and clip_g alone"),
    ("extra", r"holds clip_g, clip_l, emb_params, where an SDXL embedding holds clip_l and clip_g alone"),
])
def test_damaged_sdxl_embeddings_get_one_line_errors(tmp_path, case, expected):
    if case == "counts":
        path, _ = sdxl_file(tmp_path, n=(2, 3))
    elif case == "one_width":
        path, _ = sdxl_file(tmp_path, widths=(768, 768))
    elif case == "clip_g_alone":
        path = tmp_path / "half.safetensors"
        save_file({"clip_g": known_vectors(2, width=1280)}, path)
    else:
        path, _ = sdxl_file(tmp_path, emb_params=known_vectors(2, width=768))
    message = one_line_error(path)
    assert message.startswith(str(path) + " ") and re.search(expected, message), message


def write_bad_file(tmp_path, case):
    if case == "two_tensors":
        path = tmp_path / "two.safetensors"
        save_file({"emb_params": known_vectors(1), "extra": known_vectors(1)}, path)
    elif case == "many_tensors":
        path = tmp_path / "lora.safetensors"
        save_file({f"lora_unet_block_{i}.alpha": torch.ones(1) for i in range(20)}, path)
    elif case == "checkpoint_pickle":
        path = tmp_path / "model.pt"
        torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
    elif case == "two_params":
        path = tmp_path / "two-terms.pt"
        torch.save({"string_to_param": {"*": known_vectors(1), "+": known_vectors(1)}, "name": "x"}, path)
    elif case == "no_tensors":
        path = tmp_path / "nothing.safetensors"
        save_file({}, path)
    elif case == "empty":
        path = tmp_path / "empty.pt"
        path.write_bytes(b"")
    elif case == "text":
        path = tmp_path / "readme.safetensors"
        path.write_text("this is a civitai download page, not an embedding\n")
    elif case == "truncated":
        path = tmp_path / "cut.safetensors"
        save_file({"emb_params": known_vectors(8)}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "not_a_pickle":
        path = tmp_path / "notes.pt"
        path.write_text("hello")
    elif case == "truncated_pickle":
        path = tmp_path / "cut.pt"
        torch.save(a1111_pt_data(known_vectors(8)), path)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "three_d":
        path = tmp_path / "cube.safetensors"
        save_file({"emb_params": torch.zeros(2, 3, WIDTH)}, path)
    elif case == "integers":
        path = tmp_path / "ids.safetensors"
        save_file({"emb_params": torch.zeros(2, WIDTH, dtype=torch.int64)}, path)
    elif case == "zero_vectors":
        path = tmp_path / "hollow.safetensors"
        save_file({"emb_params": torch.zeros(0, WIDTH)}, path)
    elif case == "bare_tensor":
        path = tmp_path / "bare.pt"
        torch.save(known_vectors(2), path)
    elif case == "image":
        path = tmp_path / "embedding-card.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
    elif case == "learned_embeds_without_word":
        path = tmp_path / "learned_embeds.safetensors"
        save_file({"emb_params": known_vectors(1)}, path)
    elif case == "empty_word":
        path = tmp_path / "learned_embeds.bin"
        torch.save({"<>": known_vectors(1)[0]}, path)
    return path


@pytest.mark.parametrize("case, expected", [
    ("two_tensors", r"holds 2 entries \(emb_params, extra\), where an embedding holds one tensor"),
    ("many_tensors", r"holds 20 entries \(lora_unet_block_0.alpha, .*, \.\.\.\): it looks like a model checkpoint "
                     r"or LoRA, not an embedding"),
    ("checkpoint_pickle", r"holds 2 entries \(global_step, state_dict\): it looks like a model checkpoint"),
    ("two_params", r"holds 2 entries in string_to_param, where an embedding has one tensor"),
    ("no_tensors", r"holds no tensors: it is damaged or not an embedding"),
    ("empty", r"is empty \(0 bytes\): the download or copy did not finish"),
    ("text", r"is neither a PyTorch pickle nor a readable safetensors file"),
    ("truncated", r"is neither a PyTorch pickle nor a readable safetensors file \(it may be truncated"),
    ("not_a_pickle", r"is not a PyTorch pickle \(its first bytes are not a pickle's\): it is damaged"),
    ("truncated_pickle", r"could not be read as a PyTorch pickle \(.+\); it may be truncated or damaged"),
    ("three_d", r"holds a tensor of shape \(2, 3, 32\), where an embedding is \(vectors, width\) or \(width,\)"),
    ("integers", r"holds int64 numbers, where an embedding's vectors are floating-point"),
    ("zero_vectors", r"holds no vectors \(shape \(0, 32\)\)"),
    ("bare_tensor", r"holds a Tensor, where an embedding file holds a dict \(string_to_param, emb_params"),
    ("image", r"is an image: embeddings stored in images are not read"),
    ("learned_embeds_without_word", r"does not say which word calls it .*: rename the file to that word"),
    ("empty_word", r"gives the trigger word '', which cannot be typed in a prompt"),
])
def test_files_that_are_not_usable_embeddings_get_one_line_errors(tmp_path, case, expected):
    path = write_bad_file(tmp_path, case)
    message = one_line_error(path)
    assert message.startswith(str(path) + " ")
    assert re.search(expected, message), message


def test_missing_file_and_folder_given_as_a_file(tmp_path):
    missing = tmp_path / "typo.safetensors"
    assert one_line_error(missing) == f"embedding not found: {missing}; check the path (an embedding is a " \
                                      ".safetensors, .pt or .bin file)"
    message = one_line_error(tmp_path)
    assert message.startswith(f"{tmp_path} is a folder, not an embedding file") and "load_embeddings_dir" in message


# --------------------------------------------------------------------------------------------------
# A folder of embeddings

def test_a_folder_is_read_sorted_by_name_and_other_files_are_left_alone(tmp_path):
    save_file({"emb_params": known_vectors(1, seed=1)}, tmp_path / "b-style.safetensors")
    torch.save(a1111_pt_data(known_vectors(2, seed=2)), tmp_path / "a-negative.pt")
    torch.save({"<Cat-Toy>": known_vectors(1, seed=3)[0]}, tmp_path / "learned_embeds.BIN")
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / "preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "nested").mkdir()
    save_file({"emb_params": known_vectors(1)}, tmp_path / "nested" / "deeper.safetensors")  # not recursive
    embeddings = load_embeddings_dir(tmp_path, width=WIDTH)
    assert [e.name for e in embeddings] == ["a-negative", "b-style", "Cat-Toy"]
    assert [len(e.vectors) for e in embeddings] == [2, 1, 1]
    assert torch.equal(embeddings[0].vectors, known_vectors(2, seed=2))
    assert torch.equal(embeddings[1].vectors, known_vectors(1, seed=1))
    assert torch.equal(embeddings[2].vectors[0], known_vectors(1, seed=3)[0])
    assert [e.path.name for e in embeddings] == ["a-negative.pt", "b-style.safetensors", "learned_embeds.BIN"]
    assert load_embeddings_dir(tmp_path / "nested")[0].name == "deeper"


def test_an_empty_folder_gives_no_embeddings_and_a_missing_one_an_error(tmp_path):
    assert load_embeddings_dir(tmp_path) == []
    missing = tmp_path / "embeddings"
    assert one_line_error(missing, folder=True) == (f"embeddings folder not found: {missing}; give the folder that "
                                                    "holds the embedding files")
    (tmp_path / "file.pt").write_bytes(b"x")
    assert "embeddings folder is a file, not a folder" in one_line_error(tmp_path / "file.pt", folder=True)


@pytest.mark.parametrize("first, second", [("x.pt", "x.safetensors"), ("EasyNegative.pt", "easynegative.safetensors")])
def test_two_files_with_one_trigger_word_are_an_error_naming_both(tmp_path, first, second):
    torch.save(a1111_pt_data(known_vectors(1)), tmp_path / first)
    save_file({"emb_params": known_vectors(2)}, tmp_path / second)
    message = one_line_error(tmp_path, folder=True)
    assert f"{first} and {second} in {tmp_path} both give the trigger word" in message
    assert "remove or rename one" in message


def test_a_diffusers_file_can_clash_with_a_named_file(tmp_path):
    torch.save({"<cat-toy>": known_vectors(1)[0]}, tmp_path / "learned_embeds.bin")
    save_file({"emb_params": known_vectors(1)}, tmp_path / "cat-toy.safetensors")
    message = one_line_error(tmp_path, folder=True)
    assert "cat-toy.safetensors and learned_embeds.bin" in message and "'cat-toy'" in message
