"""The native decode step (kernels/step.c) computes what the PyTorch model computes, for every architecture,
and steps aside whenever the model is no longer the one it read."""

import copy
import dataclasses

import pytest
import torch

from gptkit import GPT, kernels, pack_for_cpu_inference, preset, quantize

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


def decode(model: GPT, prompts: torch.Tensor, lengths: list[int], steps: int) -> torch.Tensor:
    """Logits of `steps` greedy steps after prompts of different lengths (rows at different positions)."""
    cache, out = model.new_cache(len(lengths), 64), []
    with torch.inference_mode():
        for row, n in enumerate(lengths):
            model.hidden_states(prompts[row:row + 1, :n], cache.select(row, row + 1))
            cache.set_length(row, n)
        tokens = prompts[torch.arange(len(lengths)), torch.tensor(lengths) - 1][:, None]
        for _ in range(steps):
            out.append(model(tokens, cache)[:, -1])
            cache.advance(1)
            tokens = out[-1].argmax(-1, keepdim=True)
    return torch.stack(out)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_native_step_gives_the_models_logits(name):
    model = model_for(name)
    prompts = torch.randint(0, model.config.vocab_size, (3, 40))
    lengths = [3, 40, 17]  # the banded layers' window (32) is passed by the longest row
    fast = pack_for_cpu_inference(copy.deepcopy(model))
    assert fast.inference_step is not None
    torch.testing.assert_close(decode(fast, prompts, lengths, 8), decode(model, prompts, lengths, 8),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_native_step_runs_quantized_models(bits):
    # 261 tokens: the int8 embedding's last row is outside its groups of 8 (step.c looks up both kinds)
    model = quantize.quantize(model_for("gpt2", vocab_size=261), bits=bits)
    prompts = torch.randint(0, 261, (2, 12))
    prompts[:, -1] = torch.tensor([260, 7])
    reference = decode(copy.deepcopy(model), prompts, [12, 5], 4)
    fast = pack_for_cpu_inference(model)
    assert fast.inference_step is not None
    # the activations are quantized to int8 by both paths; a value 1e-7 apart may round to the next integer
    torch.testing.assert_close(decode(fast, prompts, [12, 5], 4), reference, atol=5e-2, rtol=0)


def test_a_model_changed_after_packing_takes_the_pytorch_path():
    """Checked before the first step on each cache (each generation's): the same modules, tensors, no hooks."""
    model = pack_for_cpu_inference(model_for("gpt2"))
    step, token = model.inference_step, torch.tensor([[1]])

    def native() -> bool:
        with torch.inference_mode():
            return step(token, model.new_cache(1, 8)) is not None

    assert native()
    handle = model.blocks[0].mlp.register_forward_hook(lambda *a: None)
    assert not native()  # a hook must see its call
    handle.remove()
    assert native()
    model.blocks[1].attn.proj.weight = torch.nn.Parameter(torch.zeros(128, 128))  # (load_state_dict(assign=True))
    assert not native()
    model = pack_for_cpu_inference(model_for("gpt2"))
    step = model.inference_step
    quantize.quantize(model, bits=8)
    assert not native()  # the new layers are not in the plan
    model = pack_for_cpu_inference(model_for("gpt2"))
    step = model.inference_step
    model.to(torch.bfloat16)
    assert not native()


def test_a_model_in_training_mode_or_with_gradients_takes_the_pytorch_path():
    model = pack_for_cpu_inference(model_for("gpt2"))
    cache = model.new_cache(1, 8)
    model.train()
    with torch.inference_mode():
        assert model.inference_step(torch.tensor([[1]]), cache) is None


def test_a_model_with_parts_it_does_not_compute_keeps_the_pytorch_path():
    from gptkit.finetune import apply_lora

    model = model_for("gpt2")
    apply_lora(model, ("qkv",), rank=2, alpha=4)  # a LoRA layer is not one of the plan's linears
    prompts = torch.randint(0, model.config.vocab_size, (1, 6))
    reference = decode(copy.deepcopy(model), prompts, [6], 3)
    packed = pack_for_cpu_inference(model)
    assert packed.inference_step is None
    torch.testing.assert_close(decode(packed, prompts, [6], 3), reference, atol=2e-5, rtol=1e-4)
