"""GPU checks (issue 16 part A): a bf16 autocast training step with fp32 master weights, SDPA on a flash or
memory-efficient kernel, torch.compile = eager, grouped MoE = loop, Muon's bf16 Newton-Schulz = torch.optim.Muon,
pinned non-blocking batch copies, and the datasheet peak that MFU divides by.

Every test is marked `gpu` and skips without CUDA, so CPU machines and CI collect and skip them. A GPU session
runs them through `bash scripts/gpu_check.sh` (= `python -m pytest -q -m gpu tests/test_gpu.py` plus benchmarks).
Data is synthetic token ids: nothing here reads ../shared, which does not travel to the GPU machine.

Tolerances come from bf16's unit roundoff u = 2^-8 (8 significant bits: rounding to nearest changes a value by
at most u relative) and are stated as errors relative to a tensor's scale (`rel_err`): an entry near zero gets
an absolute error from the magnitude of the inputs that made it, not from its own.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from scaletrain.build import build
from scaletrain.config import Activation, Config, ModelConfig, MoEConfig, MoEImpl, Precision, load_config
from scaletrain.data import BatchLoader
from scaletrain.hardware import GPU_BF16_PEAK, gpu_peak_flops, peak_flops
from scaletrain.model import Transformer
from scaletrain.moe import MoE
from scaletrain.muon import MuonWithAdamW, muon_group
from scaletrain.trainer import forward_backward, optimizer_step

from .conftest import compose_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash scripts/gpu_check.sh there)"),
]

CUDA = torch.device("cuda")
BF16_U = 2.0**-8  # bf16 unit roundoff: 8 significant bits (7 stored + the implicit one)


def gpu_cfg(*overrides: str) -> Config:
    """The real conf/ composed for one CUDA process, W&B off (no data path: tests train on synthetic ids)."""
    return load_config(compose_cfg([*overrides, "train.device=cuda", "logging.wandb.mode=disabled"]))


def synthetic_tokens(cfg: Config, n: int = 400_000) -> np.ndarray:
    vocab = cfg.model.vocab_size or cfg.data.tokenizer.vocab_size
    return np.random.default_rng(0).integers(0, vocab, size=n).astype(np.uint16 if vocab <= 1 << 16 else np.uint32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64: the error relative to b's scale."""
    a64, b64 = a.detach().double(), b.detach().double()
    return ((a64 - b64).norm() / b64.norm()).item()


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor, fp32: torch.Tensor, floor: float, what: str):
    """`actual` and `expected`: two bf16 computations of one quantity; `fp32` the same in fp32.

    By the triangle inequality the two differ by at most the sum of their errors against exact arithmetic.
    Each is about `expected`'s error against fp32 (same bf16 inputs, same rounding sites up to a few fused
    ones), so the bound is 2 * rel_err(expected, fp32), or `floor` (from counting roundings) where that is
    larger. The measured error against fp32 is what sets the bound for a sum that cancels: a weight gradient
    sums x * g over every token, and at init those terms nearly cancel, so bf16's u per term becomes several
    percent of the (small) sum (seen on a CPU: 5-10% for norm weights, eager bf16 vs fp32)."""
    noise = rel_err(expected, fp32)
    err, bound = rel_err(actual, expected), max(floor, 2 * noise)
    assert err <= bound, f"{what}: {err:.2e} > bound {bound:.2e} (bf16 vs fp32: {noise:.2e})"


# --- bf16 autocast training step ------------------------------------------------------------------


