"""The native stepper (native.py over kernels/step.c) computes what the PyTorch model computes, for every
architecture, steps aside whenever the model is no longer the one it read, and checks every index before it
touches memory."""

import dataclasses

import pytest
import torch

from gptkit import GPT, kernels, native, preset, quantize
from gptkit.kernels.step import DecodePlan

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler with OpenMP on this machine")

ARCHITECTURES = {
    "gpt1 (post-norm, exact GELU)": ("tiny-gpt2", {"prenorm": False, "activation": "gelu"}),
    "gpt2": ("tiny-gpt2", {}),
    "gpt3 (banded layers)": ("tiny-gpt3", {}),
    "modern (RoPE, RMSNorm, SwiGLU, GQA)": ("tiny-modern", {}),
    "modern + QK-norm, ReLU², pruned heads": ("tiny-modern", {"qk_norm": True, "activation": "relu2",
                                                              "head_size": 24}),
}


def model_for(name: str, **more) -> GPT:
    base, changes = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(preset(base), **changes, **more)).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases
            p.add_(torch.randn_like(p) * 0.05)
    return model


def decode(stepper: native.Stepper, prompts: torch.Tensor, lengths: list[int], steps: int) -> torch.Tensor:
    """Logits of `steps` greedy steps after prompts of different lengths (rows at different positions)."""
    model = stepper.model
    cache, out = model.new_cache(len(lengths), 64), []
    with torch.inference_mode():
        for row, n in enumerate(lengths):
            model.hidden_states(prompts[row:row + 1, :n], cache.select(row, row + 1))
            cache.set_length(row, n)
        tokens = prompts[torch.arange(len(lengths)), torch.tensor(lengths) - 1]
        for _ in range(steps):
            out.append(stepper.decode(tokens, cache))
            cache.advance(1)
            tokens = out[-1].argmax(-1)
    return torch.stack(out)


