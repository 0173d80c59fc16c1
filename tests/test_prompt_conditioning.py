"""Prompts as AUTOMATIC1111 reads them, down to the context the UNet sees: chunks of 75 tokens, emphasis
weights, BREAK, embeddings' places, prompt editing, against references written here from the rules
(transformers' CLIPTextModel for the encoding, diffusers' StableDiffusionPipeline for the whole run)."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from reference_pipeline import reference_scheduler
from sd_scratch import samplers
from sd_scratch.conditioning import encode_prompt, schedule_conditioning
from sd_scratch.loading import load_checkpoint, save_checkpoint
from sd_scratch.sample import generate
from sd_scratch.tokenizer import END_ID, PAD_ZERO, START_ID, WEIGHTS_DIR, Tokenizer
from small_models import small_sd
from twins import clip_reference, diffusers_twins

# Words that are one token each (checked below), so that a prompt's tokens can be written down by hand.
WORDS = ["cat", "dog", "red", "blue", "house", "tree", "sky", "sun", "hill", "road", "boat", "lake"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def test_the_words_are_one_token_each(tokenizer):
    for word in WORDS:
        assert len(tokenizer.bpe(word, add_special_tokens=False).input_ids) == 1, word


def word_id(tokenizer, word):
    return tokenizer.bpe(word, add_special_tokens=False).input_ids[0]


def weighted_prompt(count: int, weighted: bool) -> tuple[str, list[tuple[str, float]]]:
    """A prompt of `count` one-token words, and its tokens with their weights written out by the rule: every
    fifth word in (word:1.3), every seventh in [word] (1 / 1.1), when `weighted`."""
    words, tokens = [], []
    for k in range(count):
        word = WORDS[k % len(WORDS)]
        if weighted and k % 5 == 0:
            words.append(f"({word}:1.3)")
            tokens.append((word, 1.3))
        elif weighted and k % 7 == 0:
            words.append(f"[{word}]")
            tokens.append((word, 1 / 1.1))
        else:
            words.append(word)
            tokens.append((word, 1.0))
    return " ".join(words), tokens


def frames_by_hand(tokenizer, tokens, pad_id):
    """No commas, no BREAK, no embeddings: 75 tokens a chunk, each framed as start, tokens, end, padding."""
    frames = []
    for start in range(0, max(len(tokens), 1), 75):
        part = tokens[start:start + 75]
        ids = [START_ID, *[word_id(tokenizer, w) for w, _ in part], END_ID]
        weights = [1.0, *[weight for _, weight in part], 1.0]
        frames.append((ids + [pad_id] * (77 - len(ids)), weights + [1.0] * (77 - len(weights))))
    return frames


@pytest.mark.parametrize("pad_id", [END_ID, PAD_ZERO])
@pytest.mark.parametrize("count", [0, 10, 75, 76, 150, 160, 230, 300])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunks_of_75_tokens_framed_with_their_weights(tokenizer, count, weighted, pad_id):
    from sd_scratch.prompts import parse_emphasis
    prompt, tokens = weighted_prompt(count, weighted)
    ours = Tokenizer(pad_token_id=pad_id).chunks(parse_emphasis(prompt))
    expected = frames_by_hand(tokenizer, tokens, pad_id)
    assert ours.input_ids.tolist() == [ids for ids, _ in expected]
    torch.testing.assert_close(ours.weights, torch.tensor([w for _, w in expected]))
    assert ours.dropped == "" and ours.embeddings == []


def test_a_chunk_ending_within_20_tokens_of_a_comma_ends_after_the_comma(tokenizer):
    comma = tokenizer.bpe.get_vocab()[",</w>"]
    # 60 words, a comma, 20 words: the 76th token is the 21st word past the comma... 61 + 20 = 81 tokens
    head, tail = " ".join(["cat"] * 60), " ".join(["dog"] * 20)
    chunks = tokenizer.chunks([(f"{head}, {tail}", 1.0)])
    cat, dog = word_id(tokenizer, "cat"), word_id(tokenizer, "dog")
    # the first chunk is full at 60 cats, the comma and 14 dogs; the 15th dog is 15 tokens after the comma, so the
    # chunk ends after the comma and its 14 dogs move on with the rest
    first = [START_ID, *[cat] * 60, comma, END_ID]
    assert chunks.input_ids[0].tolist() == first + [END_ID] * (77 - len(first))
    second = [START_ID, *[dog] * 20, END_ID]
    assert chunks.input_ids[1].tolist() == second + [END_ID] * (77 - len(second))
    # a comma further back than 20 tokens is not used: 40 cats, a comma, 50 dogs cut at 75 tokens
    chunks = tokenizer.chunks([(" ".join(["cat"] * 40) + ", " + " ".join(["dog"] * 50), 1.0)])
    assert chunks.input_ids[0].tolist() == [START_ID, *[cat] * 40, comma, *[dog] * 34, END_ID]


def test_break_ends_the_chunk_and_pads_it(tokenizer):
    chunks = tokenizer.chunks([("cat dog", 1.0), ("BREAK", -1.0), ("sky", 1.2)])
    cat, dog, sky = (word_id(tokenizer, w) for w in ("cat", "dog", "sky"))
    assert chunks.input_ids.tolist() == [[START_ID, cat, dog, *[END_ID] * 74], [START_ID, sky, *[END_ID] * 75]]
    assert chunks.weights[1, 1].item() == pytest.approx(1.2) and chunks.weights[1, 2:].eq(1).all()


class FakeEmbedding:
    def __init__(self, name, count, width=64):
        self.name, self.vectors, self.short_hash = name, torch.randn(count, width), "0123456789ab"


def test_an_embedding_takes_as_many_places_as_vectors_and_is_never_split(tokenizer):
    embedding = FakeEmbedding("sunsetstyle", 4)
    name_tokens = len(tokenizer.bpe("sunsetstyle", add_special_tokens=False).input_ids)
    assert name_tokens > 1  # matched on its tokens, as AUTOMATIC1111 does
    chunks = tokenizer.chunks([("cat sunsetstyle dog", 1.1)], [embedding])
    assert chunks.embeddings == [(0, 2, embedding)]  # after the start token and "cat"
    assert chunks.input_ids[0, 6].item() == word_id(tokenizer, "dog")
    assert chunks.weights[0, 2:6].tolist() == pytest.approx([1.1] * 4)
    # 73 words, then the embedding's 4 vectors do not fit in the 2 places left: they open the next chunk
    chunks = tokenizer.chunks([(" ".join(["cat"] * 73) + " sunsetstyle", 1.0)], [embedding])
    assert chunks.embeddings == [(1, 1, embedding)]
    assert chunks.input_ids[0, 74].item() == END_ID and chunks.input_ids.shape == (2, 77)


def test_past_eight_chunks_the_rest_is_dropped_with_a_warning(tokenizer):
    with pytest.warns(UserWarning, match="prompt is 9 chunks of 75 tokens, more than the 8 read"):
        chunks = tokenizer.chunks([(" ".join(["cat"] * 600 + ["dog"] * 3), 1.0)])
    assert chunks.input_ids.shape == (8, 77) and chunks.dropped == "dog dog dog"


# --- the encoding, against transformers' CLIPTextModel fed the same frames, weighted by the rule


@pytest.fixture(scope="module", params=[1, 2], ids=["SD 1.x", "SD 2.x"])
def small_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / f"sd{request.param}.safetensors"
    sd2 = dict(pad_token_id=PAD_ZERO, skip_last_layers=1) if request.param == 2 else {}  # OpenCLIP's padding
    save_checkpoint(path, *small_sd(request.param, seed=5), image_size=64, **sd2)
    model = load_checkpoint(path)
    clip = clip_reference(model.text_encoder.config)
    clip.load_state_dict({k.removeprefix("text_model."): v for k, v in model.text_encoder.state_dict().items()})
    assert model.tokenizer.pad_token_id == (END_ID if request.param == 1 else PAD_ZERO)
    return model, clip, model.tokenizer.pad_token_id


def reference_context(clip, frames, skip):
    """Each frame through transformers' CLIP on its own (skip: the layers not run, then the final norm), each
    token's output times its weight, the chunk rescaled to its old mean; the chunks end to end."""
    parts = []
    for ids, weights in frames:
        out = clip(torch.tensor([ids]), output_hidden_states=True)
        z = out.last_hidden_state if skip == 0 else clip.final_layer_norm(out.hidden_states[-1 - skip])
        weighted = z * torch.tensor(weights)[None, :, None]
        parts.append(weighted * (z.double().mean() / weighted.double().mean()).float())  # the means, exactly
    return torch.cat(parts, dim=1)[0]