def test_bf16_autocast_step_gives_bf16_logits_a_finite_loss_and_updates_fp32_master_weights():
    cfg = gpu_cfg("model=dense_124m", "data.seq_len=256", "train.batch_size=4", "train.precision=bf16")
    c = build(cfg, device=CUDA, train_tokens=synthetic_tokens(cfg))
    assert c.precision == Precision.bf16 and c.device.type == CUDA.type
    x, y = c.loader.next_batch()
    assert x.is_pinned() and y.is_pinned()  # build() pins batches on a CUDA host
    x, y = x.to(CUDA, non_blocking=True), y.to(CUDA, non_blocking=True)
    before = {n: p.detach().clone() for n, p in c.model.named_parameters()}

    with torch.no_grad():
        with c.autocast():
            assert c.dp_model(x).logits.dtype == torch.bfloat16
        fp32_loss = F.cross_entropy(c.model(x).logits.flatten(0, 1), y.flatten()).item()  # no autocast: fp32
    lm, _ = forward_backward(c.dp_model, x, y, c.autocast, 1.0)
    loss = lm.item()
    assert math.isfinite(loss)
    # A fresh model predicts nearly uniformly: loss ~ ln V (+ var(logits)/2, ~0.15 at init std 0.02).
    assert abs(loss - math.log(c.model.vocab_size)) < 1.0
    # The loss is computed in fp32 from bf16 logits: each logit carries a few u of relative error, and
    # cross-entropy moves by at most 2 * max|d logit| per token, far below u * loss * 8 (~0.34 here).
    assert abs(loss - fp32_loss) <= 8 * BF16_U * fp32_loss, (loss, fp32_loss)
    for n, p in c.model.named_parameters():  # master weights and their gradients stay fp32 under autocast
        assert p.dtype == torch.float32, n
        assert p.grad is not None and p.grad.dtype == torch.float32 and bool(p.grad.isfinite().all()), n

    norm_w = c.model.get_parameter("final_norm.weight")
    lr = next(g["lr"] for g in c.optimizer.param_groups if any(q is norm_w for q in g["params"]))
    grad_norm = optimizer_step(c.model, c.optimizer, c.scheduler, cfg.train.grad_clip)
    assert math.isfinite(grad_norm.item()) and grad_norm.item() > 0
    for n, p in c.model.named_parameters():
        assert p.dtype == torch.float32, n
        assert not torch.equal(p.detach(), before[n]), f"{n} did not change"
        for k, v in c.optimizer.state[p].items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert v.dtype == torch.float32, f"optimizer state {k} of {n}"
    # AdamW's first step moves every weight by lr * g / (|g| + eps) = +-lr (no decay on norms). The norm weights
    # sit at 1.0, where bf16 rounds away any change below 2^-9 (half its spacing just below 1.0): the warm-up
    # step's lr = 1e-5 survives only in fp32 master weights. rtol 2%: fp32 stores 1 - lr to within 6e-8 (0.6%).
    step = (norm_w.detach() - before["final_norm.weight"]).abs()
    assert lr < BF16_U / 2
    torch.testing.assert_close(step.max().item(), lr, rtol=2e-2, atol=0)


# --- SDPA kernels ---------------------------------------------------------------------------------


def test_attention_runs_on_a_flash_or_memory_efficient_kernel_in_bf16_and_matches_the_math_kernel(monkeypatch):
    cfg = gpu_cfg("model=dense_124m", "data.seq_len=512")
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.model.vocab_size or 50304, cfg.data.seq_len).to(CUDA)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict, torch.Tensor]] = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):  # the model's own q, k, v (projections + RoPE) and its call
        o = sdpa(q, k, v, **kw)
        calls.append((q.detach(), k.detach(), v.detach(), kw, o.detach()))
        return o

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    idx = torch.randint(0, model.vocab_size, (2, cfg.data.seq_len), device=CUDA)
    # sdpa_kernel raises when none of the allowed backends accepts the call (dtype, layout, head dim, mask)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx).logits
        logits.float().pow(2).mean().backward()  # the fast kernels' backward, too
    assert len(calls) == cfg.model.n_layers
    assert all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
    for q, k, v, kw, o in calls:
        assert q.dtype == k.dtype == v.dtype == o.dtype == torch.bfloat16
        assert kw["is_causal"] and kw["dropout_p"] == 0.0
        with sdpa_kernel([SDPBackend.MATH]):
            ref = sdpa(q.double(), k.double(), v.double(), is_causal=True)  # exact on the same bf16 inputs
        # Flash / memory-efficient: QK^T and softmax in fp32, P rounded to bf16 for P @ V (<= u relative per
        # weight; the weights sum to 1, so <= u * max|v|), output rounded to bf16 (<= u * |o| <= u * max|v|):
        # |o - exact| <= 2u * max|v| per head; 2^-12 * max|v| covers fp32 accumulation over <= 512 keys.
        vmax = v.double().abs().amax(dim=(-2, -1), keepdim=True)
        excess = (o.double() - ref).abs() - (2 * BF16_U + 2**-12) * vmax
        assert excess.max().item() <= 0, f"max excess over the bound: {excess.max().item():.3g}"


# --- torch.compile --------------------------------------------------------------------------------


