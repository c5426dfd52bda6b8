import pytest
import torch
from transformers import AutoTokenizer

from bvpo.chat import EMPTY_THINK, ModelError, check_thinking_template, completion_text, render_prompt
from bvpo.modeling import load_model, load_tokenizer, save_model, write_model_pointer
from bvpo.sequences import collate, encode, fits, parse_completion


def completion_tokens(tokenizer, encoded):
    return tokenizer.decode(encoded.input_ids[encoded.completion_start:])


def test_thinking_on_scores_trace_and_answer(tokenizer):
    completion = completion_text("12+30=42.", "42", tokenizer.eos_token)
    e = encode(tokenizer, "Compute 12+30.", completion, thinking=True)
    scored = completion_tokens(tokenizer, e)
    assert scored == "<think>\n12+30=42.\n</think>\n\n42<|im_end|>"
    prompt = tokenizer.decode(e.input_ids[: e.completion_start])
    assert "<think>" not in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_thinking_off_puts_the_empty_block_in_the_prompt(tokenizer):
    completion = completion_text(None, "42", tokenizer.eos_token)
    e = encode(tokenizer, "Compute 12+30.", completion, thinking=False)
    assert completion_tokens(tokenizer, e) == "42<|im_end|>"
    prompt = tokenizer.decode(e.input_ids[: e.completion_start])
    assert prompt.endswith("<|im_start|>assistant\n" + EMPTY_THINK)


def test_completion_mask_covers_exactly_the_completion(tokenizer):
    a = encode(tokenizer, "Compute 1+2.", "3<|im_end|>", thinking=False)
    b = encode(tokenizer, "Compute 10+20+30.", "<think>\nx\n</think>\n\n60<|im_end|>", True)
    batch = collate([a, b], tokenizer.pad_token_id)
    for row, e in enumerate((a, b)):
        mask = batch["completion_mask"][row]
        assert mask.sum().item() == len(e.input_ids) - e.completion_start
        assert mask[: e.completion_start].sum().item() == 0
        assert batch["attention_mask"][row].sum().item() == len(e.input_ids)


def test_a_sequence_too_long_is_kept_whole_and_does_not_fit(tokenizer):
    completion = "<think>\n" + "1+1=2. " * 10 + "\n</think>\n\n2<|im_end|>"
    e = encode(tokenizer, "Compute " + "1+" * 40 + "1.", completion, True)
    assert len(e.input_ids) > 100 and not fits(e, 100) and fits(e, len(e.input_ids))
    assert completion_tokens(tokenizer, e) == completion
    prompt = tokenizer.decode(e.input_ids[: e.completion_start])
    assert prompt.startswith("<|im_start|>user\nCompute 1+1+")  # the prompt is not cut either


