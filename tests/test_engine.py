"""The engine's paged KV cache: blocks under a budget, prefix reuse, chunked prefill; every path gives the tokens
that one request decoded alone gives."""

import pytest
import torch

from gptkit import GPT, SamplingParams, native, preset
from gptkit.engine import Engine, Request, generate_tokens
from gptkit.errors import GptkitError
from gptkit.generate import GenerationError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(preset("tiny-modern", vocab_size=300, context=256)).eval()


def run(engine: Engine, prompts: list[list[int]], new: int = 12, each_step=None) -> list[list[int]]:
    requests = [engine.add(Request(p, SamplingParams(max_new_tokens=new, temperature=0))) for p in prompts]
    out = {r.id: [] for r in requests}
    while engine.has_work():
        for o in engine.step():
            out[o.request.id].append(o.token)
        if each_step:
            each_step(engine)
    return [out[r.id] for r in requests]


def alone(model, prompt, new=12):
    return generate_tokens(model, [prompt], SamplingParams(max_new_tokens=new, temperature=0))[0]


def prompts(n, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (length + 7 * i,), generator=g).tolist() for i in range(n)]


def test_rows_on_blocks_decode_as_each_prompt_alone(model):
    ps = prompts(4, 21)
    assert run(Engine(model, max_batch=4, block_size=8), ps) == [alone(model, p) for p in ps]


def test_the_native_step_through_block_tables_equals_the_pytorch_path(model):
    ps = prompts(3, 30)
    engine = Engine(model, max_batch=3, block_size=8)
    assert isinstance(engine.stepper, native.NativeStepper) and engine.stepper.plan is not None
    torch_engine = Engine(model, max_batch=3, block_size=8)
    torch_engine.stepper = native.Stepper(model)
    assert run(engine, ps, 20) == run(torch_engine, ps, 20)


def test_a_prompt_seen_before_reuses_its_blocks_and_gives_the_same_tokens(model):
    system = prompts(1, 40)[0]
    engine = Engine(model, max_batch=2, block_size=8)
    first = run(engine, [system + [5, 6, 7]])
    assert engine.pool.reused_blocks == 0
    second = run(engine, [system + [9, 10]])  # another user, the same system prompt
    assert engine.pool.reused_blocks == 40 // 8  # every full block of the shared prefix
    assert first == [alone(model, system + [5, 6, 7])] and second == [alone(model, system + [9, 10])]
    turn2 = system + [5, 6, 7] + first[0] + [11]  # a chat client resends the whole conversation
    reused = engine.pool.reused_blocks
    assert run(engine, [turn2]) == [alone(model, turn2)]
    assert engine.pool.reused_blocks - reused == (len(turn2) - 1) // 8  # its history, the reply's blocks too


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_keep_decoding(model):
    short, long = prompts(1, 5)[0], prompts(1, 150, seed=2)[0]
    engine = Engine(model, max_batch=2, block_size=8, prefill_chunk=32)
    engine.add(Request(short, SamplingParams(max_new_tokens=30, temperature=0)))
    engine.step()  # the short one runs
    engine.add(Request(long, SamplingParams(max_new_tokens=4, temperature=0)))
    steps_with_a_token = 0
    while engine.rows[-1].logits is None or len(engine.rows) < 2:  # the long prompt still being prefilled
        outputs = engine.step()
        steps_with_a_token += any(o.request.prompt == short for o in outputs)
    assert steps_with_a_token >= 150 // 32  # the running row got a token in every step of the long prefill
    chunked = Engine(model, max_batch=1, block_size=8, prefill_chunk=16)
    assert run(chunked, [long], 8) == [alone(model, long, 8)]


def test_requests_wait_for_blocks_under_a_small_budget_and_all_finish(model):
    per_block = 2 * model.config.n_layer * model.config.kv_heads * model.config.head_dim * 4 * 8
    engine = Engine(model, max_batch=4, block_size=8, kv_memory=10 * per_block)  # 80 positions for 4 rows
    ps = prompts(4, 20)
    most = []
    out = run(engine, ps, 12, each_step=lambda e: most.append(e.pool.in_use - len(e.pool.idle)))
    assert out == [alone(model, p) for p in ps]
    assert max(most) <= 10 and engine.max_rows < 4  # never more blocks than the budget: some waited
    assert all(r == 0 for r in engine.pool.refs)  # every block given back
    with pytest.raises(GenerationError, match="exceeds the KV cache's whole budget of 80 tokens"):
        engine.add(Request(list(range(70)), SamplingParams(max_new_tokens=20)))


def test_an_evicted_prefix_is_computed_again(model):
    per_block = 2 * model.config.n_layer * model.config.kv_heads * model.config.head_dim * 4 * 8
    engine = Engine(model, max_batch=1, block_size=8, kv_memory=8 * per_block)
    a, b = prompts(2, 33, seed=3)
    run(engine, [a])
    run(engine, [b])  # needs the blocks a left cached: they are evicted
    assert engine.pool.evictions > 0
    assert run(engine, [a]) == [alone(model, a)]


def test_prompt_log_probs_equal_the_models_own_and_zero_new_tokens_scores_only(model):
    prompt = prompts(1, 40)[0]
    with torch.no_grad():
        lp = model(torch.tensor([prompt]))[0].log_softmax(-1)
    expected = [lp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    for new, chunk in ((0, 512), (3, 16)):  # scored alone, or before 3 new tokens; in one pass or in chunks
        engine = Engine(model, max_batch=2, block_size=8, prefill_chunk=chunk)
        run(engine, [prompt])  # the prompt is cached now: scoring must not reuse it
        r = engine.add(Request(prompt, SamplingParams(max_new_tokens=new, temperature=0, prompt_logprobs=2)))
        outputs = [o for _ in range(20) for o in engine.step() if o.request is r]
        first = outputs[0]
        assert [t.token for t in first.prompt_logprobs] == prompt[1:]
        torch.testing.assert_close([t.logprob for t in first.prompt_logprobs], expected, atol=1e-4, rtol=0)
        assert all(len(t.top) == 2 and t.top[0][1] >= t.logprob - 1e-6 for t in first.prompt_logprobs)
        assert len(outputs) == max(new, 1) and outputs[-1].finish_reason == "length"
        assert sum(o.completion_tokens > 0 for o in outputs) == new


def test_a_request_that_fails_to_start_is_handed_back_and_holds_no_blocks(model, monkeypatch):
    import gptkit.engine as engine_module

    engine = Engine(model, max_batch=2, block_size=8)
    system = prompts(1, 40)[0]
    run(engine, [system + [1]])  # its blocks are cached now: the next request would share them
    r = engine.add(Request(system + [2], SamplingParams(max_new_tokens=3, temperature=0)))

    def broken(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(engine_module, "Detokenizer", broken)
    engine.tokenizer = object()  # (so that a detokenizer is built)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert [x.id for x in engine.abort()] == [r.id]
    assert all(n == 0 for n in engine.pool.refs)


def test_a_row_without_the_block_it_writes_is_refused_on_both_paths(model):
    engine = Engine(model, max_batch=1, block_size=4)
    cache = engine.cache
    cache.tables[0], cache.lengths[0] = [engine.pool.allocate()], 4  # one full block; position 4 has none
    with torch.inference_mode():
        with pytest.raises(IndexError, match="out of range"):  # native: the missing block is -1, never block 0
            engine.stepper.decode(torch.tensor([1]), cache.select(0, 1))
        with pytest.raises(GptkitError, match="past the KV blocks"):
            native.Stepper(model).decode(torch.tensor([1]), cache.select(0, 1))