@pytest.mark.parametrize("count", [10, 100, 160, 280])  # 1, 2, 3 and 4 chunks
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("clip_skip", [1, 2])  # as AUTOMATIC1111 counts: 1 reads the last layer
def test_the_context_equals_clip_on_each_chunk_weighted_by_the_rule(small_model, tokenizer, count, weighted, clip_skip):
    model, clip, pad_id = small_model
    prompt, tokens = weighted_prompt(count, weighted)
    with torch.no_grad():
        ours, _ = encode_prompt(model, prompt, clip_skip - 1)
        expected = reference_context(clip, frames_by_hand(tokenizer, tokens, pad_id), clip_skip - 1)
    assert ours.shape == expected.shape == (77 * -(-count // 75), model.text_encoder.config.width)
    error = ((ours - expected).norm() / expected.norm()).item()
    assert error <= 1e-5, f"relative error {error:.2e}"


def test_emphasis_moves_the_weighted_tokens_and_keeps_the_mean(small_model):
    model, _, _ = small_model
    with torch.no_grad():
        plain, _ = encode_prompt(model, "cat dog red", 0)
        weighted, _ = encode_prompt(model, "cat (dog:1.5) red", 0)
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)
    ratio = weighted / plain
    assert torch.allclose(ratio[2], 1.5 * ratio[1], rtol=1e-4)  # dog against its neighbours: 1.5 times
    assert torch.allclose(ratio[1], ratio[3], rtol=1e-5)


# --- the whole run, against diffusers' pipeline given prompt_embeds built by the reference


@pytest.fixture(scope="module")
def pipeline_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    save_checkpoint(path, *small_sd(1, seed=3), image_size=64)
    model = load_checkpoint(path)
    twins = diffusers_twins(load_file(str(path)), model.unet.config, model.vae.config, model.text_encoder.config,
                            sample_size=8)
    components = dict(unet=twins.unet, vae=twins.vae, text_encoder=twins.text_encoder,
                      tokenizer=CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR), model_max_length=77))
    return model, components