def test_compiled_model_matches_eager_in_bf16_forward_and_backward():
    torch._dynamo.reset()
    args = ("debug=cpu_tiny", "data.seq_len=256", "train.batch_size=8", "train.precision=bf16")
    cfg = gpu_cfg(*args, "train.compile=true")
    c = build(cfg, device=CUDA, train_tokens=synthetic_tokens(cfg))  # each block compiled (parallelize.py)
    e = build(gpu_cfg(*args), device=CUDA, train_tokens=synthetic_tokens(cfg))  # eager, the same initial weights
    x, y = (t.to(CUDA) for t in c.loader.next_batch())

    def fwd_bwd(model, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x).logits
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        assert len(grads) == len(list(model.parameters()))
        return logits.detach().float(), grads

    compiled, eager = fwd_bwd(c.model, c.autocast), fwd_bwd(e.model, e.autocast)
    fp32 = fwd_bwd(e.model, contextlib.nullcontext)
    # Floors: compiled and eager run the same bf16 matmuls (autocast decides their dtypes); they differ where
    # inductor keeps a fused chain in fp32 that eager rounds to bf16 between ops (norm inputs after residual
    # adds, activations in matmul epilogues). Each such site moves a value by <= u (RMS ~u/sqrt(3)); ~6 sites
    # per block, 2 blocks: independent errors add to ~sqrt(12) * 0.6u ~ 2u of the logits' scale, so 8u leaves
    # 4x headroom. The backward pass has about twice the sites, and the forward's errors flow into it: 16u.
    assert_bf16_close(compiled[0], eager[0], fp32[0], 8 * BF16_U, "logits")
    for name, g in compiled[1].items():
        assert_bf16_close(g, eager[1][name], fp32[1][name], 16 * BF16_U, f"gradient of {name}")


# --- MoE grouped vs loop --------------------------------------------------------------------------


def run_moe(layer: MoE, x_BTD: torch.Tensor, impl: str, bf16: bool = True):
    """Forward + backward of mean(y^2) + aux (in bf16 autocast or fp32) -> (y, input grad, parameter grads)."""
    layer.moe_cfg.impl = MoEImpl(impl)
    layer.zero_grad(set_to_none=True)
    x_BTD = x_BTD.detach().clone().requires_grad_()
    with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=bf16):
        y_BTD = layer(x_BTD)
    (y_BTD.float().pow(2).mean() + layer.aux_loss).backward()
    assert x_BTD.grad is not None
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y_BTD.detach().float(), x_BTD.grad.clone(), grads


def test_grouped_moe_matches_the_loop_in_bf16_on_cuda_with_dropped_slots_and_idle_experts():
    torch.manual_seed(0)
    # dims whose bf16 rows are multiples of 16 bytes (grouped_mm's rule); no biases: the shipped models have none
    mc = ModelConfig(name="t", d_model=256, d_ff=512, n_layers=2, n_heads=1, activation=Activation.swiglu, bias=False)
    layer = MoE(mc, MoEConfig(name="t", n_experts=8, top_k=2, capacity_factor=1.0, n_shared=1)).to(CUDA)
    layer.expert_bias_E[5:] = -1e4  # experts 5, 6, 7 are never chosen: empty groups
    x = torch.randn(4, 128, 256, device=CUDA)
    yg, gxg, gg = run_moe(layer, x, "grouped")
    assert layer.dispatch == f"grouped (grouped_mm on {CUDA.type} bfloat16)"
    assert layer.stats["tokens_per_expert"][5:].sum() == 0 and layer.stats["dropped_frac"] > 0
    yl, gxl, gl = run_moe(layer, x, "loop")
    assert layer.dispatch.startswith("loop")
    # grouped_mm leaves rows past the last group uninitialized: the layer must have zeroed them
    assert bool(yg.isfinite().all()) and bool(gxg.isfinite().all())
    y32, gx32, g32 = run_moe(layer, x, "loop", bf16=False)
    # Floors: both paths run the same bf16 GEMMs with fp32 accumulation in different kernels, so an output
    # entry differs by at most one rounding (u) per GEMM. Forward: gate/in, then out (2 in series) -> 4u of the
    # scale; backward adds the dgrad/wgrad GEMMs in series with those -> 8u.
    assert_bf16_close(yg, yl, y32, 4 * BF16_U, "output")
    assert_bf16_close(gxg, gxl, gx32, 8 * BF16_U, "input gradient")
    assert gg.keys() == gl.keys() == g32.keys()
    for name, g in gg.items():
        assert g.dtype == torch.float32, name  # parameters and their gradients stay fp32
        if name.startswith("experts."):
            assert g[5:].abs().sum() == 0, f"{name}: idle experts got a gradient"
        assert_bf16_close(g, gl[name], g32[name], 8 * BF16_U, f"gradient of {name}")


