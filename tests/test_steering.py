"""safesteer/sampling.py, hooks.py and teacher.py: the sampler against generate() and an uncached reference,
the hooks against manual residual edits, the teacher object."""
import pytest
import torch

from safesteer.chat import encode_chats
from safesteer.files import save_tensors, write_json
from safesteer.hooks import add_vector, decoder_layers
from safesteer.sampling import _filter_logits, prefill, sample
from safesteer.teacher import SAFETY_SYSTEM_PROMPT, Teacher, load_teacher
from safesteer import forcing
from safesteer.errors import UserError


def batch(tok, prompts=("hi", "tell me a long story please", "why?")):
    return encode_chats(tok, list(prompts))


# ----------------------------------------------------------------------------- sampler

@pytest.mark.parametrize("prompts", [("hello there",), ("hi", "tell me a long story please", "why?")])
def test_greedy_equals_generate(tok, model, prompts):
    ids, mask = batch(tok, prompts)
    ours, _ = sample(model, ids, mask, 12, temperature=0, stop_ids=[10_000], pad_id=tok.pad_token_id)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert torch.equal(ours, ref[:, ids.shape[1]:])


def naive_sample(model, ids, mask, steps, gen, temperature):
    """No cache: the whole sequence is re-run every step; the draws use the same generator calls."""
    out = []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)
        out.append(nxt)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(out, 1)


def test_sampling_matches_uncached_reference_and_seed(tok, model):
    ids, mask = batch(tok)
    kw = dict(temperature=0.8, stop_ids=[10_000], pad_id=tok.pad_token_id)
    a, _ = sample(model, ids, mask, 10, generator=torch.Generator().manual_seed(3), **kw)
    b, _ = sample(model, ids, mask, 10, generator=torch.Generator().manual_seed(3), **kw)
    c, _ = sample(model, ids, mask, 10, generator=torch.Generator().manual_seed(4), **kw)
    with torch.no_grad():
        ref = naive_sample(model, ids, mask, 10, torch.Generator().manual_seed(3), 0.8)
    assert torch.equal(a, b) and torch.equal(a, ref)
    assert not torch.equal(a, c)


def test_repeated_prompts_sample_like_distinct_rows(tok, model):
    """Stage 3's G samples of one prompt share one prefill; the draws are still the per-row reference's."""
    ids, mask = batch(tok, ("hi", "hi", "why?", "hi", "why?"))
    kw = dict(temperature=1.0, stop_ids=[10_000], pad_id=tok.pad_token_id)
    a, _ = sample(model, ids, mask, 8, generator=torch.Generator().manual_seed(5), **kw)
    with torch.no_grad():
        ref = naive_sample(model, ids, mask, 8, torch.Generator().manual_seed(5), 1.0)
    assert torch.equal(a, ref)
    assert not torch.equal(a[0], a[1])  # same prompt, independent draws


def test_rows_stop_independently(tok, model):
    ids, mask = batch(tok)
    free, _ = sample(model, ids, mask, 10, temperature=0, stop_ids=[10_000], pad_id=tok.pad_token_id)
    stop = int(free[0, 2])  # row 0 will stop at its third token (or earlier if it appears before)
    toks, m = sample(model, ids, mask, 10, temperature=0, stop_ids=[stop], pad_id=tok.pad_token_id)
    for r in range(len(toks)):
        hits = (free[r] == stop).nonzero()
        end = int(hits[0]) + 1 if len(hits) else free.shape[1]
        assert m[r, :end].all() and not m[r, end:].any()  # mask runs through the first stop, inclusive
        assert torch.equal(toks[r, :end], free[r, :end])
        assert (toks[r, end:] == tok.pad_token_id).all()
    assert int(m[0].sum()) <= 3