def diffusers_pipeline(components, sampler):
    pipe = StableDiffusionPipeline(**components, scheduler=reference_scheduler(sampler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_embeds(tokenizer, clip, prompt_tokens, chunks):
    """The reference context of a prompt given as (word, weight) tokens, padded with the empty prompt's frame."""
    frames = frames_by_hand(tokenizer, prompt_tokens, END_ID)
    frames += frames_by_hand(tokenizer, [], END_ID) * (chunks - len(frames))
    with torch.no_grad():
        return reference_context(clip, frames, 0)[None]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_a_weighted_two_chunk_prompt_makes_diffusers_picture_from_the_reference_embeds(pipeline_pair, tokenizer,
                                                                                       sampler):
    model, components = pipeline_pair
    prompt, tokens = weighted_prompt(110, weighted=True)
    negative, negative_tokens = weighted_prompt(6, weighted=False)  # one chunk, padded with the empty one
    ours = generate(model, prompt, negative, steps=6, guidance=5.0, sampler=sampler, seed=7, height=48, width=64,
                    progress=False).images
    clip = components["text_encoder"]
    pipe = diffusers_pipeline(components, sampler)
    theirs = pipe(prompt_embeds=reference_embeds(tokenizer, clip, tokens, 2),
                  negative_prompt_embeds=reference_embeds(tokenizer, clip, negative_tokens, 2),
                  num_inference_steps=6, guidance_scale=5.0, height=48, width=64,
                  generator=[torch.Generator().manual_seed(7)], output_type="pt").images
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_prompt_editing_switches_the_conditioning_where_diffusers_is_switched_by_a_callback(pipeline_pair, tokenizer):
    """[cat dog:sky sun:2] at 6 steps: 'cat dog' at step indices 0 to 2 (AUTOMATIC1111's rule), 'sky sun' after."""
    model, components = pipeline_pair
    ours = generate(model, "[cat dog:sky sun:2]", "", steps=6, guidance=4.0, sampler="euler", seed=11, height=48,
                    width=64, progress=False).images
    clip = components["text_encoder"]
    before = reference_embeds(tokenizer, clip, [("cat", 1.0), ("dog", 1.0)], 1)
    after = reference_embeds(tokenizer, clip, [("sky", 1.0), ("sun", 1.0)], 1)
    empty = reference_embeds(tokenizer, clip, [], 1)

    def switch(pipe, i, t, tensors):  # diffusers holds [negative, prompt] in prompt_embeds under guidance
        return {"prompt_embeds": torch.cat([empty, after])} if i == 2 else {}

    pipe = diffusers_pipeline(components, "euler")
    theirs = pipe(prompt_embeds=before, negative_prompt_embeds=empty, num_inference_steps=6, guidance_scale=4.0,
                  height=48, width=64, generator=[torch.Generator().manual_seed(11)], output_type="pt",
                  callback_on_step_end=switch, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    assert (ours - theirs).abs().max().item() <= 1e-3
    never = generate(model, "cat dog", "", steps=6, guidance=4.0, sampler="euler", seed=11, height=48, width=64,
                     progress=False).images
    assert (ours - never).abs().max().item() > 5e-3  # the switch shows, well past the tolerance


def test_each_stretch_of_steps_has_its_conditioning_and_two_call_samplers_switch_by_step(pipeline_pair):
    model, _ = pipeline_pair
    schedule = schedule_conditioning(model, ["[cat:dog:3]", "[red|blue]"], "sky", 6, guided=True)
    assert [last for last, _ in schedule.stretches] == [1, 2, 3, 4, 5, 6]
    cat, dog, red, blue, sky = (encode_prompt(model, w, 0)[0] for w in ("cat", "dog", "red", "blue", "sky"))
    for step, (first, second) in enumerate([(cat, red), (cat, red), (cat, blue), (cat, red), (dog, blue),
                                            (dog, red), (dog, blue)]):
        context = schedule.at(step).context
        assert torch.equal(context[0], sky) and torch.equal(context[1], sky)  # the negative half, for both
        assert torch.equal(context[2], first) and torch.equal(context[3], second), step
    # Heun calls the UNet twice a step: its calls 2s and 2s + 1 are step s; PLMS takes its first step twice
    heun = samplers.make_plan("heun", 6)
    assert [samplers.step_of_call(heun, i) for i in range(len(heun.timesteps))] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    plms = samplers.make_plan("pndm", 6)
    assert [samplers.step_of_call(plms, i) for i in range(len(plms.timesteps))] == [0, 0, 1, 2, 3, 4, 5]


# --- textual inversion, against diffusers' load_textual_inversion on the same file


def write_embedding(folder, layout, name, vectors):
    """An embedding file as each tool writes it: AUTOMATIC1111's .safetensors and .pt, diffusers' learned_embeds."""
    from safetensors.torch import save_file
    if layout == "a1111 safetensors":
        path = folder / f"{name}.safetensors"
        save_file({"emb_params": vectors}, str(path))
    elif layout == "a1111 pt":
        path = folder / f"{name}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                    "name": name, "step": 3000, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    else:
        path = folder / f"{name}.bin"
        torch.save({name: vectors[0] if len(vectors) == 1 else vectors}, path)
    return path


@pytest.mark.parametrize("layout", ["a1111 safetensors", "a1111 pt", "diffusers bin"])
@pytest.mark.parametrize("count", [1, 3])
def test_an_embedding_gives_the_context_diffusers_gives_after_load_textual_inversion(pipeline_pair, tmp_path, layout,
                                                                                      count):
    from sd_scratch.loading.embeddings import load_embedding
    model, components = pipeline_pair
    width = model.text_encoder.config.width
    vectors = torch.randn(count, width, generator=torch.Generator().manual_seed(count))
    path = write_embedding(tmp_path, layout, "glowstyle", vectors)
    embedding = load_embedding(path, width)
    prompt = "a (red:1.0) boat on a lake, glowstyle, at dusk"
    with torch.no_grad():
        ours, used = encode_prompt(model, prompt, 0, [embedding])
    assert used == {"glowstyle"}
    fresh_tokenizer = CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR), model_max_length=77)  # it gains tokens
    pipe = diffusers_pipeline(dict(components, tokenizer=fresh_tokenizer), "euler")
    pipe.text_encoder = clip_copy(components["text_encoder"])  # diffusers grows its embedding table: not the shared one
    pipe.load_textual_inversion(str(path), token="glowstyle")
    theirs, _ = pipe.encode_prompt(prompt.replace("(red:1.0)", "red"), "cpu", 1, False)
    error = ((ours - theirs[0]).norm() / theirs.norm()).item()
    assert error <= 1e-6, f"relative error {error:.2e}"
    with torch.no_grad():
        plain, _ = encode_prompt(model, prompt, 0)
    assert (plain - ours).abs().max() > 1e-2  # the vectors do count


def clip_copy(clip):
    import copy
    return copy.deepcopy(clip)


def test_a_multi_vector_embedding_moves_whole_to_the_next_chunk(pipeline_pair, tokenizer):
    from sd_scratch.loading.embeddings import Embedding
    model, _ = pipeline_pair
    vectors = torch.randn(5, model.text_encoder.config.width, generator=torch.Generator().manual_seed(1))
    embedding = Embedding("glowstyle", vectors, "0123456789ab", None)
    prompt = " ".join(["cat"] * 72) + " glowstyle dog"
    chunks = tokenizer.chunks([(prompt, 1.0)], [embedding])
    assert chunks.embeddings == [(1, 1, embedding)] and chunks.input_ids[1, 6].item() == word_id(tokenizer, "dog")
    with torch.no_grad():
        context, _ = encode_prompt(model, prompt, 0, [embedding])
        token_embeddings = model.text_encoder.text_model.embeddings.token_embedding(chunks.input_ids)
        token_embeddings[1, 1:6] = vectors
        expected = model.text_encoder(chunks.input_ids, 0, token_embeddings).flatten(0, 1)
    torch.testing.assert_close(context, expected)