# --- Muon -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_muon_bf16_newton_schulz_on_cuda_equals_torch_muon_bit_for_bit(adjust_lr, nesterov):
    gen = torch.Generator(device=CUDA).manual_seed(3)
    # dense_124m's square attention matrix, a tall MLP matrix and a wide one of another size: no two share a
    # shape, so each runs the 2-D Newton-Schulz, torch.optim.Muon's exact op sequence (a shared shape would
    # take the batched path, whose bf16 GEMMs round differently).
    init = [torch.randn(s, device=CUDA, generator=gen) for s in [(768, 768), (3072, 768), (768, 2304)]]
    ours, ref = [nn.Parameter(w.clone()) for w in init], [nn.Parameter(w.clone()) for w in init]
    lr, wd, mu = 0.02, 0.1, 0.9
    group = muon_group(
        ours, lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov, ns_steps=5, adjust_lr=adjust_lr, ns_dtype="bf16"
    )
    opt = MuonWithAdamW([group])
    # Some torch versions have `use_addmm` (default False: separate scale and add, rounded differently in
    # bf16); scaletrain runs the addmm sequence, so that is the setting to compare with where it exists.
    addmm: dict[str, Any] = {"use_addmm": True} if "use_addmm" in inspect.signature(torch.optim.Muon).parameters else {}
    opt_ref = torch.optim.Muon(
        ref, lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov, ns_steps=5, adjust_lr_fn=adjust_lr, **addmm
    )
    for _ in range(4):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, device=CUDA, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    assert not torch.equal(ours[0], init[0])
    for p, q in zip(ours, ref):
        assert p.dtype == torch.float32
        assert torch.equal(p, q), f"{tuple(p.shape)}: max |diff| {(p - q).abs().max().item():.3g}"


# --- pinned batches -------------------------------------------------------------------------------


def test_pinned_batches_copy_to_the_gpu_without_blocking_and_keep_their_values():
    tokens = np.random.default_rng(0).integers(0, 50304, size=200_000).astype(np.uint16)
    pinned = BatchLoader(tokens, 8, 256, seed=0, pin_memory=True)
    plain = BatchLoader(tokens, 8, 256, seed=0)
    for _ in range(3):
        (x, y), (x_ref, y_ref) = pinned.next_batch(), plain.next_batch()
        assert x.is_pinned() and y.is_pinned() and not x_ref.is_pinned()
        x_gpu, y_gpu = x.to(CUDA, non_blocking=True), y.to(CUDA, non_blocking=True)
        torch.cuda.current_stream().synchronize()  # the copies were only queued
        assert x_gpu.device.type == CUDA.type and x_gpu.dtype == torch.int64
        assert torch.equal(x_gpu.cpu(), x_ref) and torch.equal(y_gpu.cpu(), y_ref)
        assert torch.equal(x_gpu[:, 1:], y_gpu[:, :-1])  # y is x shifted by one


# --- MFU's peak -----------------------------------------------------------------------------------

# torch.cuda.get_device_name() of the GPUs this project is lent, with their datasheet dense bf16 peaks
# (H100 SXM5 and H200: 989.4 TFLOP/s; the H100 SXM reports itself as "NVIDIA H100 80GB HBM3").
KNOWN_GPUS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
}


def test_mfu_peak_is_the_datasheet_dense_bf16_peak_of_the_detected_gpu():
    name = torch.cuda.get_device_name(CUDA)
    peak = gpu_peak_flops(CUDA)
    assert peak is not None, f"no datasheet peak for {name!r}: add it to scaletrain.hardware.GPU_BF16_PEAK"
    matching = [key for key in GPU_BF16_PEAK if key in name]
    assert peak == GPU_BF16_PEAK[max(matching, key=len)]  # the most specific table entry wins
    if name in KNOWN_GPUS:
        assert peak == KNOWN_GPUS[name], (name, peak)
    assert peak_flops(CUDA, torch.bfloat16, None, measure_cpu=False) == (peak, f"datasheet dense bf16 peak of {name}")