def test_template_honours_enable_thinking_like_qwen3(tokenizer):
    on = render_prompt(tokenizer, "hi", thinking=True)
    off = render_prompt(tokenizer, "hi", thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = render_prompt(tokenizer, "Compute 5-3.", False) + "2<|im_end|>"
    assert loaded(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids
    assert loaded.convert_ids_to_tokens(loaded("<think></think>", add_special_tokens=False).input_ids) == [
        "<think>", "</think>"]
    check_thinking_template(loaded, str(tmp_path))


def test_model_without_thinking_template_is_refused(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    loaded.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with pytest.raises(ModelError, match="neither honours enable_thinking nor opens a think block"):
        check_thinking_template(loaded, "some-model")
    loaded.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        check_thinking_template(loaded, "some-model")


def test_pointer_and_saved_model_both_load(tokenizer, tiny_model, tmp_path):
    save_model(tiny_model, tokenizer, tmp_path / "model")
    write_model_pointer(str(tmp_path / "model"), tmp_path / "pointer")
    for where in ("model", "pointer"):
        model = load_model(tmp_path / where)
        assert load_tokenizer(tmp_path / where).eos_token == "<|im_end|>"
        for a, b in zip(model.parameters(), tiny_model.parameters()):
            assert torch.equal(a, b)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no model here"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "text, thinking, trace, answer, malformed",
    [
        ("<think>\n1+1=2.\n</think>\n\n2", True, "1+1=2.", "2", False),
        ("<think>\n1+1=2. 2+2", True, "1+1=2. 2+2", "", True),
        ("  7 ", False, None, "7", False),
        # Thinking off: the template closed an empty block; a block of the model's own is not
        # a no-thinking answer, whether closed or not.
        ("<think>\n1+1=2\n</think>\n\n2", False, None, "", True),
        ("</think>2", False, None, "", True),
    ],
)
def test_parse_completion(text, thinking, trace, answer, malformed):
    parsed = parse_completion(text, thinking)
    assert (parsed.trace, parsed.answer, parsed.malformed) == (trace, answer, malformed)


def scored_with_gradient(model, weights, scorer):
    """(log-probs, token counts, every parameter's gradient of Σ weights · log-probs)."""
    model.zero_grad(set_to_none=True)
    logps, counts = scorer()
    (logps * weights).sum().backward()
    return logps.detach(), counts, [p.grad.clone() for p in model.parameters()]


def assert_pairs_score_like_separate_sequences(model, first, second, pad_id):
    """score_pairs over (first, second) gives each sequence's log-prob, token count and
    gradient (of a weighted sum) as scoring it in its own sequence does."""
    from bvpo.sequences import collate, score, score_pairs

    weights = torch.tensor([0.3, -1.2, 0.7, 2.0, -0.4, 1.1])
    shared = scored_with_gradient(model, weights, lambda: score_pairs(model, first, second, pad_id))
    separate = scored_with_gradient(model, weights, lambda: score(model, collate(first + second, pad_id)))
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(shared[0], separate[0], rtol=1e-6, atol=1e-4)
    assert shared[1].tolist() == separate[1].tolist()
    for a, b in zip(shared[2], separate[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("thinking", [True, False])
def test_prompt_sharing_pairs_score_like_separate_sequences_in_value_and_gradient(tokenizer, tiny_model, thinking):
    """One [prompt, chosen, rejected] sequence per pair gives each completion's log-prob and
    its gradient as scoring it in its own sequence does (uneven lengths, padding included)."""
    from bvpo.sequences import shares_prompt

    assert shares_prompt(tiny_model)
    trace = "12+3=15\n15-4=11" if thinking else None
    prompts = ["Compute 12+3-4.", "Compute 50-7.", "Compute 9+9+9."]
    chosen = [encode(tokenizer, p, completion_text(trace, "11", tokenizer.eos_token), thinking) for p in prompts]
    rejected = [encode(tokenizer, p, completion_text(trace, a, tokenizer.eos_token), thinking)
                for p, a in zip(prompts, ["7", "43", "1234"])]
    assert_pairs_score_like_separate_sequences(tiny_model, chosen, rejected, tokenizer.pad_token_id)


@pytest.mark.parametrize("think_first", [True, False])
def test_one_problem_in_both_modes_scores_like_separate_sequences(tokenizer, tiny_model, think_first):
    """The warmup's layout: a problem written with and without a trace shares only the head of
    its prompt (the no-thinking prompt goes on with the empty think block). With the thinking
    sequence first the branch is followed by prompt tokens; with it second its completion
    starts right at the branch and its first token is predicted by the shared prefix. Either
    way: each sequence's log-prob, token count and gradient as in its own sequence."""
    from bvpo.sequences import collate_pairs, shared_prefix

    problems = [("Compute 12+3-4.", "12+3=15\n15-4=11", "11"), ("Compute 50-7.", "50-7=43", "43"),
                ("Compute 9+9+9.", "9+9=18\n18+9=27\ncheck 27-9=18", "27")]
    think = [encode(tokenizer, p, completion_text(t, a, tokenizer.eos_token), True) for p, t, a in problems]
    empty = [encode(tokenizer, p, completion_text(None, a, tokenizer.eos_token), False) for p, _, a in problems]
    first, second = (think, empty) if think_first else (empty, think)
    assert all(shared_prefix(a, b) == think[0].completion_start for a, b in zip(first[:1], second[:1]))
    assert collate_pairs(first, second, tokenizer.pad_token_id)["branch_scored"].tolist() == \
        [0.0 if think_first else 1.0] * len(problems)
    assert_pairs_score_like_separate_sequences(tiny_model, first, second, tokenizer.pad_token_id)


def test_scoring_under_activation_checkpointing_matches_plain_scoring(tokenizer):
    """FSDP's activation checkpointing (accelerate wraps each decoder layer with torch's
    checkpoint wrapper) recomputes every layer in the backward pass. Scoring must not build a
    KV cache, or the recomputed attention sees each key twice (found on a GPU: a shape error in
    the backward pass of the 4k-token case). Same values and gradients as without the wrapper."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    from bvpo.modeling import build_tiny_model
    from bvpo.sequences import score_pairs

    prompts = ["Compute 12+3-4.", "Compute 50-7."]
    chosen = [encode(tokenizer, p, completion_text("1+1=2", "11", tokenizer.eos_token), True) for p in prompts]
    rejected = [encode(tokenizer, p, completion_text("2+2=4", "7", tokenizer.eos_token), True) for p in prompts]

    def run(checkpointed: bool):
        model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                 max_length=192, seed=0)
        if checkpointed:
            apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Qwen3DecoderLayer))
        logps, _ = score_pairs(model, chosen, rejected, tokenizer.pad_token_id)
        logps.sum().backward()
        return logps.detach(), [p.grad for p in model.parameters()]

    plain, wrapped = run(False), run(True)
    torch.testing.assert_close(wrapped[0], plain[0])
    for a, b in zip(wrapped[1], plain[1]):
        torch.testing.assert_close(a, b)


def test_auto_dtype_is_bf16_on_a_bf16_gpu_and_fp32_elsewhere(monkeypatch):
    from bvpo.modeling import resolve_dtype

    assert resolve_dtype("auto", "cpu") == "fp32" and resolve_dtype("bf16", "cpu") == "bf16"
    # No GPU here: what CUDA would answer is stood in, the decision is the real code's.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto", "cuda") == "bf16" and resolve_dtype("fp16", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype("auto", "cuda") == "fp32"


def environment_for(project, model_path, extra=None):
    import json
    import os
    import subprocess
    import sys

    import yaml

    (project / "params.yaml").write_text(yaml.safe_dump({"model": {"path": model_path}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | (extra or {})
    code = ("import json, os; from bvpo.runtime import configure_environment; configure_environment(%r); "
            "print(json.dumps({k: os.environ.get(k) for k in ('HF_HOME', 'HF_HUB_OFFLINE')}))" % str(project))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_a_hub_model_keeps_the_users_hugging_face_settings(tmp_path):
    """The embedded model (or local folders) runs offline with its cache in the project; a hub id
    (`Qwen/Qwen3-0.6B`) keeps the user's HF_HOME and network. Both used to be forced offline."""
    local = tmp_path / "model"
    local.mkdir()
    assert environment_for(tmp_path, None) == {"HF_HOME": str(tmp_path / ".hf"), "HF_HUB_OFFLINE": "1"}
    assert environment_for(tmp_path, str(local)) == {"HF_HOME": str(tmp_path / ".hf"), "HF_HUB_OFFLINE": "1"}
    assert environment_for(tmp_path, "Qwen/Qwen3-0.6B") == {"HF_HOME": None, "HF_HUB_OFFLINE": None}
    assert environment_for(tmp_path, "Qwen/Qwen3-0.6B", {"HF_HOME": "/mine"}) == {"HF_HOME": "/mine",
                                                                                  "HF_HUB_OFFLINE": None}
    assert environment_for(tmp_path, None, {"HF_HOME": "/mine"})["HF_HOME"] == "/mine"


def test_a_hub_id_that_cannot_be_fetched_says_how_to_fix_it(tmp_path, monkeypatch):
    from bvpo.modeling import hub_kwargs

    assert hub_kwargs(str(tmp_path)) == {"local_files_only": True} and hub_kwargs("Qwen/Qwen3-0.6B") == {}
    write_model_pointer("Qwen/Qwen3-0.6B", tmp_path / "pointer")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    for given in (tmp_path / "pointer", "Qwen/Qwen3-0.6B"):  # through the warmup's pointer, or as model.path
        with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set, so only the local Hugging Face cache is read"):
            load_tokenizer(given)


def assert_packed_scores_like_separate_sequences(model, groups_of_sequences, pad_id, max_tokens):
    """Packed rows give every sequence's per-token log-probs, sum, token count and gradient (of a
    weighted sum) as scoring it in its own sequence does."""
    from bvpo.packing import make_group, pack, packed_token_logps, score_packed
    from bvpo.sequences import collate

    groups = [make_group(sequences) for sequences in groups_of_sequences]
    rows = pack(groups, max_tokens)
    flat = [s for sequences in groups_of_sequences for s in sequences]
    weights = torch.linspace(-1.5, 2.0, len(flat))

    def separate():
        batch = collate(flat, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        picked = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["completion_mask"][:, 1:].float()
        return (picked * mask).sum(-1), mask.sum(-1)

    packed = scored_with_gradient(model, weights, lambda: score_packed(model, groups, rows, pad_id))
    alone = scored_with_gradient(model, weights, separate)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(packed[0], alone[0], rtol=1e-6, atol=1e-4)
    assert packed[1].tolist() == alone[1].tolist() == [len(s.input_ids) - s.completion_start for s in flat]
    for a, b in zip(packed[2], alone[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # per token, in text order (what the analyze stage reads)
        tokens, sequence = packed_token_logps(model, groups, rows, pad_id)
        batch = collate(flat, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        for j, s in enumerate(flat):
            torch.testing.assert_close(tokens[sequence == j], expected[j, s.completion_start - 1:len(s.input_ids) - 1],
                                       rtol=1e-5, atol=1e-5)
    return rows


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("max_tokens", [1, 64, 4096])
def test_packed_groups_score_like_separate_sequences(tokenizer, tiny_model, thinking, max_tokens):
    """Groups of 1 to 4 completions of one prompt (a DPO pair, the k samples the analyze stage
    scores), uneven lengths, packed into rows one group each, several per row, or all in one."""
    trace = "12+3=15\n15-4=11" if thinking else None
    answers = {"Compute 12+3-4.": ["11", "7", "1234"], "Compute 50-7.": ["43"], "Compute 9+9+9.": ["27", "8", "0", "99"],
               "Compute 1+2.": ["3", "12"]}
    groups = [[encode(tokenizer, p, completion_text(trace if i else None, a, tokenizer.eos_token) if thinking
                      else completion_text(None, a, tokenizer.eos_token), thinking) for i, a in enumerate(options)]
              for p, options in answers.items()]
    rows = assert_packed_scores_like_separate_sequences(tiny_model, groups, tokenizer.pad_token_id, max_tokens)
    assert len(rows) == {1: 4, 4096: 1}.get(max_tokens, len(rows))
    assert sorted(g for row in rows for g in row) == [0, 1, 2, 3]


def test_grouped_token_logps_are_each_sequences_own_in_input_order(tokenizer, tiny_model):
    """The analyze stage's scoring: samples keyed by (prompt, mode), interleaved in the input,
    grouped so each prompt runs once, batched; every sequence gets its own log-probs back in
    input order, as scoring it alone gives."""
    from bvpo.packing import grouped_token_logps

    prompts = {"Compute 12+3-4.": ["11", "7", "1234"], "Compute 50-7.": ["43", "4"], "Compute 1+2.": ["3"]}
    samples = [(p, a) for i in range(3) for p, options in prompts.items() if i < len(options) for a in [options[i]]]
    encoded = [encode(tokenizer, p, completion_text(None, a, tokenizer.eos_token), False) for p, a in samples]
    keys = [(p, "nothink") for p, _ in samples]
    for batch_size in (1, 2, 100):
        got = grouped_token_logps(tiny_model, encoded, keys, batch_size, tokenizer.pad_token_id)
        for e, values in zip(encoded, got):
            with torch.no_grad():
                logits = tiny_model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits
            alone = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, torch.tensor(e.input_ids[1:])[:, None])[:, 0]
            torch.testing.assert_close(values, alone[e.completion_start - 1:], rtol=1e-5, atol=1e-5)


def test_one_problem_in_both_modes_packs_like_separate_sequences(tokenizer, tiny_model):
    """The warmup's layout in packed rows: a problem with and without a trace share only the
    head of their prompts; either may come first."""
    problems = [("Compute 12+3-4.", "12+3=15\n15-4=11", "11"), ("Compute 50-7.", "50-7=43", "43")]
    think = [encode(tokenizer, p, completion_text(t, a, tokenizer.eos_token), True) for p, t, a in problems]
    empty = [encode(tokenizer, p, completion_text(None, a, tokenizer.eos_token), False) for p, _, a in problems]
    assert_packed_scores_like_separate_sequences(
        tiny_model, [[think[0], empty[0]], [empty[1], think[1]]], tokenizer.pad_token_id, 4096)


def test_packed_pairs_give_score_pairs_layout(tokenizer, tiny_model):
    """`score_pairs_packed` returns chosen then rejected, as `score_pairs` does, in one row."""
    from bvpo.packing import pair_rows, score_pairs_packed
    from bvpo.sequences import score_pairs

    prompts = ["Compute 12+3-4.", "Compute 50-7.", "Compute 9+9+9."]
    chosen = [encode(tokenizer, p, completion_text("1+1=2", "11", tokenizer.eos_token), True) for p in prompts]
    rejected = [encode(tokenizer, p, completion_text(None, a, tokenizer.eos_token), True)
                for p, a in zip(prompts, ["7", "43", "1234"])]
    with torch.no_grad():
        packed = score_pairs_packed(tiny_model, chosen, rejected, tokenizer.pad_token_id)
        padded = score_pairs(tiny_model, chosen, rejected, tokenizer.pad_token_id)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-6, atol=1e-4)
    assert packed[1].tolist() == padded[1].tolist()
    sizes = [len(c.input_ids) + len(r.input_ids) - c.completion_start for c, r in zip(chosen, rejected)]
    rows = pair_rows(chosen, rejected, [0, 1, 2], max(sizes))  # room for one pair per row at most
    assert sorted(i for row in rows for i in row) == [0, 1, 2] and all(len(row) == 1 for row in rows)


def test_flex_attention_block_mask_scores_like_the_dense_mask(tokenizer):
    """The GPU path's block mask is the dense mask's layout (forward only: torch has no
    FlexAttention backward on a CPU; the trainer refuses flex_attention there)."""
    from bvpo.modeling import build_tiny_model
    from bvpo.packing import make_group, pack, score_packed

    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                             max_length=192, seed=1)
    groups = [make_group([encode(tokenizer, p, completion_text("2+2=4", a, tokenizer.eos_token), True)
                          for a in answers]) for p, answers in (("Compute 2+2.", ["4", "5"]), ("Compute 7-1.", ["6"]))]
    rows = pack(groups, 4096)
    with torch.no_grad():
        dense = score_packed(model, groups, rows, tokenizer.pad_token_id)
        model.set_attn_implementation("flex_attention")
        flex = score_packed(model, groups, rows, tokenizer.pad_token_id)
    torch.testing.assert_close(flex[0], dense[0], rtol=1e-5, atol=1e-4)


def test_packed_rows_under_eager_attention_mask_like_sdpa(tokenizer):
    """Eager attention adds its mask to the scores, so the layout goes in as an additive mask
    (a boolean one would mask nothing); kernels that take no custom mask are refused."""
    from bvpo.modeling import build_tiny_model

    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                             max_length=192, seed=2)
    model.set_attn_implementation("eager")
    groups = [[encode(tokenizer, p, completion_text("2+2=4", a, tokenizer.eos_token), True) for a in answers]
              for p, answers in (("Compute 2+2.", ["4", "5", "40"]), ("Compute 7-1.", ["6"]))]
    assert_packed_scores_like_separate_sequences(model, groups, tokenizer.pad_token_id, 4096)
    from bvpo.packing import make_group, score_packed

    model.config._attn_implementation = "flash_attention_2"  # what the check reads; no kernel runs
    with pytest.raises(ValueError, match="flash_attention_2"):
        score_packed(model, [make_group(g) for g in groups], [[0, 1]], tokenizer.pad_token_id)


@pytest.mark.parametrize("greedy", [True, False])
def test_a_static_kv_cache_generates_what_the_dynamic_one_does(tokenizer, tiny_model, greedy, monkeypatch):
    """`sample.kv_cache: static` preallocates one cache length for every batch (the shape a GPU
    compiles once); the tokens must not change: greedy, and sampled at the same seed, over
    uneven prompt lengths and a smaller last batch."""
    from bvpo.chat import render_prompt
    from bvpo.sequences import generate

    prompts = ["What is 12 + 7?", "What is 3 * 4 - 5 + 61 * 2?", "Hi", "What is 99 - 98?",
               "Compute " + "1 + " * 20 + "1."]
    calls, real_generate = [], tiny_model.generate

    def spy(**kwargs):
        calls.append((kwargs.get("cache_implementation"), kwargs.get("max_cache_len")))
        return real_generate(**kwargs)

    monkeypatch.setattr(tiny_model, "generate", spy)
    out = {}
    for kv_cache in ("dynamic", "static"):
        torch.manual_seed(0)
        out[kv_cache] = generate(tiny_model, tokenizer, prompts, True, 12, 3, greedy=greedy, kv_cache=kv_cache)
    assert [g.text for g in out["static"]] == [g.text for g in out["dynamic"]]
    assert [g.n_tokens for g in out["static"]] == [g.n_tokens for g in out["dynamic"]]
    longest = max(len(tokenizer(render_prompt(tokenizer, p, True), add_special_tokens=False).input_ids)
                  for p in prompts)
    assert calls == [(None, None)] * 2 + [("static", longest + 12)] * 2