def fast(model: GPT) -> native.NativeStepper:
    stepper = native.stepper(model)
    assert isinstance(stepper, native.NativeStepper) and stepper.plan is not None
    return stepper


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_native_step_gives_the_models_logits(name):
    model = model_for(name)
    prompts = torch.randint(0, model.config.vocab_size, (3, 40))
    lengths = [3, 40, 17]  # the banded layers' window (32) is passed by the longest row
    torch.testing.assert_close(decode(fast(model), prompts, lengths, 8),
                               decode(native.Stepper(model), prompts, lengths, 8), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_native_step_runs_quantized_models(bits):
    # 261 tokens: the int8 embedding's last row is outside its groups of 8 (step.c looks up both kinds)
    model = quantize.quantize(model_for("gpt2", vocab_size=261), bits=bits)
    prompts = torch.randint(0, 261, (2, 12))
    prompts[:, -1] = torch.tensor([260, 7])
    reference = decode(native.Stepper(model), prompts, [12, 5], 4)
    # the activations are quantized to int8 by both paths; a value 1e-7 apart may round to the next integer
    torch.testing.assert_close(decode(fast(model), prompts, [12, 5], 4), reference, atol=5e-2, rtol=0)


def test_a_model_changed_after_the_plan_takes_the_pytorch_path():
    """Checked before the first step on each cache (each generation's): the same modules, tensors, no hooks."""
    model = model_for("gpt2")
    stepper, calls = fast(model), []
    plan = stepper.plan
    stepper.plan = lambda *args: calls.append(1) or plan(*args)

    def native_step() -> bool:
        calls.clear()
        with torch.inference_mode():
            stepper.decode(torch.tensor([1]), model.new_cache(1, 8))
        return bool(calls)

    assert native_step()
    handle = model.blocks[0].mlp.register_forward_hook(lambda *a: None)
    assert not native_step()  # a hook must see its call
    handle.remove()
    assert native_step()
    model.blocks[1].attn.proj.weight = torch.nn.Parameter(torch.zeros(128, 128))  # (load_state_dict(assign=True))
    assert not native_step()
    assert native.stepper(model) is not stepper  # asked again, the changed model is read again
    model = model_for("gpt2")
    stepper = fast(model)
    plan = stepper.plan
    stepper.plan = lambda *args: calls.append(1) or plan(*args)
    quantize.quantize(model, bits=8)
    assert not native_step()  # the new layers are not in the plan
    assert fast(model).plan is not plan


def test_a_model_in_training_mode_takes_the_pytorch_path():
    stepper, calls = fast(model_for("gpt2")), []
    plan = stepper.plan
    stepper.plan = lambda *args: calls.append(1) or plan(*args)
    with torch.inference_mode():
        stepper.decode(torch.tensor([1]), stepper.model.new_cache(1, 8))
        assert calls
        calls.clear()
        stepper.model.train()
        stepper.decode(torch.tensor([1]), stepper.model.new_cache(1, 8))
    assert not calls


def test_a_model_with_parts_it_does_not_compute_keeps_the_pytorch_path():
    from gptkit.finetune import apply_lora

    model = model_for("gpt2")
    apply_lora(model, ("qkv",), rank=2, alpha=4)  # a LoRA layer is not one of the plan's linears
    prompts = torch.randint(0, model.config.vocab_size, (1, 6))
    reference = decode(native.Stepper(model), prompts, [6], 3)
    stepper = native.stepper(model)
    assert stepper.plan is None
    torch.testing.assert_close(decode(stepper, prompts, [6], 3), reference, atol=2e-5, rtol=1e-4)


def test_a_step_past_the_end_of_a_short_cache_raises_instead_of_writing_past_it():
    """new_cache(1, 16), an 8-token prefill, then one-token steps as the engine takes them: the 17th position is
    refused by both paths (before, the native step wrote past the row and the process died)."""
    model = model_for("gpt2")
    for stepper in (fast(model), native.Stepper(model)):
        cache = model.new_cache(1, 16)
        with torch.inference_mode():
            stepper.prefill(torch.randint(0, 100, (1, 8)), cache)
            cache.set_length(0, 8)
            for _ in range(8):
                stepper.decode(torch.tensor([1]), cache)
                cache.advance(1)
            with pytest.raises(ValueError, match="exceeds the cache's 16 positions"):
                stepper.decode(torch.tensor([1]), cache)


def test_the_plan_checks_every_index_and_shape_before_it_touches_memory():
    model = model_for("gpt2")
    plan = fast(model).plan
    cache = model.new_cache(2, 16)
    ok = dict(tokens=torch.tensor([1]), positions=torch.tensor([0]), tables=torch.tensor([[0]]))
    with torch.inference_mode():
        plan(**ok, keys=cache.k, values=cache.v)
        for change in [dict(positions=torch.tensor([16])), dict(positions=torch.tensor([-1])),
                       dict(tables=torch.tensor([[2]])), dict(tokens=torch.tensor([model.config.vocab_size])),
                       dict(tokens=torch.tensor([-1]))]:
            with pytest.raises(IndexError, match="out of range"):
                plan(**(ok | change), keys=cache.k, values=cache.v)
        other = GPT(dataclasses.replace(model.config, n_layer=1)).new_cache(2, 16)
        with pytest.raises(ValueError, match="a cache of shape"):
            plan(**ok, keys=other.k, values=other.v)
    layer = plan.shape
    with pytest.raises(ValueError, match="shape"):  # a layer whose weights do not fit the shape
        DecodePlan(dataclasses.replace(layer, n_embd=layer.n_embd * 2), *plan_inputs(model))


def plan_inputs(model: GPT):
    stepper = native.NativeStepper(model)
    blocks = [stepper._layer(model, i, b) for i, b in enumerate(model.blocks)]
    return (stepper._weights(model.wte), model.wpe.weight, blocks, stepper._norm(model, "norm_f"), None)


def test_the_kernels_compare_the_activations_width_with_the_weights():
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match="width 32"):
        kernels.skinny_linear(torch.randn(2, 32), w, None)
    q, s = quantize.interleave(*quantize.quantize_weight(w, 8, 32))
    with pytest.raises(ValueError, match="width 32"):
        kernels.quant_linear(torch.randn(2, 32), q, s, None, 8, 32)