def test_the_samplers_mask_is_the_end_of_turn_mask(tok, model):
    """sample's mask is forcing.end_of_turn_mask of its tokens: through each row's first stop token, inclusive
    (here a stop token the rows draw often, so that rows stop at different steps and some never do)."""
    ids, mask = batch(tok, ("hi", "tell me a long story please", "why?", "hi"))
    kw = dict(temperature=1.0, pad_id=tok.pad_token_id)
    free, _ = sample(model, ids, mask, 12, stop_ids=[10_000], generator=torch.Generator().manual_seed(0),
                     **kw)
    stops = [int(free[0, 3]), int(free[2, 1])]  # the same draws again: row 0 stops by step 3, row 2 by step 1
    draws = torch.Generator().manual_seed(0)
    tokens, got = sample(model, ids, mask, 12, stop_ids=stops, generator=draws, **kw)
    assert torch.equal(got, forcing.end_of_turn_mask(tokens, stops))
    assert len(set(got.sum(-1).tolist())) > 1  # rows of different lengths: the edge is exercised
    rows = torch.tensor([[5, 6, 9, 7, 9], [1, 2, 3, 4, 5], [9, 9, 1, 2, 3]])
    by_hand = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(forcing.end_of_turn_mask(rows, [9]), by_hand)


def test_top_k_1_and_tiny_top_p_are_greedy(tok, model):
    ids, mask = batch(tok)
    kw = dict(stop_ids=[10_000], pad_id=tok.pad_token_id)
    greedy, _ = sample(model, ids, mask, 8, temperature=0, **kw)
    k1, _ = sample(model, ids, mask, 8, temperature=1.0, top_k=1,
                            generator=torch.Generator().manual_seed(0), **kw)
    p0, _ = sample(model, ids, mask, 8, temperature=1.0, top_p=1e-6,
                            generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(greedy, k1) and torch.equal(greedy, p0)


def test_multinomial_draws_row_after_row():
    """What RowDraws relies on: torch.multinomial over [rows, V] takes V exponentials per row from the
    generator, row after row, and a row's token depends only on its own: rows [2, 5) drawn after 2 rows'
    exponentials are the batch's rows [2, 5), and the generator ends where V·rows exponentials leave it."""
    probs = torch.rand(5, 50, generator=torch.Generator().manual_seed(0)).softmax(-1)
    gen = torch.Generator().manual_seed(1)
    whole = torch.multinomial(probs, 1, generator=gen)
    part_gen = torch.Generator().manual_seed(1)
    torch.empty(2, 50).exponential_(generator=part_gen)
    assert torch.equal(torch.multinomial(probs[2:], 1, generator=part_gen), whole[2:])
    assert torch.equal(part_gen.get_state(), gen.get_state())


def stage3_batch(tok):
    """Three prompts of different lengths, G = 3 samples each: chunks of rows pad to different widths."""
    return batch(tok, [p for p in ("hi", "tell me a long story please", "why?") for _ in range(3)])


@pytest.mark.parametrize("temperature, top_p", [(0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_sampling_n_rows_at_a_time_gives_each_row_its_tokens(tok, model, temperature, top_p):
    """rows_at_once=N (--sample-batch): every row's tokens and mask equal one batch's, for N = 1, 2, 4 (an
    uneven last chunk) and N >= rows (the batch itself), greedy and sampled, with rows that stop early (the
    chunks' widths differ); the generator ends where one batch leaves it, so later draws do not change either.
    Sampling each chunk in turn from the shared generator gives other tokens: RowDraws is what keeps them."""
    ids, mask = stage3_batch(tok)
    kw = dict(temperature=temperature, top_p=top_p, stop_ids=[10_000], pad_id=tok.pad_token_id)
    free, _ = sample(model, ids, mask, 12, generator=torch.Generator().manual_seed(1), **kw)
    kw["stop_ids"] = [int(free[0, 2])]  # row 0 stops by its third token
    gen = torch.Generator().manual_seed(1)
    tokens, tmask = sample(model, ids, mask, 12, generator=gen, **kw)
    assert tmask[0].sum() <= 3 and tmask.sum(1).max() == 12  # and some row runs on
    for n in (1, 2, 4, 9, 20):
        chunk_gen = torch.Generator().manual_seed(1)
        got, got_mask = sample(model, ids, mask, 12, generator=chunk_gen, rows_at_once=n, **kw)
        assert torch.equal(got, tokens) and torch.equal(got_mask, tmask), n
        assert torch.equal(chunk_gen.get_state(), gen.get_state()), n
    if temperature:
        shared = torch.Generator().manual_seed(1)
        naive = [sample(model, ids[a:a + 2], mask[a:a + 2], 12, generator=shared, **kw)[0][:, :3]
                 for a in range(0, 9, 2)]
        assert not torch.equal(torch.cat(naive), tokens[:, :3])


def test_a_chunk_of_rows_computes_within_float_noise_of_the_batch(tok, model):
    """A chunk's rows are padded to the chunk's longest prompt and share the chunk's common prefix, not the
    batch's: their first logits differ from the batch's by float noise only (measured 1.9e-6 of 3.8)."""
    ids, mask = stage3_batch(tok)
    whole = prefill(model, ids, mask, tok.pad_token_id).logits
    for n in (1, 2, 4):
        parts = [prefill(model, ids[a:a + n], mask[a:a + n], tok.pad_token_id).logits
                 for a in range(0, len(ids), n)]
        assert torch.allclose(torch.cat(parts), whole, rtol=0, atol=1e-5), n


def test_filter_logits_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_logits(logits, 0, 0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.75
    kept = torch.isfinite(_filter_logits(logits, 3, 1.0))
    assert kept.tolist() == [[True, True, True, False]]


# ----------------------------------------------------------------------------- hooks

def record_block_inputs(model):
    seen, handles = {}, []
    for i, block in enumerate(decoder_layers(model)):
        handles.append(block.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(
                i, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True))
    return seen, handles


def test_add_vector_equals_manual_edit(tok, model):
    ids, mask = batch(tok)
    vec = torch.randn(model.config.hidden_size)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        # manual residual edit: a hook that we write here by hand
        h = decoder_layers(model)[2].register_forward_pre_hook(
            lambda m, a: (a[0] + 0.5 * vec,) + a[1:])
        manual = model(input_ids=ids, attention_mask=mask).logits
        h.remove()
        with add_vector(model, 2, vec, coefficient=0.5):
            seen, handles = record_block_inputs(model)
            steered = model(input_ids=ids, attention_mask=mask).logits
            [x.remove() for x in handles]
        plain, handles = record_block_inputs(model)
        model(input_ids=ids, attention_mask=mask)
        [x.remove() for x in handles]
    assert torch.allclose(seen[2] - plain[2], (0.5 * vec).expand_as(plain[2]), atol=1e-5)
    assert torch.equal(seen[1], plain[1])  # earlier blocks untouched
    assert torch.allclose(steered, manual, atol=1e-6)
    assert not torch.allclose(steered, base, atol=1e-3)


def test_add_vector_applies_at_every_cached_step(tok, model):
    """Greedy decoding with the hook and a KV cache equals generate() with the same hook."""
    ids, mask = batch(tok)
    vec = torch.randn(model.config.hidden_size)
    with add_vector(model, 1, vec):
        ours, _ = sample(model, ids, mask, 8, temperature=0, stop_ids=[10_000],
                                  pad_id=tok.pad_token_id)
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
    plain, _ = sample(model, ids, mask, 8, temperature=0, stop_ids=[10_000], pad_id=tok.pad_token_id)
    assert torch.equal(ours, ref[:, ids.shape[1]:])
    assert not torch.equal(ours, plain)


def test_hooks_removed_after_exception(model):
    vec = torch.randn(model.config.hidden_size)
    with pytest.raises(RuntimeError):
        with add_vector(model, 0, vec):
            raise RuntimeError("boom")
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_bad_vector_and_layer(model):
    with pytest.raises(UserError, match="hidden size"):
        with add_vector(model, 0, torch.zeros(7)):
            pass
    with pytest.raises(UserError, match="out of range"):
        with add_vector(model, 99, torch.zeros(model.config.hidden_size)):
            pass


def test_decoder_layers_locator():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    qwen = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    assert len(decoder_layers(gpt2)) == 2 and len(decoder_layers(qwen)) == 3


def test_hook_lands_on_its_block_when_the_model_is_split(model_dir, tmp_path, tok):
    """--device-map: a model spread by accelerate (here over the CPU and disk, the split one CPU allows) is
    steered at the same block: logits equal the unsplit model's with the same hook."""
    from transformers import AutoModelForCausalLM
    split = AutoModelForCausalLM.from_pretrained(model_dir, device_map="auto", max_memory={"cpu": "150KB"},
                                                 offload_folder=str(tmp_path / "offload")).eval()
    assert "disk" in set(split.hf_device_map.values())
    whole = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids, mask = batch(tok)
    vec = torch.randn(whole.config.hidden_size)
    with torch.no_grad():
        with add_vector(split, 3, vec, 0.7):
            a = split(input_ids=ids, attention_mask=mask).logits
        with add_vector(whole, 3, vec, 0.7):
            b = whole(input_ids=ids, attention_mask=mask).logits
        c = whole(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(b, c, atol=1e-3)


def test_stage_runs_with_device_map(model_dir, tmp_path):
    import extract_direction as ed
    ed.main(["--model", str(model_dir), "--out", str(tmp_path / "run"), "--device-map", "auto",
             "--n-train", "2", "--n-val", "2", "--layer", "1", "--position", "-1", "--n-check-prompts", "1",
             "--check-new-tokens", "2"])
    assert (tmp_path / "run" / "direction.safetensors").exists()


def test_teacher_kinds(tok, model, tmp_path):
    """hook: the same logits as add_vector; prompt: the base model on the system-prompted context; base:
    π0."""
    import contextlib
    vec = torch.randn(model.config.hidden_size)
    ids, mask = batch(tok)
    hook, prompt, base = (Teacher(model, "hook", vec, 2, 0.5), Teacher(model, "prompt"),
                          Teacher(model, "base"))
    with torch.no_grad():
        with hook.steer():
            a = model(input_ids=ids, attention_mask=mask).logits
        with add_vector(model, 2, vec, 0.5):
            b = model(input_ids=ids, attention_mask=mask).logits
        p_ids, p_mask = prompt.encode(tok, ["hi", "tell me a long story please", "why?"])
        ref_ids, ref_mask = encode_chats(tok, ["hi", "tell me a long story please", "why?"],
                                              system=SAFETY_SYSTEM_PROMPT)
        with base.steer():
            c = model(input_ids=ids, attention_mask=mask).logits
        d = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b) and torch.equal(c, d)
    assert torch.equal(p_ids, ref_ids) and torch.equal(p_mask, ref_mask) and p_ids.shape[1] > ids.shape[1]
    entered = []
    t = Teacher(model, "base", base_context=lambda: contextlib.nullcontext(entered.append(1)))
    with t.steer():
        pass
    assert entered == [1]


def test_load_teacher_takes_c_from_direction_json_unless_given(model, tmp_path):
    save_tensors(tmp_path / "direction.safetensors",
                        {"direction": torch.ones(model.config.hidden_size)})
    write_json(tmp_path / "direction.json", {"layer": 1, "coefficient": 0.25})
    t, meta = load_teacher(model, tmp_path / "direction.safetensors")
    assert (t.layer, t.coefficient, meta["coefficient"]) == (1, 0.25, 0.25)
    t, _ = load_teacher(model, tmp_path, coefficient=2.0)
    assert t.coefficient == 2.0
    write_json(tmp_path / "direction.json", {"layer": 9})
    with pytest.raises(UserError, match="out of range"):
        load_teacher(model, tmp_path)


def test_sample_groups_finds_runs_of_identical_prompts(tok):
    ids, mask = encode_chats(tok, ["a", "a", "bb", "bb", "c", "c"])
    assert forcing.sample_groups(ids, mask) == 2
    for rows in (["a", "a", "bb"], ["a", "bb", "a", "bb"], ["a", "a", "a", "bb"], ["a"], ["a", "bb"]):
        assert forcing.sample_groups(*encode_chats(tok, rows)) == 1, rows
    assert forcing.sample_groups(*encode_chats(tok, ["a"] * 4)) == 4


def test_packed_mask_keeps_samples_apart(tok, model):
    """Changing one sample of a prompt changes no other sample's logits (each sees the prompt and itself)."""
    ids, mask = encode_chats(tok, ["hello", "hello", "hello"])
    comp = torch.randint(0, 200, (3, 5), generator=torch.Generator().manual_seed(0))
    other = comp.clone()
    other[1, 2:] = (other[1, 2:] + 7) % 200
    with torch.enable_grad():
        a = forcing.packed_completion_logits(model, ids, mask, comp, 3)
        b = forcing.packed_completion_logits(model, ids, mask, other, 3)
    assert torch.allclose(a[[0, 2]], b[[0, 2]], atol=1e-6) and torch.allclose(a[1, :3], b[1, :3], atol=1e-6)
    assert (a[1, 3:] - b[1, 3:]).abs().max() > 1e-3
