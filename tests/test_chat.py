"""generate / chat / stream_chat / stream_generate end to end, with our tokenizer, on the
transformers version under test (the suite runs on the oldest and the newest)."""

import uuid

import pytest
import torch
from conftest import REPO


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, sp_model_path):
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_checkpoint import make_tiny_checkpoint

    # A unique directory name: transformers caches remote code under the directory's name.
    target = tmp_path_factory.mktemp("chat") / f"tiny_chat_{uuid.uuid4().hex[:8]}"
    return make_tiny_checkpoint(target, preset="tiny", seed=3, tokenizer_model=sp_model_path)


@pytest.fixture(scope="module")
def loaded(chat_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat_checkpoint), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(chat_checkpoint), trust_remote_code=True, torch_dtype=torch.float32
    ).eval()
    return model, tokenizer


def stop_ids(tokenizer):
    return [
        tokenizer.eos_token_id,
        tokenizer.get_command("<|user|>"),
        tokenizer.get_command("<|observation|>"),
    ]


@torch.no_grad()
def greedy_reference(model, input_ids, stop, max_length):
    """Greedy decoding by full re-computation each step (no cache, no generate)."""
    ids = input_ids
    while ids.shape[1] < max_length:
        token = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        if token.item() in stop:
            break
    return ids


def test_chat_greedy_answer_equals_an_independent_greedy_decode(loaded):
    model, tokenizer = loaded
    query = "hello world"
    response, history = model.chat(tokenizer, query, history=[], max_length=40, do_sample=False)
    prompt = tokenizer.build_chat_input(query, history=[])["input_ids"]
    ids = greedy_reference(model, prompt, stop_ids(tokenizer), 40)
    expected_text = tokenizer.decode(ids[0, prompt.shape[1] : -1].tolist())
    expected_response, expected_history = model.process_response(
        expected_text, [{"role": "user", "content": query}]
    )
    assert response == expected_response
    assert history == expected_history
    assert history[0] == {"role": "user", "content": query} and history[1]["role"] == "assistant"


def test_stream_chat_ends_with_the_chat_answer_and_can_continue_from_its_cache(loaded):
    model, tokenizer = loaded
    query = "the weather today"
    final, _ = model.chat(tokenizer, query, history=[], max_length=40, do_sample=False)
    streamed = list(
        model.stream_chat(
            tokenizer, query, history=[], max_length=40, do_sample=False, return_past_key_values=True
        )
    )
    assert streamed, "stream_chat yielded nothing"
    response, history, past = streamed[-1]
    assert response == final
    more = list(
        model.stream_chat(
            tokenizer, "and tomorrow", history=history, past_key_values=past, max_length=80, do_sample=False
        )
    )
    assert more and more[-1][1][-2] == {"role": "user", "content": "and tomorrow"}


def test_stream_generate_greedy_equals_generate(loaded):
    model, tokenizer = loaded
    inputs = tokenizer.build_chat_input("quick brown fox")
    want = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=-1)
    steps = list(model.stream_generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=-1))
    assert len(steps) == 12
    assert torch.equal(steps[-1], want)


def test_sampling_generate_and_stream_generate_draw_the_same_tokens_for_a_seed(loaded):
    model, tokenizer = loaded
    inputs = tokenizer.build_chat_input("machine learning")
    kwargs = dict(max_new_tokens=10, do_sample=True, top_p=0.8, temperature=0.8, top_k=0, eos_token_id=-1)
    torch.manual_seed(7)
    want = model.generate(**inputs, **kwargs)
    torch.manual_seed(7)
    got = list(model.stream_generate(**inputs, **kwargs))[-1]
    assert torch.equal(got, want)
    torch.manual_seed(8)
    other = model.generate(**inputs, **kwargs)
    assert other.shape == want.shape


@pytest.mark.parametrize("kv_cache", ["tuple", "static"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(loaded, kv_cache):
    model, tokenizer = loaded
    model.transformer.set_runtime_options(kv_cache=kv_cache)
    try:
        prompts = ["hello", "the quick brown fox jumps over the lazy dog"]
        batch = tokenizer(prompts, padding=True, return_tensors="pt")
        assert batch["attention_mask"][0, 0] == 0, "the tokenizer must pad on the left"
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=-1)
        for row, prompt in enumerate(prompts):
            alone = tokenizer([prompt], return_tensors="pt")
            single = model.generate(**alone, max_new_tokens=6, do_sample=False, eos_token_id=-1)
            assert torch.equal(out[row, -6:], single[0, -6:]), (row, prompt)
    finally:
        model.transformer.set_runtime_options(kv_cache="tuple")


def test_chat_past_the_context_says_so(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="seq_length=256"):
        model.chat(tokenizer, "hello", history=[], max_length=400, do_sample=False, min_new_tokens=300)


def test_stream_chat_streams_a_tool_call_as_text_then_yields_the_parsed_call(loaded, monkeypatch):
    """The model's own generation is replaced by a scripted token stream (the tool call's text):
    what is under test is stream_chat's handling of a call that is incomplete until the end."""
    model, tokenizer = loaded
    tools = [{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]
    history = [{"role": "system", "content": "use tools", "tools": tools}]
    answer = "get_weather\n```python\ntool_call(city='the city', days=2)\n```"
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    end = tokenizer.get_command("<|observation|>")

    def scripted_stream(input_ids, **kwargs):
        for count in range(1, len(answer_ids) + 1):
            yield torch.cat([input_ids, torch.tensor([answer_ids[:count]])], dim=1)
        yield torch.cat([input_ids, torch.tensor([answer_ids + [end]])], dim=1)

    monkeypatch.setattr(model, "stream_generate", scripted_stream)
    steps = list(model.stream_chat(tokenizer, "weather?", history=list(history), do_sample=False))
    *streamed, (final, final_history) = steps
    assert streamed and all(isinstance(content, str) for content, _ in streamed)
    assert "tool_call(city=" in streamed[-1][0]
    assert final == {"name": "get_weather", "parameters": {"city": "the city", "days": 2}}
    want = model.process_response(
        tokenizer.decode(answer_ids), history + [{"role": "user", "content": "weather?"}]
    )
    assert (final, final_history) == want
